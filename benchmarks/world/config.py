"""The toy world's configuration: image size, seed, vocabularies, jitter ranges and how benchmark splits are drawn.

The toy world stands in for PerVL-DeepFashion2 (Cohen et al., ECCV 2022) where nothing pretrained or real can
be had: a person stands in a context (background) wearing one garment described by three words (category,
colour, pattern); a *concept* is one specific garment whose look also holds details no word names (a
contrasting band, an emblem), so only images tell concepts with the same words apart.

Every vocabulary is a tuple in the config, so a different config is a different world (and a different seed
draws different concepts). Context, category, pattern, pose and emblem names must be ones the world can draw and
say (`benchmarks.world.vocabulary`); colours are free (name, RGB) pairs.
"""

from __future__ import annotations

import json
from dataclasses import MISSING, asdict, dataclass, fields

from benchmarks.world.vocabulary import CATEGORIES, CONTEXTS, EMBLEMS, NAMES, PATTERNS, POSES

RGB = tuple[int, int, int]

# Colour words and the RGB they paint: ten hues far apart, so a 64 px crop names each unambiguously.
# Grey is deliberately absent: the figure's plain under-clothes are grey, the one colour no caption names.
COLOURS: tuple[tuple[str, RGB], ...] = (
    ("red", (205, 25, 30)),
    ("orange", (250, 135, 15)),
    ("yellow", (250, 220, 30)),
    ("green", (30, 150, 50)),
    ("blue", (30, 75, 210)),
    ("purple", (125, 40, 165)),
    ("pink", (250, 135, 195)),
    ("white", (248, 248, 244)),
    ("black", (22, 22, 26)),
    ("brown", (120, 70, 30)),
)


