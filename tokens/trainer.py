"""The token trainer: many concepts' tokens in one batched loop, every step in plain sight.

    concepts = [prepare_concept(name, parent, images, clip, backbone, config, negatives, seed=i) for ...]
    trained = train_tokens(concepts, clip, backbone, config)        # one forward per step for all of them

Preparation (`prepare_concept`) computes once what never changes: the concept images' diffusion latents and
CLIP features, the negatives' CLIP features, the initial vectors, and the method's constraint (the attribute
subspace of `ours`, the vocabulary basis of `batex`). The loop (`train_tokens`) then, per step:
 1. forms every concept's token vectors from the ONE parameter tensor (C concepts stacked);
 2. l_SD: draws each concept's batch (images, prompts, noise, timesteps) from that concept's own generator and
    runs ONE text-encoder forward and ONE UNet forward for all C x batch rows;
 3. l_CE: ONE text forward for all C class prompts, against the precomputed image features;
 4. sums L_c = lambda_SD l_SD,c + lambda_CE l_CE,c (Perera et al. Sec. 4.2) over the concepts; a concept whose
    L_c is not finite stops and keeps its last good vectors, the others go on;
 5. one Adam step, logging, the progress bar (each loss term), and the caller's `on_step(StepReport)`: its
    progress, and its way to cancel (returning False raises `TrainingCancelled`: no token results, none is saved).
Where one forward for all concepts does not fit in memory (Stable Diffusion at 512 px: ~4 rows per concept),
`concepts_per_forward` splits steps 1-4 into chunks of concepts whose gradients accumulate before the one Adam
step: the same result, more forwards.

Batched training equals training each concept alone with the same seed (up to float rounding, tested): each
concept draws from its own generator, the gradient of sum_c L_c with respect to concept c's numbers is that of
L_c alone, and Adam is element-wise (no gradient clipping, which would couple concepts). Only the models'
numerics of a larger batch differ (~1e-6).
Frozen: the CLIP (its embedding table included) and the UNet are never changed; their weights are set not to
require gradients during training (restored after), so backward computes gradients for the tokens only.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from retrieval.models.clip import weights_id
from retrieval.models.diffusion import pil_to_pixels
from retrieval.models.precision import autocast
from tokens.attributes import ATTRIBUTES
from tokens.initialization import Initialization, initialize
from tokens.methods import (
    BasisCombination,
    FreeVectors,
    SubspaceVectors,
    TokenTrainConfig,
    attribute_scores,
    balanced_bce,
    class_logits,
    fill_prompt,
    nearest_vocabulary_basis,
    pca_basis,
    word_embeddings,
)
from tokens.token_file import CustomToken, TokenInfo, placeholder_for


# ----- what is computed once per concept
@dataclass(frozen=True)
class Subspace:
    """ours: the affine subspace mu + span(basis) of the K attributes most correlated with the concept (Perera et al.
    Sec. 4.3; K: Sec. 5)."""

    basis: torch.Tensor  # (width, r) orthonormal principal directions
    mean: torch.Tensor  # (width,) mean attribute embedding, mu
    words: tuple[str, ...]  # the K attributes, most correlated first

    def describe(self) -> dict:
        return {
            "kind": "attribute-pca",
            "k": len(self.words),
            "dim": int(self.basis.shape[1]),
            "words": list(self.words),
            "source": "Perera et al. Sec. 4.3: token = P(e - mu) + mu",
        }


@dataclass(frozen=True)
class VocabularyBasis:
    """batex: one basis per distinct initial vector; vector j of the token uses bases[which[j]]."""

    bases: torch.Tensor  # (U, M, width); row 0 of each is its initial vector
    which: torch.Tensor  # (n,) long
    neighbours: tuple[tuple[str, ...], ...]  # per basis, the first vocabulary words after the initial vector

    def describe(self) -> dict:
        return {
            "kind": "batex-basis",
            "m": int(self.bases.shape[1]),
            "n_bases": int(self.bases.shape[0]),
            "nearest_words": [list(w) for w in self.neighbours],
            "source": "BaTex: coefficients over the M nearest embeddings",  # Du et al. Sec. 3.2-3.3, Eq. 7
        }


@dataclass
class ConceptData:
    """One concept, ready to train."""

    name: str  # token name; the placeholder is <name>
    parent: str  # parent word
    init: Initialization  # initial vectors (n, width)
    image_features: torch.Tensor  # (N, dim) normalised CLIP features of the concept images
    latents: torch.Tensor | None  # (N, C, h, w) diffusion latents of them (methods with l_SD)
    negative_features: torch.Tensor | None  # (K, dim) normalised CLIP features of negatives (methods with l_CE)
    seed: int  # seeds this concept's draws
    subspace: Subspace | None = None  # ours
    basis: VocabularyBasis | None = None  # batex

    @property
    def placeholder(self) -> str:
        return placeholder_for(self.name)

    @property
    def n_vectors(self) -> int:
        return int(self.init.vectors.shape[0])

    def constraint(self) -> dict:
        if self.subspace is not None:
            return self.subspace.describe()
        if self.basis is not None:
            return self.basis.describe()
        return {"kind": "none"}


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square and resize to SIZE x SIZE (what the diffusion model generates). No augmentation
    (diffusers' textual-inversion example flips at random); the papers say nothing about it."""
    return ImageOps.fit(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)


