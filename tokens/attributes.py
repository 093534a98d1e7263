"""The attribute vocabulary: visual adjectives a garment (or any object) can have, one word or short phrase each.

Perera et al. (Sec. 3, "subspace projection") restrict a custom token to the subspace spanned by the input
embeddings of the attributes most correlated with the concept in CLIP space (K = 100 of a larger list); the
`auto` initial caption ranks the same list against the concept's images. The list is data, grouped for the
reader: colours (including every colour word of the toy world, `benchmarks.world.config.COLOURS`),
brightness, materials, patterns (including the toy world's `PATTERNS`), textures, conditions, shape and fit,
style. A word of several BPE sub-tokens is represented by the mean of their embeddings (see
`tokens.methods.word_embeddings`).
"""

from __future__ import annotations

COLOURS = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black", "brown", "grey", "gray",
    "beige", "navy", "maroon", "teal", "turquoise", "gold", "golden", "silver", "cream", "ivory", "khaki", "olive",
    "burgundy", "lavender", "coral", "magenta", "cyan", "mint", "peach", "tan", "charcoal", "mustard", "violet",
    "indigo", "lilac", "rust", "salmon", "crimson", "scarlet", "emerald", "sapphire", "aqua", "fuchsia", "plum",
    "wine", "camel", "sand", "taupe", "copper", "bronze", "lime", "ochre", "amber", "rose", "blush", "denim blue",
    "sky blue", "royal blue", "forest green", "off-white", "jet black",
)
BRIGHTNESS = (
    "bright", "dark", "light", "pale", "vivid", "muted", "neon", "pastel", "deep", "colorful", "colourful",
    "monochrome", "multicolored", "two-tone", "saturated", "dull", "washed-out", "glowing", "dim", "rich",
)
MATERIALS = (
    "cotton", "silk", "wool", "woolen", "linen", "denim", "leather", "suede", "velvet", "satin", "lace", "chiffon",
    "polyester", "nylon", "knit", "knitted", "fleece", "tweed", "corduroy", "cashmere", "jersey", "mesh", "sequined",
    "fur", "faux fur", "canvas", "rubber", "plastic", "metal", "metallic", "wooden", "glass", "ceramic", "paper",
    "crochet", "tulle", "organza", "spandex", "lycra", "vinyl", "latex", "patent leather", "feathered", "beaded",
    "crystal", "pearl", "straw", "bamboo", "porcelain", "stone", "marble", "steel", "brass", "chrome", "felt",
)
PATTERNS = (
    "plain", "striped", "dotted", "checked", "plaid", "floral", "polka dot", "paisley", "houndstooth", "camouflage",
    "leopard print", "zebra print", "animal print", "geometric", "abstract", "tie-dye", "herringbone", "argyle",
    "pinstriped", "gingham", "tartan", "printed", "embroidered", "patterned", "solid", "graphic", "logo",
    "chevron", "zigzag", "spotted", "speckled", "marbled", "ombre", "gradient", "colour-block", "color-block",
    "patchwork", "lettered", "monogrammed", "star print", "heart print", "dotted line", "wavy", "tiled",
)
TEXTURES = (
    "smooth", "rough", "soft", "fuzzy", "fluffy", "shiny", "glossy", "matte", "sheer", "transparent", "opaque",
    "ribbed", "quilted", "pleated", "ruffled", "wrinkled", "crinkled", "textured", "woven", "padded", "furry",
    "silky", "velvety", "glittery", "sparkly", "shimmering", "iridescent", "stretchy", "stiff", "flowing",
    "crisp", "lightweight", "heavy", "thick", "thin", "chunky", "delicate", "sturdy", "puffy", "fringed",
    "studded", "frilly", "lacy", "knotted", "braided", "perforated", "brushed", "waxed", "coated", "layered",
)
CONDITIONS = (
    "new", "old", "worn", "faded", "torn", "ripped", "distressed", "clean", "dirty", "stained", "vintage", "retro",
    "modern", "classic", "damaged", "frayed", "washed", "pristine", "used", "secondhand", "brand-new", "crumpled",
    "ironed", "patched", "mended", "dusty", "muddy", "wet", "dry", "scuffed", "cracked", "bleached", "antique",
)
SHAPES = (
    "long", "short", "tight", "loose", "fitted", "oversized", "cropped", "sleeveless", "strapless", "hooded",
    "collared", "buttoned", "zipped", "belted", "wide", "narrow", "slim", "flared", "asymmetric", "high-waisted",
    "low-cut", "v-neck", "round-neck", "turtleneck", "off-shoulder", "one-shoulder", "backless", "wrap",
    "double-breasted", "single-breasted", "pocketed", "tiered", "draped", "tailored", "baggy", "skinny",
    "straight", "a-line", "maxi", "midi", "mini", "knee-length", "ankle-length", "long-sleeved", "short-sleeved",
    "puff-sleeved", "bell-sleeved", "ruched", "smocked", "laced", "cinched", "boxy", "structured", "round",
    "square", "pointed", "curved", "tall", "small", "large", "tiny", "huge",
)
STYLES = (
    "casual", "formal", "elegant", "sporty", "fancy", "simple", "chic", "bohemian", "cute", "trendy", "stylish",
    "luxurious", "cheap", "expensive", "minimalist", "preppy", "punk", "gothic", "romantic", "feminine",
    "masculine", "unisex", "summer", "winter", "festive", "business", "party", "evening", "everyday", "athletic",
    "traditional", "ethnic", "western", "military", "nautical", "tropical", "glamorous", "sexy", "modest",
    "playful", "sophisticated", "rustic", "handmade", "designer", "branded", "ornate", "decorated", "embellished",
)

# Every attribute once, in the order above (the tuple a subspace or an auto caption is drawn from).
ATTRIBUTES: tuple[str, ...] = tuple(dict.fromkeys(COLOURS + BRIGHTNESS + MATERIALS + PATTERNS + TEXTURES + CONDITIONS
                                                  + SHAPES + STYLES))
