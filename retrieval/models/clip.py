"""One factory that turns a model SPEC string into a loaded open_clip CLIP model.

SPEC forms (`--model SPEC`):
- ``NAME/PRETRAINED``      open_clip architecture + pretrained tag, e.g. ``ViT-L-14-quickgelu/openai``
                           (the text tower Stable Diffusion 1.x is conditioned on). Weights come from the
                           Hugging Face cache, downloaded on first use.
- ``NAME/PATH``            open_clip architecture + a local checkpoint file (.safetensors, .pt, .bin).
- ``NAME/random``          the architecture with seeded random weights: for timing only, useless for search.
- ``hf-hub:ORG/REPO``      an open_clip model published on the Hugging Face hub.
- ``PATH`` / ``local-dir:PATH``  a local folder with ``open_clip_config.json`` and weights (what
                           :func:`save_model_folder` writes; also the layout of hub repos).
- a preset name (``tiny-random``, ...): see ``PRESETS``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from retrieval.io.atomic import replace_dir
from retrieval.models import DEFAULT_MODEL  # noqa: E402  (the one definition; re-exported here)

# the synthetic world's trained models (package data; remade by `python -m benchmarks.world.train`)
TOYWORLD_WEIGHTS = Path(__file__).resolve().parent / "weights" / "toyworld"

# A tiny CLIP, random and seeded: builds in milliseconds, for smoke tests and the no-download demo.
# It keeps the real tokenizer's 49408-row vocabulary and 77-token context, so placeholder tokens and
# padding behave exactly as on a real CLIP. Its search results are meaningless.
TINY_MODEL_CFG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}

# Named presets are data: a model config built with random weights, or a folder shipped with the project.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-random": {"model_cfg": TINY_MODEL_CFG, "seed": 0},
    # the toy world's CLIP (recipe toyworld-v2, world pervl-v2-views), trained from scratch and committed
    "toyworld": {
        "folder": TOYWORLD_WEIGHTS / "clip",
        "train": "python -m benchmarks.world.train --preset toyworld-v2 (both models: the CLIP, then its diffusion model)",
    },
}

WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "open_clip_model.pt")


class ModelLoadError(RuntimeError):
    """A model SPEC that cannot be loaded; the message says how to provide it."""


@dataclass
class LoadedClip:
    """A CLIP model with what is needed to use it."""

    model: torch.nn.Module  # open_clip.CLIP, eval mode
    preprocess: Callable  # PIL image -> (3, H, W) float tensor
    tokenizer: Any  # open_clip SimpleTokenizer (or HFTokenizer)
    spec: str  # the SPEC it was loaded from, as given
    model_cfg: dict = field(default_factory=dict)  # architecture config (what open_clip_config.json holds)


def parse_spec(spec: str) -> tuple[str, str, str | None]:
    """SPEC -> (kind, name, pretrained); kind in preset | local-dir | hf-hub | open_clip."""
    if not spec or not spec.strip():
        raise ModelLoadError("empty `model`; give e.g. ViT-L-14-quickgelu/openai, a folder, or tiny-random")
    spec = spec.strip()
    if spec in PRESETS:
        return "preset", spec, None
    if spec.startswith("local-dir:"):
        return "local-dir", spec[len("local-dir:") :], None
    if spec.startswith("hf-hub:"):
        return "hf-hub", spec, None
    if os.path.isdir(spec):
        return "local-dir", spec, None
    name, _, pretrained = spec.partition("/")
    return "open_clip", name, pretrained or None


def model_folder(spec: str) -> Path | None:
    """The folder SPEC loads from (a folder, `local-dir:`, or a preset that ships one, such as `toyworld`); None for
    the other kinds (open_clip names, hub repos, seeded random presets)."""
    kind, name, _ = parse_spec(spec)
    if kind == "preset":
        folder = PRESETS[name].get("folder")
        return Path(folder) if folder else None
    return Path(name) if kind == "local-dir" else None


def weights_id(spec: str) -> str:
    """sha256 (16 hex digits) of the weights file behind SPEC where SPEC is a model folder (a folder, `local-dir:`,
    or a preset that ships one, such as `toyworld`); "" where the name itself pins the weights (open_clip pretrained
    tags, hub repos, seeded random presets) or SPEC is not loadable. Token files and index manifests record it next
    to the SPEC, so that a folder retrained or replaced in place is refused instead of silently mixing two
    embedding spaces under one name. ARCH/path/to/checkpoint hashes that file. Cached per file (path, size, mtime):
    a check costs one stat."""
    try:
        kind, _, pretrained = parse_spec(spec)
        folder = model_folder(spec)
    except ModelLoadError:
        return ""
    files = [folder / f for f in WEIGHT_FILES] if folder else []
    if kind == "open_clip" and pretrained and os.path.isfile(pretrained):
        files = [Path(pretrained)]
    for path in files:
        if path.is_file():
            stat = path.stat()
            return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    return ""


def weights_changed(spec: str, recorded: str) -> str:
    """The weights id now behind SPEC when it differs from RECORDED (a model folder retrained or replaced in place);
    "" when they match, or when nothing was recorded (a file from before the field, or a SPEC that pins its weights).
    The one check behind token files' and index manifests' `model_weights`."""
    now = weights_id(spec) if recorded else ""
    return now if now and now != recorded else ""


@functools.lru_cache(maxsize=64)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """sha256 of a file's bytes (16 hex digits); SIZE and MTIME_NS key the cache."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _build_random(model_cfg: dict, seed: int) -> torch.nn.Module:
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        cfg = json.loads(json.dumps(model_cfg))  # deep copy: open_clip mutates its configs
        return open_clip.model.CLIP(**cfg)