def _vocabulary_basis(clip, init: torch.Tensor, m: int) -> VocabularyBasis:
    table = clip.token_embedding.weight.detach().float().cpu()
    tok = clip.tokenizer
    distinct, which = torch.unique(init, dim=0, return_inverse=True)  # a parent-initialised token: one basis
    bases, neighbours = [], []
    for v in distinct:
        basis, ids = nearest_vocabulary_basis(table, v, m, exclude_ids=(tok.sot_token_id, tok.eot_token_id))
        bases.append(basis)
        neighbours.append(tuple(tok.decode([i]).strip() for i in ids[:8]))
    return VocabularyBasis(torch.stack(bases), which.long(), tuple(neighbours))


@torch.no_grad()
def prepare_concept(
    name: str,
    parent: str,
    images: Sequence[Image.Image],
    clip,
    backbone,
    config: TokenTrainConfig,
    negatives: Sequence[Image.Image] | None = None,
    seed: int | None = None,
    attributes: Sequence[str] = ATTRIBUTES,
) -> ConceptData:
    """Everything about one concept that training reuses every step, computed once."""
    # 1. check inputs
    if not parent or not parent.strip():
        raise ValueError("a parent word is needed, e.g. `parent=dress`")
    parent = " ".join(parent.split())
    if len(images) < config.min_images:
        raise ValueError(f"concept {name!r}: {len(images)} images; at least {config.min_images} are needed")
    if config.uses_sd and backbone is None:
        raise ValueError(
            f"method {config.method} trains through a diffusion model (lambda_sd > 0): pass one as `backbone`"
        )
    if config.uses_ce and not negatives:
        raise ValueError(
            f"method {config.method} needs negative images of the parent (lambda_ce > 0): pass them as `negatives`"
        )
    seed = config.seed if seed is None else seed
    # 2. CLIP features of the concept's images and of the negatives
    image_features = torch.from_numpy(clip.encode_pil(list(images)))  # (N, dim), normalised
    negative_features = torch.from_numpy(clip.encode_pil(list(negatives))) if config.uses_ce else None
    # 3. diffusion latents of the concept's images (one posterior sample each, for a VAE, drawn once here: z ~ E(x)
    #    of Perera et al. Sec. 3's l_DM is not redrawn every step, as diffusers' textual-inversion example does)
    latents = None
    if config.uses_sd:
        pixels = pil_to_pixels([fit_square(im, backbone.image_size) for im in images])  # (N, 3, H, W) in [-1, 1]
        latents = backbone.encode_images(pixels, torch.Generator(device="cpu").manual_seed(seed))
    # 4. initial vectors, then the method's constraint on them
    init = initialize(clip, parent, config, image_features, attributes)
    subspace = basis = None
    if config.method == "ours":
        # Perera et al. Sec. 5: the K = 100 attributes "that correlated most with the given concept in the CLIP space"
        # (K scaled with the text width, `TokenTrainConfig.k_for`); Sec. 4.3: PCA of their averaged embeddings
        k = min(config.k_for(clip.width), len(attributes))
        scores = attribute_scores(clip, image_features, parent, attributes, config.class_template)  # (A,)
        words = tuple(attributes[i] for i in scores.argsort(descending=True)[:k].tolist())
        # u (width, r): r = rank <= K - 1, or config.subspace_rank when lower (the paper gives no dimension)
        u, mu = pca_basis(word_embeddings(clip, words), rank=config.subspace_rank)
        subspace = Subspace(u, mu, words)
    elif config.method == "batex":
        basis = _vocabulary_basis(clip, init.vectors, config.m_for(clip.width))  # BaTex Algorithm 1
    return ConceptData(name, parent, init, image_features, latents, negative_features, seed, subspace, basis)


