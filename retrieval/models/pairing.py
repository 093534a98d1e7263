"""Which diffusion model pairs with which CLIP, and loading the pair once.

A diffusion model's UNet is conditioned on one CLIP text tower (Stable Diffusion 1.x on OpenAI's ViT-L/14, SD 2.x on
OpenCLIP ViT-H/14, the toy world's UNet on the toy world's CLIP): a custom token learned in that CLIP's embedding
space means something to that UNet only. The pairs are data, in `DIFFUSION_PRESETS` (each preset's "clip" field)
and in a saved folder's backbone.json; nothing here branches on a preset's name.
"""

from __future__ import annotations

import json
from pathlib import Path

from retrieval.models.clip import ModelLoadError
from retrieval.models.diffusion import DIFFUSION_PRESETS, DiffusionBackbone, load_diffusion
from retrieval.models.encoders import ClipEncoder

AUTO = "auto"  # a diffusion SPEC: the one paired with the CLIP


def paired_diffusion(model: str) -> str:
    """The first diffusion preset whose UNet is conditioned on the CLIP MODEL: ViT-L-14-quickgelu/openai -> sd14
    (SD 1.4, the paper's), ViT-H-14/laion2b_s32b_b79k -> sd21, toyworld -> toyworld, tiny-random -> tiny-random."""
    pairs = {name: diffusion_clip_spec(name) for name in DIFFUSION_PRESETS}
    for name, clip in pairs.items():
        if clip == model:
            return name
    known = sorted({clip for clip in pairs.values() if clip is not None})
    raise ModelLoadError(
        f"no diffusion model is paired with `model={model}`: pass `diffusion=SPEC` (a diffusers folder or repo whose "
        f"text encoder is this CLIP), or use a `model` with a known pair ({', '.join(known)})"
    )


def diffusion_clip_spec(diffusion: str) -> str | None:
    """The CLIP a diffusion SPEC is conditioned on, where that is known without loading it."""
    preset = DIFFUSION_PRESETS.get(diffusion, {})
    if "clip" in preset:
        return preset["clip"]
    folder = Path(preset["folder"]) if "folder" in preset else Path(diffusion)
    meta = folder / "backbone.json"
    if meta.is_file():
        return json.loads(meta.read_text()).get("clip")
    return None


def check_pair(model: str, diffusion: str | None) -> str:
    """The diffusion SPEC to load with the CLIP MODEL (None/"auto": the paired one). Refuses, before anything
    loads, a diffusion model known to be conditioned on another CLIP."""
    spec = paired_diffusion(model) if diffusion in (None, "", AUTO) else diffusion
    expected = diffusion_clip_spec(spec)
    if expected is not None and expected != model:
        raise ModelLoadError(
            f"the diffusion model {spec} is conditioned on CLIP {expected}, but `model={model}`: pass `model={expected}`, "
            f"or a `diffusion` trained on {model}"
        )
    return spec


def load_clip_encoder(model: str, device: str = "auto") -> ClipEncoder:
    """The CLIP MODEL in fp32 (token gradients need it; autocast gives mixed precision on GPU)."""
    return ClipEncoder.from_spec(model, device=device, precision="fp32")


def load_paired_diffusion(
    clip: ClipEncoder, diffusion: str | None = None, device: str = "auto", precision: str = "auto"
) -> DiffusionBackbone:
    """The diffusion model DIFFUSION (None/"auto": the one paired with clip.spec), conditioned on that same CLIP
    object."""
    return load_diffusion(check_pair(clip.spec, diffusion), clip_encoder=clip, device=device, precision=precision)


def load_models(
    model: str,
    diffusion: str | None = None,
    *,
    need_diffusion: bool = True,
    device: str = "auto",
    precision: str = "auto",
) -> tuple[ClipEncoder, DiffusionBackbone | None]:
    """(clip, backbone or None): `load_clip_encoder`, then, when NEED_DIFFUSION, `load_paired_diffusion` on it."""
    if need_diffusion:
        check_pair(model, diffusion)  # before the CLIP loads
    clip = load_clip_encoder(model, device)
    return clip, load_paired_diffusion(clip, diffusion, device, precision) if need_diffusion else None
