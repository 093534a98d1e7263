"""Visualise any prompt with custom tokens: images from the diffusion model, written as one grid (`cli.py generate`).

In the prompt, `*` stands for the token when exactly one is given, and every token can be named by its own
placeholder `<name>` ("a * dress next to a <my-bag> on a beach"). Tokens are checked against the CLIP in use.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from retrieval.io.atomic import write_atomic
from retrieval.models.pairing import load_models
from tokens.store import TokenStore

STAR = "*"


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str                                 # e.g. "a photo of a * dress on a beach"
    tokens: tuple[str, ...] = ()                # token names
    n: int = 4                                  # images
    out: Path = Path("grid.png")                # the grid image
    model: str = "ViT-L-14-quickgelu/openai"    # CLIP SPEC the tokens were made for
    diffusion: str | None = None                # diffusion SPEC; None/"auto": paired with model
    tokens_dir: Path = Path("custom_tokens")    # the token store
    steps: int = 50                             # sampler steps (the diffusion model's sampler)
    guidance_scale: float = 7.5                 # classifier-free guidance (SD's default)
    negative_prompt: str = ""                   # the unconditional prompt
    seed: int = 0                               # image i uses seed + i
    device: str = "auto"


@dataclass
class GenerateResult:
    out: Path
    images: list[Image.Image]
    prompt: str                                 # with `*` replaced by the token's placeholder


def grid(images: Sequence[Image.Image], columns: int = 4) -> Image.Image:
    """Images of one size side by side, COLUMNS per row."""
    columns = max(1, min(columns, len(images)))
    rows = math.ceil(len(images) / columns)
    w, h = images[0].size
    sheet = Image.new("RGB", (columns * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % columns) * w, (i // columns) * h))
    return sheet


def resolve_prompt(prompt: str, placeholders: Sequence[str]) -> str:
    """Replace `*` by the one token's placeholder; refuse prompts that use none of the given tokens."""
    if STAR in prompt:
        if len(placeholders) != 1:
            raise ValueError(f"'*' in the prompt stands for one token, but {len(placeholders)} were given: "
                             f"write each token's placeholder ({', '.join(placeholders) or 'give --token NAME'}) instead")
        prompt = prompt.replace(STAR, placeholders[0])
    unused = [p for p in placeholders if p not in prompt]
    if unused:
        raise ValueError(f"the prompt does not use {', '.join(unused)}: write * (one token) or <name> where each token goes")
    if re.search(r"<[^<>\s]+>", re.sub("|".join(map(re.escape, placeholders)) or "$^", "", prompt)):
        raise ValueError(f"the prompt names a placeholder that no --token gives: {prompt!r}")
    return prompt


def generate_images(request: GenerateRequest) -> GenerateResult:
    """Load the tokens and the diffusion model, generate N images for the prompt, write them as a grid."""
    # 1. check inputs and load the tokens (made for this CLIP?)
    if request.n < 1 or request.steps < 1:
        raise ValueError("--n and --steps must be >= 1")
    store = TokenStore(request.tokens_dir)
    tokens = [store.load(name, model=request.model) for name in request.tokens]
    prompt = resolve_prompt(request.prompt, [t.placeholder for t in tokens])
    # 2. models: the CLIP and the diffusion model conditioned on it
    clip, backbone = load_models(request.model, request.diffusion, device=request.device)
    for t in tokens:
        if t.info.width != clip.width:
            raise ValueError(f"token {t.info.name!r} has width {t.info.width}, the CLIP {request.model} {clip.width}: learn it again")
    vectors = {t.placeholder: t.vectors.to(clip.device) for t in tokens}
    # 3. generate, then write the grid atomically
    images = backbone.generate([prompt], vectors, n=request.n, negative_prompt=request.negative_prompt,
                               guidance_scale=request.guidance_scale, steps=request.steps, seed=request.seed)
    out = Path(request.out)
    sheet = grid(images)
    write_atomic(out, lambda p: sheet.save(p, format="PNG"), suffix=".png")
    return GenerateResult(out, images, prompt)