# ----- the losses of one step
@dataclass
class SdBatch:
    prompts: list[str]  # C * B prompts, concept-major
    latents: torch.Tensor  # (C * B, C_lat, h, w)
    noise: torch.Tensor  # same shape
    timesteps: torch.Tensor  # (C * B,)


def draw_sd_batch(
    concepts: Sequence[ConceptData],
    generators: Sequence[torch.Generator],
    config: TokenTrainConfig,
    num_train_timesteps: int,
    device,
) -> SdBatch:
    """Each concept's B (image, prompt, noise, timestep) draws, from its own generator, in a fixed order: the
    expectation over z, eta, t of Perera et al. Sec. 3's l_DM (t uniform over the training timesteps)."""
    B, prompts, latents, noise, timesteps = config.batch_size, [], [], [], []
    for c, g in zip(concepts, generators):
        images = torch.randint(len(c.latents), (B,), generator=g)
        templates = torch.randint(len(config.sd_templates), (B,), generator=g)
        z = c.latents[images.to(c.latents.device)]
        noise.append(torch.randn(z.shape, generator=g).to(device))
        timesteps.append(torch.randint(0, num_train_timesteps, (B,), generator=g).to(device))
        latents.append(z.to(device))
        prompts += [fill_prompt(config.sd_templates[i], c.placeholder, c.parent) for i in templates.tolist()]
    return SdBatch(prompts, torch.cat(latents), torch.cat(noise), torch.cat(timesteps))


@dataclass
class ClassData:
    """What l_CE needs, fixed during training: per concept, its images' and negatives' features and labels."""

    features: list[torch.Tensor]  # per concept (N + K, dim): positives then negatives
    labels: list[torch.Tensor]  # per concept (N + K,) bool
    parent_features: torch.Tensor  # (C, dim) normalised features of "image of a <parent>"
    scale: float  # CLIP's logit scale exp(t)

    def subset(self, idx: Sequence[int]) -> "ClassData":
        return ClassData(
            [self.features[i] for i in idx], [self.labels[i] for i in idx], self.parent_features[list(idx)], self.scale
        )


@torch.no_grad()
def class_data(concepts: Sequence[ConceptData], clip, config: TokenTrainConfig) -> ClassData:
    device = clip.device
    features = [torch.cat([c.image_features, c.negative_features]).to(device) for c in concepts]
    labels = [
        torch.cat([torch.ones(len(c.image_features)), torch.zeros(len(c.negative_features))]).bool().to(device)
        for c in concepts
    ]
    parent_prompts = [fill_prompt(config.class_template, "", c.parent) for c in concepts]  # 'image of a c', Sec. 4.2
    parent_features = torch.from_numpy(clip.encode_texts(parent_prompts)).to(device)
    return ClassData(features, labels, parent_features, float(clip.model.logit_scale.exp()))


