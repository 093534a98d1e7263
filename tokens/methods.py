"""The four ways to learn a custom token: their config, their math, and how each holds its trainable numbers.

| method | loss (per concept)                       | what is trained                     | source                           |
| ------ | ---------------------------------------- | ----------------------------------- | -------------------------------- |
| ours   | lambda_SD l_SD + lambda_CE l_CE          | e; the token is P(e - mu) + mu      | Perera et al. Sec. 4.2, 4.3      |
| ti     | l_SD                                     | the vectors                         | Gal et al. 2023 (textual inv.)   |
| pt     | l_CE                                     | the vectors                         | prompt tuning (Perera Sec. 4.2:  |
|        |                                          |                                     | weights (0, 1); Sec. 5 negatives)|
| batex  | l_SD                                     | coefficients over M vocabulary rows | Du et al. (BaTex) Sec. 3, Eq. 5, |
|        |                                          |                                     | Algorithms 1-2                   |

- l_SD is the latent-diffusion / textual-inversion loss ||eps - eps_theta(z_t, t, c(y))||^2 (Perera et al. Sec. 3,
  l_DM; Rombach et al. 2022 eq. 2; Gal et al. eq. 2) over the concept's images with prompts such as "a photo of a
  * dress" (`DiffusionBackbone.training_loss`; the trainer takes it per row, `reduction="none"`). Deviation: on
  DeepFashion2 the paper "used captions provided by the benchmark during training" (Sec. 5); we use templates.
- l_CE (Perera et al. Sec. 4.2) is a binary classification in CLIP space between the class prompts "image of a *
  dress" and "image of a dress" (the paper's 'image of a * c' and 'image of a c'): p(concept | x) = softmax over
  the two prompts of s * cos(f(x), g(prompt)), s = CLIP's logit scale, i.e. sigmoid(s (cos(f(x), g_*) -
  cos(f(x), g_parent))); positives are the concept's images, negatives images of the parent (sampled from the
  diffusion model or given); the two classes are weighted equally (`balanced_bce`). The paper says only: "compute
  a class scores f(x'') . tau_* and f(x'') . tau_parent and evaluate a classification loss with balanced binary
  cross entropy": how the two scores become one logit, and the scale s, are our reading.
- Order of * and c: Sec. 4 writes d(g([t, c, *])) and g([t, c, *]); Secs. 4.2 and 4.4 write 'image of a * c' and
  [t, *, c]. We use "* c" everywhere (prompts here, the planner in retrieval.composed).
- ours restricts the token to the affine subspace through mu spanned by the principal directions of the input
  embeddings of the K attribute words most correlated with the concept in CLIP space (Perera et al. Sec. 4.3;
  K = 100, Sec. 5) (`attribute_scores`, `pca_basis`, `project_to_subspace`). The paper gives no dimension for P:
  we keep every direction of non-zero variance (r = rank <= K - 1; see `pca_basis`).
- batex writes each token vector as a combination of M vocabulary embeddings nearest (cosine) to its initial
  vector, the initial vector first: the coefficients start one-hot, so the token starts at its initial word
  (BaTex Eq. 3-4, 7; `nearest_vocabulary_basis`; the basis must have full rank M). BaTex learns one vector; here
  each of the token's n_vectors (10 by default) is a combination over its own initial vector's basis.

Paper sizes are for CLIP ViT-L/14 (text width 768): K = 100 attributes, M = 576 basis vectors. On narrower text
towers (the toy world's 128, tiny-random's 32) K = 100 would span the whole space and M = 576 > width cannot be
of full rank, so both scale with the width (`scaled_size`: K = 100 w / 768, M = 576 w / 768 = 0.75 w) unless
`scale_with_width=False`. The values used are written into each token file.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

METHODS = ("ours", "ti", "pt", "batex")
RANK_RTOL = 1e-5  # singular values below this times the largest count as zero: float32 embeddings carry ~1e-7 noise

# Defaults that differ by method, as data. Everything else is shared (TokenTrainConfig).
METHOD_DEFAULTS: dict[str, dict] = {
    # Perera et al. Sec. 5, "Model details": "set lambda_CE = 10^-5, lambda_SD = 1 ... trained each model for 20000
    # iterations"
    "ours": {"lambda_sd": 1.0, "lambda_ce": 1e-5, "steps": 20000},
    # textual inversion: the diffusion loss alone, Perera et al. Sec. 4.2's weights (1, 0); the paper states no
    # budget for its baselines: ours' 20000 for a like-for-like comparison
    "ti": {"lambda_sd": 1.0, "lambda_ce": 0.0, "steps": 20000},
    # prompt tuning: the classification loss alone, Perera et al. Sec. 4.2's weights (0, 1) ("equivalent to prompt
    # tuning"), with Sec. 5's sampled negatives (no diffusion model needed when negatives are given); budget as ti
    "pt": {"lambda_sd": 0.0, "lambda_ce": 1.0, "steps": 20000},
    # BaTex: the diffusion loss on basis coefficients (Eq. 5); Sec. 5, "Training steps": "We recommend to train
    # BaTex with M=576 for 500 steps"
    "batex": {"lambda_sd": 1.0, "lambda_ce": 0.0, "steps": 500},
}

# Prompts of l_SD: seven of textual inversion's templates (diffusers' examples/textual_inversion,
# imagenet_templates_small) and one of ours (the last, not in that list), with the parent word after the token.
# Perera et al. Sec. 3: "a set of different paraphrasing of 'image of a *' is used"; Sec. 4: "it is common to use
# different paraphrasing of 'an image of a' for t". The paper does not list its paraphrases; on DeepFashion2 it
# "used captions provided by the benchmark during training" (Sec. 5), which this code does not do.
SD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {token} {parent}",
    "a rendering of a {token} {parent}",
    "a cropped photo of the {token} {parent}",
    "a photo of the {token} {parent}",
    "a close-up photo of a {token} {parent}",
    "a bright photo of the {token} {parent}",
    "a good photo of a {token} {parent}",
    "a person wearing a {token} {parent}",
)


# Per-CLIP defaults for CLIPs whose text side knows only a small language. The toy world's CLIP was trained on its
# caption grammar alone ("a person wearing a red striped dress ..."): the templates above and "image of a * dress"
# are outside it, and GAIR's paper words "old", "worn", "bright", "dark" are untrained rows of its table (its own
# words stand in: white for bright, black for dark). Real CLIPs use the defaults. `learn-token` applies these
# unless the caller overrides them, and keeps the attributes in the token file for `query --gair`. On toyworld this
# replaces Perera et al.'s 'image of a * c' / 'image of a c' (Sec. 4.2) and their A (Sec. 5): a recorded deviation.
MODEL_DEFAULTS: dict[str, dict] = {
    "toyworld": {
        "sd_templates": ("a person wearing a {token} {parent}.", "a photo of a {token} {parent}."),
        "class_template": "a person wearing a {token} {parent}.",
        "context_attributes": ("red", "pink", "white", "black"),
    },
}


def model_defaults(model: str) -> dict:
    """MODEL_DEFAULTS of a CLIP SPEC ({} for the rest): sd_templates, class_template, context_attributes."""
    return dict(MODEL_DEFAULTS.get(model, {}))


@dataclass(frozen=True)
class TokenTrainConfig:
    method: str = "ours"  # ours | ti | pt | batex (METHODS)
    # ----- the token
    # vectors per token; Perera et al. Sec. 5: "For all the experiments we used 10 trainable tokens" (read as one
    # placeholder of 10 vectors); a caption sets its own (Qiu et al. Sec. 3, "Multi-Token Representation")
    n_vectors: int = 10
    # None: every vector at the parent word (Perera et al. give no initialisation; Gal et al.'s textual inversion
    # starts at a coarse word); "auto": a caption ranked from the attributes; or a caption (Qiu et al. Sec. 3)
    init_caption: str | None = None
    # ----- the loss L = lambda_SD l_SD + lambda_CE l_CE (Perera et al. Sec. 4.2; values Sec. 5, "Model details")
    lambda_sd: float = 1.0  # weight of the diffusion loss (Perera et al.: 1)
    lambda_ce: float = 1e-5  # weight of the classification loss (Perera et al.: 1e-5)
    # ----- optimisation (Perera et al. Sec. 5: "an effective batch size of 4 with a learning rate of 5 . 10^-4",
    # "20000 iterations"; the optimiser and schedule are not stated: AdamW without decay (= Adam), constant lr)
    steps: int = 20000  # optimiser steps
    batch_size: int = 4  # (image, prompt) pairs of l_SD per concept per step; l_CE sees all N + k images each step
    lr: float = 5e-4  # Adam learning rate, constant
    weight_decay: float = 0.0  # AdamW decay; none, so only the losses move the token (BaTex Alg. 2's gamma: no value)
    seed: int = 0  # seeds each concept's draws (images, prompts, noise, timesteps)
    precision: str = "auto"  # compute precision: auto = bf16/fp16 autocast on GPU, fp32 on CPU
    concepts_per_forward: int = 0  # concepts per forward when training many at once; 0: all (one forward)
    # ----- prompts
    sd_templates: tuple[str, ...] = SD_TEMPLATES  # l_SD prompts; {token} = the placeholder, {parent} = the parent word
    # l_CE's concept prompt; without {token} it is the parent's (Perera et al. Sec. 4.2: 'image of a * c', 'image of
    # a c'), also the negatives' sampling prompt and the attribute-ranking prompt
    class_template: str = "image of a {token} {parent}"
    # ----- ours: the attribute subspace
    # K attributes most correlated with the concept (Perera et al. Sec. 5: "100 attributes from CQGA dataset [13]
    # that correlated most with the given concept in the CLIP space"); drawn from our own vocabulary
    # (tokens.attributes, 375 words), not from C-GQA's attribute list
    attributes_k: int = 100
    # r, the principal directions of the K attribute embeddings that P keeps (Sec. 4.3 gives no dimension for P);
    # 0: every direction of non-zero variance (r = rank <= K - 1), our default: measured against 1, 2, 4, 8 in the
    # README ("Fidelity to the papers", row d) with `python -m benchmarks.token_quality --methods ours ours+r4 ...`
    subspace_rank: int = 0
    # ----- batex: the vocabulary basis
    batex_m: int = 576  # M nearest vocabulary embeddings (BaTex Sec. 5, Table 4: M = 576 of d = 768)
    reference_width: int = 768  # text width the paper's K and M are for (CLIP ViT-L/14)
    scale_with_width: bool = True  # scale K and M by width / reference_width on other CLIPs (not in the papers)
    # ----- negatives for l_CE: images sampled for the parent prompt (Perera et al. Sec. 4.2: "we sample k images
    # ... from the diffusion model with the prompt 'image of a c'"; k, sampler and guidance are not given)
    n_negatives: int = 16  # k, images sampled from the diffusion model (when no folder is given); our choice
    negative_steps: int = 50  # sampler steps of that sampling (StableDiffusionPipeline's default)
    negative_guidance: float = 7.5  # classifier-free guidance scale of that sampling (SD's default)
    # ----- input checks and the auto caption
    min_images: int = 3  # fewest usable concept images (Perera et al. Sec. 4: "n is generally 3-5")
    auto_caption_words: int = 3  # attribute words in an `auto` caption (the templates add the parent after it)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: use one of {', '.join(METHODS)}")
        if (
            self.n_vectors < 1
            or self.steps < 0
            or self.batch_size < 1
            or self.min_images < 1
            or self.concepts_per_forward < 0
            or self.subspace_rank < 0
        ):
            raise ValueError(
                "n_vectors, batch_size and min_images must be >= 1, steps, concepts_per_forward and subspace_rank >= 0"
            )
        if self.lambda_sd < 0 or self.lambda_ce < 0 or self.lambda_sd + self.lambda_ce == 0:
            raise ValueError(f"lambda_sd={self.lambda_sd}, lambda_ce={self.lambda_ce}: both >= 0 and not both 0")
        for t in self.sd_templates + (self.class_template,):
            if "{token}" not in t or "{parent}" not in t:
                raise ValueError(f"prompt template {t!r} must contain {{token}} and {{parent}}")
        if self.precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {self.precision!r}")

    @property
    def uses_sd(self) -> bool:
        return self.lambda_sd > 0

    @property
    def uses_ce(self) -> bool:
        return self.lambda_ce > 0

    def needs_diffusion(self, negatives_given: bool) -> bool:
        """Whether training needs a diffusion model: for l_SD, or to sample l_CE's negatives when none are given."""
        return self.uses_sd or (self.uses_ce and not negatives_given)

    def k_for(self, width: int) -> int:
        return (
            scaled_size(self.attributes_k, width, self.reference_width) if self.scale_with_width else self.attributes_k
        )

    def m_for(self, width: int) -> int:
        return scaled_size(self.batex_m, width, self.reference_width) if self.scale_with_width else self.batex_m