@dataclass(frozen=True)
class WorldConfig:
    # ----- images
    image_size: int = 64  # side of the square RGB images, px
    supersample: int = 2  # drawn at this multiple of image_size, then box-downsampled (anti-aliasing)
    seed: int = 0  # draws the benchmark concepts and their scenes

    # ----- vocabularies: words the captions use (emblems are never named); defaults: all the world knows
    contexts: tuple[str, ...] = CONTEXTS  # backgrounds; PerVL captions describe these
    categories: tuple[str, ...] = CATEGORIES  # garment categories, each with its own silhouette
    colours: tuple[tuple[str, RGB], ...] = COLOURS  # (colour word, RGB) of the garment's main colour
    patterns: tuple[str, ...] = PATTERNS  # garment patterns; "plain" is solid
    poses: tuple[str, ...] = POSES  # the figure's pose; context captions name it
    emblems: tuple[str, ...] = EMBLEMS  # unnamed detail: shape printed on a concept's garment
    # half size of an emblem / figure height: 0.05 draws ~6 px emblems at 64 px, whose shape the toy CLIP's image
    # tower cannot resolve even with supervised heads (benchmarks.world.detail_capacity, README)
    emblem_size: float = 0.05
    trim_width: float = 0.05  # width of a trim band / figure height: ~3 px at 64 px

    # ----- jitter of every scene (uniform ranges)
    person_height: tuple[float, float] = (0.84, 0.95)  # figure height / image height
    person_x: tuple[float, float] = (0.3, 0.7)  # figure centre / image width
    brightness: tuple[float, float] = (0.85, 1.12)  # background brightness factor
    context_shift: float = 0.25  # background crop offset, up to this fraction of the image

    # ----- how one garment's photos differ (all off by default: the v1 world). DeepFashion2 annotates every item
    # with exactly these variations, between the shop and consumer photos of one item (Ge et al., CVPR 2019, Sec. 3:
    # viewpoint, occlusion, zoom-in, scale); a PerVL concept's shots and evaluation images are such photos.
    # The shares are ours (DeepFashion2's own statistics are not available here), chosen on the baselines only.
    back_view_share: float = 0.0  # seen from behind: the emblem (printed on the front) and the face are hidden
    bag_share: float = 0.0  # a shoulder bag hangs over part of the garment (occlusion)
    zoom_share: float = 0.0  # framed closer (zoom-in): the figure is zoom x taller than usual, partly out of frame
    zoom: tuple[float, float] = (1.3, 1.8)  # range of that magnification

    # ----- random (non-concept) scenes, as in training pairs
    detail_probability: float = 0.5  # chance that a random garment has a trim band; the same for an emblem

    # ----- benchmark split (PerVL-DeepFashion2 test: 50 concepts, 10-21 shots, 1-5 evaluation images each)
    n_concepts: int = 50  # concepts per split
    group_sizes: tuple[int, int] = (2, 3)  # concepts sharing one (category, colour, pattern) triple: min, max
    # in how many of the five detail fields two concepts of one group differ: min, max. (2, 5): any two (random draws
    # usually differ in more); a lower max makes look-alikes closer, a lever on the image-mean baseline
    detail_differences: tuple[int, int] = (2, 5)
    shots: tuple[int, int] = (5, 10)  # few-shot images per concept: min, max
    eval_per_concept: int = 4  # evaluation images per concept, one per context
    jpeg_quality: int = 95  # quality of the written .jpg images

    def __post_init__(self):
        for field_name, names in NAMES.items():
            unknown = [n for n in getattr(self, field_name) if n not in names]
            if unknown:
                raise ValueError(
                    f"WorldConfig.{field_name}: {unknown} cannot be both drawn and captioned; "
                    f"known (benchmarks.world.vocabulary): {sorted(names)}"
                )
        for field_name in ("contexts", "categories", "patterns", "poses", "emblems"):
            values = getattr(self, field_name)
            if len(set(values)) != len(values) or not values:
                raise ValueError(f"WorldConfig.{field_name} must be non-empty without repeats, got {values}")
        if len({name for name, _ in self.colours}) != len(self.colours) or len(self.colours) < 3:
            raise ValueError(
                "WorldConfig.colours needs >= 3 distinct colour names (a detail colour must differ from the main one)"
            )
        for name in ("emblem_size", "trim_width"):
            if not 0 < getattr(self, name) <= 0.15:
                raise ValueError(
                    f"{name} must be in (0, 0.15] (a fraction of the figure's height), got {getattr(self, name)}"
                )
        for name in ("back_view_share", "bag_share", "zoom_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a share in [0, 1], got {getattr(self, name)}")
        if not 1 <= self.zoom[0] <= self.zoom[1] <= 3:
            raise ValueError(f"zoom must be (min, max) with 1 <= min <= max <= 3, got {self.zoom}")
        if self.image_size < 16 or self.supersample < 1:
            raise ValueError(
                f"image_size must be >= 16 and supersample >= 1, got {self.image_size}, {self.supersample}"
            )
        if len(self.contexts) <= self.eval_per_concept:
            raise ValueError(
                f"{len(self.contexts)} contexts leave none for few-shot images when each concept is evaluated in "
                f"{self.eval_per_concept}; lower eval_per_concept or add contexts"
            )
        if not 2 <= self.group_sizes[0] <= self.group_sizes[1]:
            raise ValueError(
                f"group_sizes must be (min, max) with 2 <= min <= max (hard negatives), got {self.group_sizes}"
            )
        if not 1 <= self.detail_differences[0] <= self.detail_differences[1] <= 5:
            raise ValueError(
                f"detail_differences must be (min, max) with 1 <= min <= max <= 5 (of the five detail fields), got "
                f"{self.detail_differences}"
            )
        if self.n_concepts < self.group_sizes[0]:
            raise ValueError(f"n_concepts={self.n_concepts} is below the smallest group size {self.group_sizes[0]}")
        if not 1 <= self.shots[0] <= self.shots[1]:
            raise ValueError(f"shots must be (min, max) with 1 <= min <= max, got {self.shots}")

    @property
    def colour_rgb(self) -> dict[str, RGB]:
        return dict(self.colours)

    @property
    def colour_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.colours)