def step_losses(
    vectors: dict[str, torch.Tensor],
    concepts: Sequence[ConceptData],
    clip,
    backbone,
    config: TokenTrainConfig,
    sd_batch: SdBatch | None,
    ce: ClassData | None,
    mixed,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_SD (C,), l_CE (C,)) of every concept for the given vectors; zeros for a term the method does not use."""
    C = len(concepts)
    l_sd = torch.zeros(C, device=clip.device)
    l_ce = torch.zeros(C, device=clip.device)
    if sd_batch is not None:
        cond = backbone.conditioning(sd_batch.prompts, vectors)  # ONE text forward, (C * B, 77, width)
        rows = backbone.training_loss(
            sd_batch.latents, cond, noise=sd_batch.noise, timesteps=sd_batch.timesteps, reduction="none"
        )  # ONE UNet forward
        l_sd = rows.view(C, -1).mean(1)
    if ce is not None:  # Perera et al. Sec. 4.2: tau_* of 'image of a * c' against the fixed tau_parent
        prompts = [fill_prompt(config.class_template, c.placeholder, c.parent) for c in concepts]
        with mixed():
            _, token_features, _ = clip.text_features(prompts, vectors)  # ONE text forward, (C, dim) normalised
        l_ce = torch.stack(
            [
                balanced_bce(
                    class_logits(ce.features[i], token_features[i].to(ce.features[i]), ce.parent_features[i], ce.scale),
                    ce.labels[i],
                )
                for i in range(C)
            ]
        )
    return l_sd, l_ce


# ----- training
@dataclass
class TrainedToken:
    name: str
    parent: str
    vectors: torch.Tensor  # (n, width) float32 on the CPU: the token's effective embeddings
    init: Initialization
    constraint: dict  # subspace / basis description
    summary: dict  # steps run, losses, time, early stop
    history: list[dict] = field(default_factory=list)  # {"step", "l_sd", "l_ce", "loss"} every log_every steps


@dataclass(frozen=True)
class StepReport:
    """What `train_tokens` tells its `on_step` after each optimiser step: losses are means over the concepts still
    training (those of the progress bar)."""

    step: int  # optimiser steps done: 1 after the first, `steps` after the last
    steps: int  # optimiser steps asked (config.steps)
    l_sd: float  # l_SD this step
    l_ce: float  # l_CE this step
    loss: float  # L = lambda_SD l_SD + lambda_CE l_CE this step
    seconds: float  # since the loop started: seconds / step * (steps - step) is the time left
    # () -> (C, n_max, width) float32 on the CPU: every concept's effective token vectors now, exactly those a
    # training of `step` steps would return (constant lr, per-step draws), so one run gives a convergence curve
    vectors: Callable[[], torch.Tensor] = field(repr=False, compare=False)


class TrainingCancelled(Exception):
    """`train_tokens` stopped because its `on_step` returned False. Raised rather than returning the tokens so far:
    a cancelled training yields no token, and `tokens.learn.learn_token` writes no file."""

    def __init__(self, step: int, steps: int):
        super().__init__(f"training cancelled by on_step after step {step} of {steps}: no token was kept")
        self.step, self.steps = step, steps


@contextlib.contextmanager
def _frozen(*modules):
    """Weights not requiring gradients for the duration (restored after): backward then reaches only the token."""
    saved = [(p, p.requires_grad) for m in modules if m is not None for p in m.parameters()]
    for p, _ in saved:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _trainable(concepts: Sequence[ConceptData], config: TokenTrainConfig, width: int, device):
    """The method's parameter holder for all C concepts (vectors zero-padded to the longest token)."""
    C, n_max = len(concepts), max(c.n_vectors for c in concepts)
    init = torch.zeros(C, n_max, width)
    for i, c in enumerate(concepts):
        init[i, : c.n_vectors] = c.init.vectors
    if config.method == "ours":
        r_max = max(c.subspace.basis.shape[1] for c in concepts)
        basis = torch.zeros(C, width, r_max)
        for i, c in enumerate(concepts):
            basis[i, :, : c.subspace.basis.shape[1]] = c.subspace.basis
        mean = torch.stack([c.subspace.mean for c in concepts])
        return SubspaceVectors(init.to(device), basis.to(device), mean.to(device))
    if config.method == "batex":
        bases, which, offset = [], torch.zeros(C, n_max, dtype=torch.long), 0
        for i, c in enumerate(concepts):
            which[i, : c.n_vectors] = c.basis.which + offset
            which[i, c.n_vectors :] = offset  # padding rows: any basis of the concept; never used
            bases.append(c.basis.bases)
            offset += c.basis.bases.shape[0]
        return BasisCombination(torch.cat(bases).to(device), which.to(device))
    return FreeVectors(init.to(device))


