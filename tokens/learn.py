"""Learn one token end to end, from a folder of images to a file in the token store (what `cli.py learn-token` runs).

Steps of `learn_token`:
 1. check the request: a valid name not already taken (unless overwrite), a parent word, the config;
 2. read the concept's images (unreadable files skipped with a warning while at least `min_images` remain);
 3. load the models: the CLIP (--model) and, when the method needs it, the diffusion model (--diffusion; default:
    the one paired with --model) conditioned on that same CLIP;
 4. negatives for l_CE: a user folder, or images sampled for "image of a <parent>" (cached in the store);
 5. prepare and train (tokens.trainer), then save the token with its metadata (tokens.token_file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.models.encoders import ClipEncoder
from retrieval.models.pairing import load_models
from tokens.methods import TokenTrainConfig, fill_prompt, model_defaults, token_train_config
from retrieval.io.images import read_image_folder
from tokens.negatives import sampled_negatives
from tokens.store import TokenStore
from tokens.token_file import check_name
from tokens.trainer import prepare_concept, to_custom_token, train_tokens

DEFAULT_TOKEN_MODEL = "ViT-L-14-quickgelu/openai"  # the text tower of Stable Diffusion 1.x (ENVIRONMENT.md)
DEFAULT_TOKENS_DIR = Path("custom_tokens")


@dataclass(frozen=True)
class LearnRequest:
    name: str                                   # token name; placeholder <name>
    images: Path                                # folder of the concept's images
    parent: str                                 # parent word, e.g. "dress"
    method: str = "ours"                        # ours | ti | pt | batex
    steps: int | None = None                    # None: the method's default (tokens.methods.METHOD_DEFAULTS)
    n_vectors: int | None = None                # None: 10, or the caption's token count
    init_caption: str | None = None             # None: the parent word; "auto"; or a caption
    negatives: Path | None = None               # folder of negative images; None: sampled from the diffusion model
    model: str = DEFAULT_TOKEN_MODEL            # CLIP SPEC
    diffusion: str | None = None                # diffusion SPEC; None/"auto": paired with model
    tokens_dir: Path = DEFAULT_TOKENS_DIR       # the token store
    seed: int = 0
    overwrite: bool = False
    device: str = "auto"
    overrides: dict = field(default_factory=dict)  # any other TokenTrainConfig field, e.g. {"n_negatives": 4}
    context_attributes: tuple[str, ...] = ()    # GAIR's attribute words for this concept (query --attributes wins)


@dataclass
class LearnResult:
    path: Path
    token: object                               # tokens.token_file.CustomToken
    skipped: list                               # (path, reason) of unreadable concept / negative images

    def format(self) -> str:
        info, t = self.token.info, self.token.info.training
        lines = [
            f"learned token {info.name!r} ({info.placeholder}, {info.n_vectors} vectors, method {info.method}) -> {self.path}",
            f"  parent {info.parent!r}; init {info.init.get('kind')}: {info.init.get('text')!r}; model {info.model}"
            + (f"; diffusion {info.diffusion}" if info.diffusion else ""),
            f"  {t['steps']} steps in {t['seconds']:.1f} s; last l_SD {t['last_l_sd']:.4f}, l_CE {t['last_l_ce']:.4f}, L {t['last_loss']:.4g}",
        ]
        if t.get("stopped_early"):
            lines.append(f"  STOPPED EARLY: {t['reason']}")
        for p, reason in self.skipped:
            lines.append(f"  warning: skipped unreadable image {p}: {reason}")
        lines.append(f'  use it: generate "a photo of a * {info.parent} on a beach" --token {info.name}')
        return "\n".join(lines)


def request_config(request: LearnRequest) -> TokenTrainConfig:
    known = model_defaults(request.model)  # prompt templates in the CLIP's own language (tokens.methods.MODEL_DEFAULTS)
    overrides = {**{k: known[k] for k in ("sd_templates", "class_template") if k in known}, **request.overrides}
    if request.steps is not None:
        overrides["steps"] = request.steps
    if request.n_vectors is not None:
        overrides["n_vectors"] = request.n_vectors
    if request.init_caption is not None:
        overrides["init_caption"] = request.init_caption
    return token_train_config(request.method, seed=request.seed, **overrides)


def learn_token(request: LearnRequest, progress: bool = True, models: tuple | None = None) -> LearnResult:
    """Learn the token REQUEST describes and save it in its store (steps in the module docstring). MODELS: the
    (clip, backbone) of `load_models` for request.model, when the caller already holds them."""
    import warnings

    # 1. check the request before anything expensive
    check_name(request.name)
    store = TokenStore(request.tokens_dir)
    store.check_free(request.name, request.overwrite)
    parent = " ".join((request.parent or "").split())
    if not parent:
        raise ValueError("--parent is empty: give the concept's parent word, e.g. --parent dress")
    config = request_config(request)
    caption = config.init_caption
    if request.negatives is not None and not config.uses_ce:
        raise ValueError(f"--negatives is used by the classification loss only (methods ours, pt); method {config.method} has none: leave it out")
    if caption is not None and request.n_vectors is not None:
        raise ValueError("--init-caption (a caption or auto) sets one vector per caption token: leave out --vectors")
    # 2. the concept's images (and a negatives folder)
    skipped = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped files are reported in the result instead
        images = read_image_folder(request.images, config.min_images, "concept images")
        given_negatives = read_image_folder(request.negatives, 1, "negative images") if request.negatives and config.uses_ce else None
    skipped += images.skipped + (given_negatives.skipped if given_negatives else [])
    # 3. models
    need_diffusion = config.uses_sd or (config.uses_ce and given_negatives is None)
    clip, backbone = models or load_models(request.model, request.diffusion, need_diffusion=need_diffusion, device=request.device, precision=config.precision)
    # 4. negatives of l_CE
    negatives = None
    if config.uses_ce:
        if given_negatives is not None:
            negatives = given_negatives.images
        else:
            prompt = fill_prompt(config.class_template, "", parent)
            negatives = sampled_negatives(backbone, prompt, config.n_negatives, config.seed, config.negative_steps,
                                          config.negative_guidance, store.negatives_dir).images
    # 5. prepare, train, save
    concept = prepare_concept(request.name, parent, images.images, clip, backbone, config, negatives, seed=config.seed)
    trained = train_tokens([concept], clip, backbone, config, progress=progress)[0]
    token = to_custom_token(trained, config, model=request.model, diffusion=backbone.spec if backbone is not None else "",
                            concept=concept, concept_images=str(Path(request.images).resolve()),
                            context_attributes=[" ".join(a.split()) for a in request.context_attributes if a.strip()]
                            or list(model_defaults(request.model).get("context_attributes", ())))
    path = store.save(token, overwrite=request.overwrite)
    return LearnResult(path, token, skipped)
