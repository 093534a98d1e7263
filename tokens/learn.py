"""Learn tokens: concepts' images -> CustomTokens (`learn_tokens`), and one folder -> the token store (`learn_token`;
many folders in one batch: `learn_token_batch`).

`learn_tokens` is the one token-learning sequence; `learn_token` (what `cli.py learn-token` runs) and the
benchmarks (benchmarks/pervl.py, benchmarks/token_quality.py) call it:
 1. negatives for l_CE: a concept's own, or images sampled for "image of a <parent>" (Perera et al. Sec. 4.2;
    cached, tokens.negatives);
 2. each concept prepared once (tokens.trainer.prepare_concept);
 3. all concepts trained in ONE batched loop (tokens.trainer.train_tokens), `on_step` told after every step;
 4. each result with the metadata its file carries (tokens.trainer.to_custom_token).

Steps of `learn_token`:
 1. check the request: a valid name not already taken (unless overwrite), a parent word, the config;
 2. read the concept's images (unreadable files skipped with a warning while at least `min_images` remain);
 3. load the models: the CLIP (`model`) and, when the method needs it (`needs_diffusion`), the diffusion model
    (`diffusion`; default: the one paired with `model`) conditioned on that same CLIP;
 4. `learn_tokens` on that one concept, its negatives from the `negatives` folder or sampled (cached in the store);
 5. save the token in the store (tokens.store).
`learn_token_batch` runs the same steps for many requests of one config (`cli.py learn-token` given a folder of
concept folders): every request checked in step 1, all concepts trained in one batch (or by a `Learner`, e.g. on a
Ray cluster: retrieval.distributed), each token saved.
Cancelling (`on_step` returning False) raises tokens.trainer.TrainingCancelled out of step 4: nothing is saved.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from retrieval.io.images import IMAGE_EXTENSIONS, read_image_folder
from retrieval.models import DEFAULT_MODEL
from retrieval.models.pairing import load_models
from tokens.defaults import DEFAULT_TOKENS_DIR
from tokens.methods import TokenTrainConfig, fill_prompt, model_defaults, token_train_config
from tokens.negatives import sampled_negatives
from tokens.store import TokenStore
from tokens.token_file import CustomToken, check_name
from tokens.trainer import StepReport, prepare_concept, to_custom_token, train_tokens


@dataclass
class ConceptImages:
    """One concept to learn a token for (`learn_tokens`)."""

    name: str  # token name; placeholder <name>
    parent: str  # parent word, e.g. "dress"
    images: Sequence[Image.Image]  # the concept's images
    negatives: Sequence[Image.Image] | None = None  # images of the parent for l_CE; None: sampled (ours, pt)
    seed: int | None = None  # seeds its draws; None: config.seed + its place in the list
    source: str = ""  # where the images came from (kept in the token file)
    context_attributes: tuple[str, ...] = ()  # GAIR's attribute words for it (kept in the token file)


def learn_tokens(
    clip,
    backbone,
    config: TokenTrainConfig,
    concepts: Sequence[ConceptImages],
    negatives_dir: str | Path | None,
    progress: bool = True,
    on_step: Callable[[StepReport], bool | None] | None = None,
) -> list[CustomToken]:
    """The tokens of CONCEPTS, trained together in ONE batched loop (steps in the module docstring), in their order.
    CLIP and BACKBONE are the caller's (`load_models`); BACKBONE may be None when the method needs no diffusion model
    (`TokenTrainConfig.needs_diffusion`). Negatives a concept lacks are sampled and cached in NEGATIVES_DIR.
    ON_STEP: `train_tokens`' hook, called after every optimiser step; returning False raises TrainingCancelled."""
    # 0. check inputs: a diffusion model where one is needed, negatives only where l_CE uses them
    if not concepts:
        raise ValueError("no concepts to learn tokens for")
    lacking = [c.name for c in concepts if c.negatives is None]
    if backbone is None and config.needs_diffusion(negatives_given=not lacking):
        why = "trains through it (l_SD)" if config.uses_sd else f"samples negatives with it for {', '.join(lacking)}"
        raise ValueError(f"method {config.method} {why}: pass a diffusion `backbone`, or `negatives` for every concept")
    given = [c.name for c in concepts if c.negatives is not None]
    if given and not config.uses_ce:
        raise ValueError(
            f"method {config.method} has no classification loss (l_CE), but {', '.join(given)} "
            "came with `negatives`: leave them out"
        )
    prepared = prepare_concepts(clip, backbone, config, concepts, negatives_dir)
    # 3. one batched loop for all of them
    trained = train_tokens(prepared, clip, backbone, config, progress=progress, on_step=on_step)
    # 4. the tokens with their metadata
    diffusion = backbone.spec if backbone is not None else ""
    return [
        to_custom_token(
            t,
            config,
            model=clip.spec,
            diffusion=diffusion,
            concept=p,
            concept_images=c.source,
            context_attributes=c.context_attributes,
        )
        for c, p, t in zip(concepts, prepared, trained)
    ]