def train_tokens(
    concepts: Sequence[ConceptData],
    clip,
    backbone,
    config: TokenTrainConfig,
    progress: bool = True,
    log_every: int = 10,
    on_step: Callable[[StepReport], bool | None] | None = None,
) -> list[TrainedToken]:
    """Train every concept's token together (see the module docstring). CLIP and the backbone are passed in;
    the backbone must condition on this very CLIP (`load_diffusion(spec, clip_encoder=clip)`).
    ON_STEP(StepReport) is called after every optimiser step (not after a step at which every concept stopped on a
    non-finite loss); when it returns False, training stops there and `TrainingCancelled` is raised, so that a
    cancelled run yields no token (None or True: go on). It only observes: the numbers are those without it."""
    # 1. check inputs
    if not concepts:
        raise ValueError("no concepts to train")
    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise ValueError(f"concept names must be distinct, got {names}")
    if config.uses_sd:
        if backbone is None:
            raise ValueError(f"method {config.method} needs a diffusion model (lambda_sd > 0)")
        if backbone.clip is not clip:
            raise ValueError(
                "the diffusion backbone conditions on another CLIP object: load it with "
                "load_diffusion(spec, clip_encoder=clip) so that one text encoder serves both losses"
            )
        if any(c.latents is None for c in concepts):
            raise ValueError("concepts were prepared without latents: prepare them with a config whose lambda_sd > 0")
    if config.uses_ce and any(c.negative_features is None for c in concepts):
        raise ValueError("concepts were prepared without negatives: prepare them with a config whose lambda_ce > 0")
    if (
        config.method == "ours"
        and any(c.subspace is None for c in concepts)
        or config.method == "batex"
        and any(c.basis is None for c in concepts)
    ):
        raise ValueError(
            f"concepts were prepared for another method than {config.method}: prepare them with this config"
        )
    device, C, width = clip.device, len(concepts), clip.width
    precision = backbone.precision if backbone is not None else config.precision
    mixed = lambda: autocast(device, precision)  # noqa: E731

    # 2. the trainable numbers of all concepts: one parameter tensor, and its optimiser
    holder = _trainable(concepts, config, width, device)
    param = holder.param
    optimizer = torch.optim.AdamW([param], lr=config.lr, weight_decay=config.weight_decay)

    # 3. what stays fixed: l_CE's features and parent prompts; each concept's random stream
    ce = class_data(concepts, clip, config) if config.uses_ce else None
    generators = [torch.Generator().manual_seed(int(c.seed)) for c in concepts]
    T = backbone.scheduler.config.num_train_timesteps if config.uses_sd else 0
    good = param.detach().clone()  # each concept's last numbers whose loss was finite
    stopped_at: list[int | None] = [None] * C
    history: list[torch.Tensor] = []  # (4, C): step, l_SD, l_CE, L; every log_every steps
    last = torch.full((3, C), math.nan)
    start = time.perf_counter()
    steps_run = 0

    # 4. the loop
    per_forward = config.concepts_per_forward or C
    chunks = [list(range(i, min(i + per_forward, C))) for i in range(0, C, per_forward)]
    bar = tqdm(range(config.steps), desc=f"{config.method} x{C}", disable=not progress, dynamic_ncols=True)
    with _frozen(clip.model, backbone.unet if backbone is not None else None):
        for step in bar:
            optimizer.zero_grad(set_to_none=False)
            active = torch.tensor([s is None for s in stopped_at])
            terms = torch.zeros(3, C)  # l_SD, l_CE, L of every concept this step
            for idx in chunks:  # all concepts at once, unless concepts_per_forward splits them
                group = [concepts[i] for i in idx]
                # 4.1 the tokens: P(e - mu) + mu (ours, Perera et al. Sec. 4.3), coefficients x basis (batex, BaTex
                #     Eq. 7), or the vectors themselves
                stacked = holder.vectors()  # (C, n_max, width)
                vectors = {concepts[i].placeholder: stacked[i, : concepts[i].n_vectors] for i in idx}
                # 4.2 + 4.3 l_SD on this step's draws (one UNet forward), l_CE (one text forward)
                batch = (
                    draw_sd_batch(group, [generators[i] for i in idx], config, T, device) if config.uses_sd else None
                )
                l_sd, l_ce = step_losses(
                    vectors, group, clip, backbone, config, batch, ce.subset(idx) if ce else None, mixed
                )
                # 4.4 L_c = lambda_SD l_SD,c + lambda_CE l_CE,c (Perera et al. Sec. 4.2), summed over concepts
                loss = config.lambda_sd * l_sd + config.lambda_ce * l_ce  # (len(idx),)
                use = torch.isfinite(loss.detach()).cpu() & active[idx]
                if use.any():
                    loss[use.to(loss.device)].sum().backward()
                terms[:, idx] = torch.stack([l_sd.detach(), l_ce.detach(), loss.detach()]).float().cpu()
            # 4.5 a concept whose L_c is not finite stops, back at its last numbers whose loss was finite
            with torch.no_grad():
                for i in range(C):
                    if stopped_at[i] is None and not torch.isfinite(terms[2, i]):
                        stopped_at[i] = step
                        param[i] = good[i]
                active = torch.tensor([s is None for s in stopped_at])
                dev_active = active.to(device)
                good[dev_active] = param[dev_active]  # this step's numbers gave a finite loss
            if not active.any():
                break
            # 4.6 one Adam step; stopped concepts get no gradient and keep their last good numbers
            with torch.no_grad():
                param.grad[~dev_active] = 0
            optimizer.step()
            with torch.no_grad():
                param[~dev_active] = good[~dev_active]
            steps_run = step + 1
            # 4.7 log and show each loss term (means over the concepts still training)
            last[:, active] = terms[:, active]
            if step % log_every == 0 or step == config.steps - 1:
                history.append(torch.cat([torch.full((1, C), float(step)), terms]))
            bar.set_postfix(
                l_SD=f"{terms[0, active].mean():.4f}",
                l_CE=f"{terms[1, active].mean():.4f}",
                L=f"{terms[2, active].mean():.4g}",
                refresh=False,
            )
            # 4.8 tell the caller; False cancels (no token: the exception leaves before step 5)
            if on_step is not None:
                report = StepReport(
                    step=steps_run,
                    steps=config.steps,
                    l_sd=float(terms[0, active].mean()),
                    l_ce=float(terms[1, active].mean()),
                    loss=float(terms[2, active].mean()),
                    seconds=time.perf_counter() - start,
                    vectors=lambda: holder.vectors().detach().float().cpu().clone(),  # a copy: ti's IS the parameter
                )
                if on_step(report) is False:
                    bar.close()
                    raise TrainingCancelled(steps_run, config.steps)
    seconds = time.perf_counter() - start

    # 5. each concept's result: its effective vectors from its last good numbers
    with torch.no_grad():
        final = holder.vectors().detach().float().cpu()
    results = []
    for i, c in enumerate(concepts):
        stop = stopped_at[i]
        kept = steps_run if stop is None else max(stop - 1, 0)  # updates behind the kept token
        summary = {
            "steps": kept,
            "steps_asked": config.steps,
            "stopped_early": stop is not None,
            "reason": ""
            if stop is None
            else (
                f"the loss was not finite at step {stop}; stopped and kept the last token whose loss was finite "
                f"(after {kept} update{'s' * (kept != 1)}{', its initialisation' if kept == 0 else ''})"
            ),
            "last_l_sd": float(last[0, i]),
            "last_l_ce": float(last[1, i]),
            "last_loss": float(last[2, i]),
            "seconds": round(seconds, 3),
            "seconds_per_step": round(seconds / max(steps_run, 1), 5),
            "concepts_in_batch": C,
            "n_images": int(len(c.image_features)),
            "n_negatives": int(len(c.negative_features)) if c.negative_features is not None else 0,
        }
        rows = [
            {"step": int(h[0, i]), "l_sd": float(h[1, i]), "l_ce": float(h[2, i]), "loss": float(h[3, i])}
            for h in history
            if stop is None or h[0, i] < stop
        ]
        results.append(
            TrainedToken(c.name, c.parent, final[i, : c.n_vectors].clone(), c.init, c.constraint(), summary, rows)
        )
    return results