def token_train_config(method: str = "ours", **overrides) -> TokenTrainConfig:
    """The method's defaults (METHOD_DEFAULTS) with OVERRIDES: token_train_config("batex", steps=100)."""
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}: use one of {', '.join(METHODS)}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(TokenTrainConfig)}
    if unknown:
        raise ValueError(f"unknown TokenTrainConfig fields {sorted(unknown)}")
    return TokenTrainConfig(**{**METHOD_DEFAULTS[method], **overrides, "method": method})


def scaled_size(paper_value: int, width: int, reference_width: int = 768) -> int:
    """A paper's count for a 768-wide text tower, scaled to WIDTH (at least 2): 576 -> 24 at width 32."""
    return max(2, round(paper_value * width / reference_width))


def fill_prompt(template: str, token: str, parent: str) -> str:
    """'image of a {token} {parent}' -> 'image of a <t> dress'; token '' gives the parent prompt 'image of a dress'."""
    return " ".join(template.format(token=token, parent=parent).split())


# ----- words and their embeddings
def token_ids(clip, text: str) -> list[int]:
    """BPE ids of TEXT without start/end of text."""
    return list(clip.tokenizer.encode(text))


def word_embeddings(clip, words: Sequence[str]) -> torch.Tensor:
    """(len(words), width) float32: each word's input embedding, the mean over its BPE sub-tokens (Perera et al.
    Sec. 4.1, 4.3: "average token embeddings for each attribute", "a matrix e with average embeddings")."""
    table = clip.token_embedding.weight.detach().float()
    rows = []
    for w in words:
        ids = token_ids(clip, w)
        if not ids:
            raise ValueError(f"{w!r} has no tokens: give a word")
        rows.append(table[torch.tensor(ids, device=table.device)].mean(0))
    return torch.stack(rows).cpu()