@dataclass(frozen=True)
class LearnRequest:
    name: str  # token name; placeholder <name>
    images: Path  # folder of the concept's images
    parent: str  # parent word, e.g. "dress"
    method: str = "ours"  # ours | ti | pt | batex
    steps: int | None = None  # None: the method's default (tokens.methods.METHOD_DEFAULTS)
    n_vectors: int | None = None  # None: 10, or the caption's token count
    init_caption: str | None = None  # None: the parent word; "auto"; or a caption
    negatives: Path | None = None  # folder of negative images; None: sampled from the diffusion model
    model: str = DEFAULT_MODEL  # CLIP SPEC
    diffusion: str | None = None  # diffusion SPEC; None/"auto": paired with model
    tokens_dir: Path = DEFAULT_TOKENS_DIR  # the token store
    seed: int = 0
    overwrite: bool = False
    device: str = "auto"
    overrides: dict = field(default_factory=dict)  # any other TokenTrainConfig field, e.g. {"n_negatives": 4}
    context_attributes: tuple[str, ...] = ()  # GAIR's attribute words for this concept (query --attributes wins)


@dataclass
class LearnResult:
    path: Path
    token: object  # tokens.token_file.CustomToken
    skipped: list  # (path, reason) of unreadable concept / negative images

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


def needs_diffusion(request: LearnRequest) -> bool:
    """Whether `learn_token(request)` uses a diffusion model: the method trains through one (l_SD), or samples its
    l_CE negatives with one (no `negatives` folder given). A caller holding a lazily loaded one loads it only then."""
    return request_config(request).needs_diffusion(negatives_given=request.negatives is not None)


Learner = Callable[[TokenTrainConfig, list[ConceptImages], Path], list[CustomToken]]
"""Who trains a batch of concepts: (config, concepts, negatives_dir) -> their tokens in order, as `learn_tokens`
does (e.g. retrieval.distributed's Ray learner). The default trains them in this process."""


def learn_token(
    request: LearnRequest,
    progress: bool = True,
    models: tuple | None = None,
    on_step: Callable[[StepReport], bool | None] | None = None,
) -> LearnResult:
    """Learn the token REQUEST describes and save it in its store (steps in the module docstring). MODELS: the
    (clip, backbone) of `load_models` for request.model, when the caller already holds them (backbone None
    when `needs_diffusion(request)` is False). ON_STEP(StepReport) after every optimiser step: steps done / total,
    losses, seconds; returning False cancels (tokens.trainer.TrainingCancelled is raised and no file is written)."""
    return learn_token_batch([request], progress=progress, models=models, on_step=on_step)[0]