@torch.no_grad()
def evaluate_losses(
    vectors: dict[str, torch.Tensor],
    concepts: Sequence[ConceptData],
    clip,
    backbone,
    config: TokenTrainConfig,
    seed: int = 12345,
    draws: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(l_SD (C,), l_CE (C,)) for fixed VECTORS ({placeholder: (n, width)}) on fixed draws: `draws` batches from
    generators seeded SEED + concept index, the same for every call, so that losses before and after training
    compare (training's own draws are new every step)."""
    precision = backbone.precision if backbone is not None else config.precision
    mixed = lambda: autocast(clip.device, precision)  # noqa: E731
    ce = class_data(concepts, clip, config) if config.uses_ce else None
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(concepts))]
    T = backbone.scheduler.config.num_train_timesteps if config.uses_sd else 0
    sd_sum = torch.zeros(len(concepts), device=clip.device)
    l_ce = None
    for _ in range(draws if config.uses_sd else 1):
        batch = draw_sd_batch(concepts, generators, config, T, clip.device) if config.uses_sd else None
        l_sd, l_ce = step_losses(vectors, concepts, clip, backbone, config, batch, ce, mixed)
        sd_sum += l_sd
    return (sd_sum / (draws if config.uses_sd else 1)).cpu(), l_ce.cpu()