@torch.no_grad()
def attribute_scores(
    clip, image_features: torch.Tensor, parent: str, attributes: Sequence[str], template: str
) -> torch.Tensor:
    """(A,) how much each attribute describes the concept in CLIP space: the mean cosine between the concept's
    image features (N, dim) (normalised) and the text feature of the template with the attribute in the token's
    place ("image of a red dress"). The parent's part is common to all, so the ranking is the attribute's.
    Perera et al. Sec. 5 say only "attributes ... that correlated most with the given concept in the CLIP space":
    this score is our reading of "correlated"."""
    prompts = [fill_prompt(template, a, parent) for a in attributes]
    text = torch.from_numpy(clip.encode_texts(prompts))  # (A, dim), normalised
    return (image_features.float().cpu() @ text.T).mean(0)  # (A,)


# ----- ours: the attribute subspace (Perera et al. Sec. 4.3, "Improving Compositionality")
def pca_basis(points: torch.Tensor, rel_tol: float = 1e-5, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of POINTS (K, width): (basis (width, r) orthonormal principal directions, mean (width,)).
    r = the rank of the centred points (directions with singular value <= rel_tol * the largest are dropped), or
    RANK when it is lower (RANK 0: no cap): the RANK directions of largest variance.

    Perera et al. Sec. 4.3: "We calculate the mean vector mu_e of the matrix e and perform Principal Component
    Analysis to find a projection matrix P". The paper gives no dimension for P. Our default (RANK 0): keep every
    direction of non-zero variance, so P projects onto the affine hull of the K attribute embeddings (no
    truncation): r <= K - 1, i.e. at most 99 for K = 100 on CLIP ViT-L/14 and 16 on the toy world (K = 17 at width
    128). `TokenTrainConfig.subspace_rank` caps it; the effect of the cap is measured in the README (row d)."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0 (0: every direction of non-zero variance), got {rank}")
    mean = points.mean(0)
    _, s, vh = torch.linalg.svd((points - mean).double(), full_matrices=False)  # vh (min(K, width), width), s desc.
    keep = s > rel_tol * s.max().clamp_min(1e-30)
    if rank:
        keep &= torch.arange(len(s)) < rank
    return vh[keep].T.to(points.dtype).contiguous(), mean