def _transform_for(model: torch.nn.Module, preprocess_cfg: dict | None = None) -> Callable:
    import open_clip

    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    cfg.update(preprocess_cfg or {})
    cfg.setdefault("size", model.visual.image_size)
    pp = open_clip.transform.PreprocessCfg(
        **{k: v for k, v in cfg.items() if k in open_clip.transform.PreprocessCfg.__dataclass_fields__}
    )
    return open_clip.transform.image_transform_v2(pp, is_train=False)


def _offline_hint(spec: str) -> str:
    return (
        f"could not load CLIP weights for `model={spec}`. Weights are downloaded from the Hugging Face hub on "
        "first use; this machine is offline or the files are not cached. Fix: run once where the hub is "
        "reachable (they land in ~/.cache/huggingface, then set HF_HUB_OFFLINE=1), or copy the model to a folder "
        "with open_clip_config.json + open_clip_model.safetensors and pass `model=/path/to/folder`, or pass a "
        "checkpoint file as `model=ARCH/path/to/weights.safetensors`. For a download-free smoke test use "
        "`model=tiny-random`."
    )


def load_clip(spec: str = DEFAULT_MODEL, device: str | torch.device = "cpu", precision: str = "fp32") -> LoadedClip:
    """Load a CLIP model from SPEC (see module docstring). Errors are ModelLoadError with a fix."""
    import open_clip

    kind, name, pretrained = parse_spec(spec)
    model_cfg: dict = {}
    try:
        if kind == "preset":
            preset = PRESETS[name]
            if "folder" in preset:
                if not Path(preset["folder"]).is_dir():
                    raise ModelLoadError(
                        f"the {name} model folder {preset['folder']} is missing; train it: {preset['train']}"
                    )
                # a preset that is a shipped folder keeps its short name as its spec
                return dataclasses.replace(load_clip(str(preset["folder"]), device, precision), spec=spec)
            model_cfg = preset["model_cfg"]
            model = _build_random(model_cfg, preset.get("seed", 0))
            preprocess = _transform_for(model)
            tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=model_cfg["text_cfg"]["context_length"])
        elif kind == "local-dir":
            folder = Path(name)
            config_path = folder / "open_clip_config.json"
            if not config_path.is_file():
                raise ModelLoadError(
                    f"{folder} has no open_clip_config.json: a model folder holds open_clip_config.json "
                    f"(keys model_cfg, preprocess_cfg) and one of {', '.join(WEIGHT_FILES)}"
                )
            if not any((folder / f).is_file() for f in WEIGHT_FILES):
                raise ModelLoadError(f"{folder} has a config but no weights: expected one of {', '.join(WEIGHT_FILES)}")
            model_cfg = json.loads(config_path.read_text()).get("model_cfg", {})
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
            tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        elif kind == "hf-hub":
            model, _, preprocess = open_clip.create_model_and_transforms(name)
            tokenizer = open_clip.get_tokenizer(name)
        else:
            if name not in open_clip.list_models():
                raise ModelLoadError(
                    f"unknown open_clip architecture {name!r} in `model={spec}`. Known: "
                    f"{', '.join(open_clip.list_models()[:12])}, ... (open_clip.list_models()); or pass a folder"
                )
            if pretrained is None:
                tags = [t for m, t in open_clip.list_pretrained() if m == name]
                example = f"{name}/{tags[0]}" if tags else f"{name}/path/to/checkpoint"
                raise ModelLoadError(
                    f"`model={spec}` names no weights: use e.g. {example} (tags: {', '.join(tags) or 'none published'}), "
                    f"{name}/path/to/checkpoint, or {name}/random (timing only)"
                )
            model_cfg = open_clip.get_model_config(name) or {}
            if pretrained == "random":
                model = _build_random(model_cfg, 0)
                preprocess = _transform_for(model)
            else:
                model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
            tokenizer = open_clip.get_tokenizer(name)
    except ModelLoadError:
        raise
    except (RuntimeError, OSError, ValueError) as e:
        raise ModelLoadError(f"{_offline_hint(spec)}\n(cause: {str(e).splitlines()[0][:300]})") from e

    model = model.to(device=device, dtype=_dtype(precision)).eval()
    model.requires_grad_(False)
    return LoadedClip(model=model, preprocess=preprocess, tokenizer=tokenizer, spec=spec, model_cfg=model_cfg)


def _dtype(precision: str) -> torch.dtype:
    try:
        return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    except KeyError:
        raise ModelLoadError(f"unknown precision {precision!r}: use fp32, fp16 or bf16") from None


def save_model_folder(
    model: torch.nn.Module, model_cfg: dict, folder: str | Path, preprocess_cfg: dict | None = None
) -> Path:
    """Write MODEL as a folder that `load_clip(folder)` (and open_clip's local-dir:) loads.

    Layout: open_clip_config.json {"model_cfg", "preprocess_cfg"} + open_clip_model.safetensors.
    Written to a temporary folder first, then renamed: a crash leaves no half-written model.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "open_clip_model.safetensors"))
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    return replace_dir(tmp, folder)