def learn_token_batch(
    requests: Sequence[LearnRequest],
    progress: bool = True,
    models: tuple | None = None,
    on_step: Callable[[StepReport], bool | None] | None = None,
    learner: Learner | None = None,
) -> list[LearnResult]:
    """Learn the tokens of REQUESTS (one config: they differ in name, images and parent only) in one batched loop
    and save each in the store, in order; the steps of `learn_token`, every check of every request done before
    anything is trained. Concept i is seeded config.seed + i, as in `learn_tokens`. LEARNER: who trains (default:
    `learn_tokens` in this process with MODELS, loaded when None); ON_STEP only with the default."""
    if not requests:
        raise ValueError("no tokens to learn: give at least one request")
    # 1. check every request before anything expensive: valid names, free (or overwrite), all of one config
    first = requests[0]
    shared = ("model", "diffusion", "tokens_dir", "device", "negatives")
    for r in requests[1:]:
        differ = [f for f in shared if getattr(r, f) != getattr(first, f)]
        if differ or request_config(r) != request_config(first):
            raise ValueError(f"{r.name}: a batch of tokens shares one config; {r.name} differs in {differ or 'config'}")
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise ValueError(f"token names repeat in one batch: {sorted(n for n in set(names) if names.count(n) > 1)}")
    store = TokenStore(first.tokens_dir)
    for r in requests:
        check_name(r.name)
        store.check_free(r.name, r.overwrite)
        if not " ".join((r.parent or "").split()):
            raise ValueError(f"{r.name}: `parent` is empty: give the concept's parent word, e.g. `parent=dress`")
    config = request_config(first)
    if first.negatives is not None and not config.uses_ce:
        raise ValueError(
            f"`negatives` is used by the classification loss only (methods ours, pt); method {config.method} has none: leave it out"
        )
    if config.init_caption is not None and first.n_vectors is not None:
        raise ValueError("`init_caption` (a caption or auto) sets one vector per caption token: leave out `n_vectors`")
    # 2. the concepts' images (and a negatives folder, shared)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skipped files are reported in the result instead
        given = read_image_folder(first.negatives, 1, "negative images") if first.negatives is not None else None
        image_sets = [read_image_folder(r.images, config.min_images, f"concept images of {r.name}") for r in requests]
    concepts = []
    for r, images in zip(requests, image_sets):
        attributes = tuple(" ".join(a.split()) for a in r.context_attributes if a.strip())
        concepts.append(
            ConceptImages(
                r.name,
                " ".join(r.parent.split()),
                images.images,
                given.images if given else None,
                source=str(Path(r.images).resolve()),
                context_attributes=attributes or tuple(model_defaults(r.model).get("context_attributes", ())),
            )
        )
    # 3. + 4. train (negatives sampled into the store's cache when no folder is given; Perera et al. Sec. 4.2, 5)
    if learner is None:
        learner = _local_learner(first, config, models, progress, on_step)
    elif on_step is not None or models is not None:
        raise ValueError("`on_step` and `models` are for the local learner: leave them out with `learner`")
    tokens = learner(config, concepts, store.negatives_dir)
    # 5. save
    skipped = [s.skipped + (given.skipped if given else []) for s in image_sets]
    return [LearnResult(store.save(t, overwrite=r.overwrite), t, k) for r, t, k in zip(requests, tokens, skipped)]


def _local_learner(request: LearnRequest, config: TokenTrainConfig, models, progress: bool, on_step) -> Learner:
    """`learn_tokens` in this process, with MODELS or the models REQUEST names (loaded when called)."""

    def learn(config: TokenTrainConfig, concepts: list[ConceptImages], negatives_dir: Path) -> list[CustomToken]:
        clip, backbone = models or load_models(
            request.model,
            request.diffusion,
            need_diffusion=needs_diffusion(request),
            device=request.device,
            precision=config.precision,
        )
        if clip.spec != request.model:
            raise ValueError(
                f"the CLIP passed in is `model={clip.spec}`, but the request has `model={request.model}`: "
                "pass the models loaded for the request's model, or none"
            )
        return learn_tokens(clip, backbone, config, concepts, negatives_dir, progress=progress, on_step=on_step)

    return learn


def concept_folders(root: str | Path) -> list[Path]:
    """The concept folders of ROOT for `learn_token_batch`: its sub-folders that hold image files directly, sorted
    by name; [] when ROOT holds images itself (then it is one concept's folder) or has no such sub-folder."""
    root = Path(root)
    if not root.is_dir():
        return []

    def has_images(folder: Path) -> bool:
        return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())

    if has_images(root):
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and has_images(p))


def prepare_concepts(
    clip, backbone, config: TokenTrainConfig, concepts: Sequence[ConceptImages], negatives_dir: str | Path | None
) -> list:
    """Steps 1-2 of `learn_tokens`: each concept's negatives (its own, or sampled and cached in NEGATIVES_DIR) and
    what training reuses every step (`tokens.trainer.prepare_concept`), in the order of CONCEPTS."""
    prepared = []
    for i, c in enumerate(concepts):
        # 1. negatives of l_CE: the concept's own, or sampled for "image of a <parent>" (Perera et al. Sec. 4.2, x')
        negatives = c.negatives
        if config.uses_ce and negatives is None:
            prompt = fill_prompt(config.class_template, "", c.parent)
            negatives = sampled_negatives(
                backbone,
                prompt,
                config.n_negatives,
                config.seed,
                config.negative_steps,
                config.negative_guidance,
                negatives_dir,
            ).images
        # 2. what training reuses every step, computed once
        seed = config.seed + i if c.seed is None else c.seed
        prepared.append(prepare_concept(c.name, c.parent, c.images, clip, backbone, config, negatives, seed=seed))
    return prepared