def project_to_subspace(e: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """P (e - mu) + mu with P = U U^T: e (..., n, width), basis U (..., width, r) orthonormal columns (zero columns
    allowed: padding), mean mu (..., width). Differentiable in e. Perera et al. Sec. 4.3: "During training we
    transform the token e_* using the linear transformation P(e_* - mu_e) + mu_e"."""
    mu = mean.unsqueeze(-2)  # (..., 1, width)
    coords = (e - mu) @ basis  # (..., n, r)
    return coords @ basis.transpose(-1, -2) + mu


def subspace_residual(v: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """Largest norm over vectors v (n, width) of their part outside the affine subspace: ||(I - P)(v - mu)||."""
    d = v - mean
    return (d - (d @ basis) @ basis.T).norm(dim=-1).max()


# ----- batex: the vocabulary basis
def nearest_vocabulary_basis(
    table: torch.Tensor, init: torch.Tensor, m: int, exclude_ids: Sequence[int] = ()
) -> tuple[torch.Tensor, list[int]]:
    """BaTex's basis for one vector: (basis (m, width), vocabulary ids of rows 1..m-1).

    Row 0 is INIT itself, so that coefficients (1, 0, ..., 0) give exactly the initial vector even when it is no
    vocabulary row (a mean of sub-tokens); rows 1..m-1 are the vocabulary embeddings of highest cosine to INIT,
    skipping EXCLUDE_IDS (start/end of text) and rows equal to INIT. Refused when the basis is not of full rank m.

    Du et al. (BaTex) Sec. 3.2, Algorithm 1 and Eq. 6: order the vocabulary by a vector distance F(u, v_i) to the
    initial embedding u ("such as dot product, cosine similarity and L2 norm"), take the top M, "until r(V_M) >=
    d_1". Deviations: F is cosine (their App. F.4 finds dot product "slightly better"); M is fixed and must equal
    the rank (d_1 = M) instead of growing M until the rank reaches d_1; u need not be a vocabulary row (Eq. 3
    has u in V)."""
    table = table.detach().float()
    width = table.shape[1]
    if not 2 <= m <= width:
        raise ValueError(
            f"BaTex basis size M={m} must be in [2, {width}] (the text width): more rows than the width cannot be "
            "independent; lower batex_m or keep scale_with_width"
        )
    init = init.detach().float().to(table.device)
    cos = F.cosine_similarity(table, init[None], dim=1)  # (V,)
    same = (table - init).norm(dim=1) <= 1e-6 * init.norm().clamp_min(1e-12)
    cos[same] = -math.inf
    if len(exclude_ids):
        cos[torch.tensor(list(exclude_ids), device=cos.device)] = -math.inf
    ids = cos.topk(m - 1).indices
    basis = torch.cat([init[None], table[ids]]).cpu()  # (m, width)
    rank = int(torch.linalg.matrix_rank(basis.double(), rtol=RANK_RTOL))
    if rank < m:
        raise ValueError(
            f"BaTex basis of the {m} embeddings nearest the initial word has rank {rank} < {m}: the vocabulary rows "
            "are not independent there; lower batex_m"
        )
    return basis, ids.cpu().tolist()


# ----- l_CE
def balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with the positives' and the negatives' mean losses weighted equally (1/2 each), so a
    few concept images weigh as much as many negatives. logits (N,), labels (N,) bool. Perera et al. Sec. 4.2:
    "l_CE = BCE(x'', y)" with "balanced binary cross entropy", labels 1 for the n concept images, 0 for the k
    negatives; equal class weights are our reading of "balanced"."""
    losses = F.binary_cross_entropy_with_logits(logits.float(), labels.float(), reduction="none")
    pos, neg = labels.bool(), ~labels.bool()
    if not pos.any() or not neg.any():
        raise ValueError("balanced_bce needs at least one positive and one negative")
    return 0.5 * (losses[pos].mean() + losses[neg].mean())


def class_logits(
    image_features: torch.Tensor, token_feature: torch.Tensor, parent_feature: torch.Tensor, scale: float
) -> torch.Tensor:
    """(N,) logit of 'concept' against 'parent' for normalised image features (N, dim): the two-way softmax over
    the prompts' cosines times CLIP's logit scale, as a sigmoid logit: s (cos(x, g_*) - cos(x, g_parent)).
    Perera et al. Sec. 4.2 give the two "class scores f(x'') . tau_* and f(x'') . tau_parent" but not how they
    form one BCE logit nor any scale: the difference and s = CLIP's logit scale are our reading."""
    return scale * (image_features @ token_feature - image_features @ parent_feature)


# ----- how each method holds its trainable numbers: one parameter tensor for C concepts at once
class FreeVectors:
    """ti, pt: the vectors themselves, (C, n, width)."""

    def __init__(self, init: torch.Tensor):
        self.param = torch.nn.Parameter(init.detach().clone().float())  # (C, n, width)

    def vectors(self) -> torch.Tensor:
        return self.param


class SubspaceVectors:
    """ours: e (C, n, width) trained, the token is P(e - mu) + mu (Perera et al. Sec. 4.3) with each concept's own
    basis (C, width, r_max) (zero-padded columns) and mean (C, width). e starts at the initial vectors, so the
    token starts at their projection P(e_0 - mu) + mu, not at the parent word itself (the paper is silent)."""

    def __init__(self, init: torch.Tensor, basis: torch.Tensor, mean: torch.Tensor):
        self.param = torch.nn.Parameter(init.detach().clone().float())
        self.basis, self.mean = basis.float(), mean.float()

    def vectors(self) -> torch.Tensor:
        return project_to_subspace(self.param, self.basis, self.mean)


class BasisCombination:
    """batex: coefficients (C, n, M) over bases; vector j of concept c = coeff[c, j] @ bases[which[c, j]] (BaTex
    Eq. 7; the one-hot start is Eq. 3-4).
    Bases are shared where initial vectors are (a token initialised from its parent has one basis for all its
    vectors), so 50 concepts x 10 vectors x 576 x 768 are never materialised. Coefficients start one-hot on row 0,
    the initial vector."""

    def __init__(self, bases: torch.Tensor, which: torch.Tensor):
        self.bases, self.which = bases.float(), which.long()  # (U, M, width), (C, n)
        C, n = which.shape
        coeff = torch.zeros(C, n, bases.shape[1], device=bases.device)
        coeff[..., 0] = 1.0
        self.param = torch.nn.Parameter(coeff)

    def vectors(self) -> torch.Tensor:
        C, n, M = self.param.shape
        flat, which = self.param.reshape(C * n, M), self.which.reshape(-1)
        pieces, order = [], []
        for u in range(self.bases.shape[0]):  # one small matmul per distinct basis
            rows = (which == u).nonzero().squeeze(1)
            if len(rows):
                pieces.append(flat[rows] @ self.bases[u])  # (R, width)
                order.append(rows)
        out = torch.cat(pieces)[torch.argsort(torch.cat(order))]  # back to (C * n) order
        return out.reshape(C, n, -1)