# Named presets are data. `tiny` is the test twin: a split of 6 concepts renders in well under a second.
PRESETS: dict[str, dict] = {
    "pervl": {},
    "tiny": {"n_concepts": 6, "shots": (2, 3), "eval_per_concept": 2},
    # a calibration lever tried and rejected (issue #13, section 4; README "Calibration on the baselines"): figures
    # of 0.5-0.95 of the image height anywhere across. A CLIP trained on it keeps Text + avg image where it was
    # and reads garments worse
    "scale-jitter": {"person_height": (0.5, 0.95), "person_x": (0.2, 0.8)},
    # the world of the v2 models (issue #13, section 3; in training, README "Details"): trim bands and emblems drawn
    # 1.8x larger, so that the 64 px CLIP has enough pixels of each detail to learn it (an 800-step pilot: emblem
    # colour read from the image embeddings at 0.45 against 0.18 at the v1 sizes, chance 0.20)
    "pervl-v2": {"trim_width": 0.09, "emblem_size": 0.09},
    # pervl-v2 and the photos of one garment differ as DeepFashion2's do (views: back, bag, zoom-in); in screening
    "pervl-v2-views": {
        "trim_width": 0.09,
        "emblem_size": 0.09,
        "back_view_share": 0.25,
        "bag_share": 0.25,
        "zoom_share": 0.25,
    },
}


def _tuples(value):
    """JSON lists as tuples, all the way down (WorldConfig's vocabularies and ranges are tuples)."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def world_config(preset: str = "pervl", **overrides) -> WorldConfig:
    """A named preset with optional field overrides: world_config("tiny", seed=3). Lists become tuples, so
    overrides parsed from JSON (`parse_overrides`) work: world_config(group_sizes=[4, 6])."""
    if preset not in PRESETS:
        raise KeyError(f"unknown toy-world preset {preset!r}; known: {sorted(PRESETS)}")
    return WorldConfig(**{**PRESETS[preset], **{k: _tuples(v) for k, v in overrides.items()}})


def trained_world(clip_spec: str) -> str:
    """The world preset a world CLIP was trained in, read from its folder's train_config.json (train_clip writes it):
    benchmarks draw their world with it, so that a CLIP is measured in the world it learnt and a new pair of
    world models brings its world along. A CLIP without that file (tiny-random, a real CLIP) gets "pervl"."""
    from retrieval.models.clip import model_folder  # here: the world's modules stay free of torch at import

    folder = model_folder(clip_spec)
    path = folder / "train_config.json" if folder else None
    if path is None or not path.is_file():
        return "pervl"
    # train_clip's configs before the field was added trained in "pervl" (its default then and now)
    preset = (json.loads(path.read_text()).get("config") or {}).get("world_preset", "pervl")
    if preset not in PRESETS:
        raise KeyError(f"{path} names world preset {preset!r}, which this code does not know; known: {sorted(PRESETS)}")
    return preset


def parse_overrides(items: list[str], config_class, flag: str = "--set") -> dict:
    """['FIELD=JSON', ...] -> {FIELD: value} for fields of CONFIG_CLASS (a dataclass); a bare word is a string.
    FLAG names the command-line option in the error."""
    names = {f.name for f in fields(config_class)}
    out = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or name not in names:
            raise SystemExit(f"{flag} {item!r}: expected FIELD=VALUE with FIELD one of {sorted(names)}")
        try:
            out[name] = json.loads(raw)
        except json.JSONDecodeError:
            out[name] = raw
    return out


def written_as(written: dict, config) -> bool:
    """Whether WRITTEN, a config record read back from JSON (a dataclass's fields, as a model folder's
    train_config.json or a world folder's toyworld_config.json hold them), describes CONFIG, a dataclass. A field
    the class gained after the record was written counts as set to its default, which is what the record's run did
    then (fields are added with defaults that keep the old world or recipe); a field the class no longer knows
    makes it another config. The one rule behind "is this folder the same world / the same recipe"."""

    def as_json(value):
        return json.loads(json.dumps(value, default=str))

    wanted = as_json(asdict(config))
    if set(written) - set(wanted):
        return False
    defaults = as_json(
        {
            f.name: f.default if f.default is not MISSING else f.default_factory()
            for f in fields(config)
            if f.default is not MISSING or f.default_factory is not MISSING
        }
    )
    return all(written[k] == v if k in written else k in defaults and defaults[k] == v for k, v in wanted.items())