def to_custom_token(
    trained: TrainedToken,
    config: TokenTrainConfig,
    model: str,
    diffusion: str = "",
    concept: ConceptData | None = None,
    concept_images: str = "",
    context_attributes: Sequence[str] = (),
) -> CustomToken:
    """A trained token with the metadata its file carries (tokens.token_file). With CONCEPT, the normalised mean
    of its image features is kept (GAIR scores generated images against it)."""
    from dataclasses import asdict
    from datetime import datetime, timezone

    info = TokenInfo(
        name=trained.name,
        model=model,
        width=int(trained.vectors.shape[1]),
        n_vectors=int(trained.vectors.shape[0]),
        parent=trained.parent,
        method=config.method,
        diffusion=diffusion or "",
        model_weights=weights_id(model),
        config=json_safe(asdict(config)),
        subspace=trained.constraint,
        init=trained.init.describe(),
        # the concept's own seed: config.seed is the batch's, concept i of a batch draws from config.seed + i
        training={**trained.summary, **({"seed": int(concept.seed)} if concept is not None else {})},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        concept_feature=concept_feature(concept.image_features) if concept is not None else [],
        concept_images=str(concept_images),
        context_attributes=list(context_attributes),
    )
    return CustomToken(trained.vectors.clone(), info)


def concept_feature(image_features: torch.Tensor) -> list[float]:
    """(N, dim) normalised image features -> their normalised mean, as a JSON list (6 decimals)."""
    mean = torch.nn.functional.normalize(image_features.float().mean(0), dim=0)
    return [round(float(x), 6) for x in mean.tolist()]


def json_safe(obj):
    """Tuples to lists, non-finite floats to strings: what JSON can hold."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return str(obj)
    return obj
