"""CLIP encoders: images and texts to L2-normalised float32 vectors, with custom-token placeholders.

The text side is written for custom tokens (Perera et al.; textual inversion; multi-vector tokens):
- a prompt may contain placeholder strings (e.g. ``*`` or ``<my-dress>``); each is replaced by one or
  several learned input vectors, inserted as that many sequence positions;
- the text feature is pooled at the true end-of-text position, located while tokenizing, never at
  ``argmax(token_ids)`` (open_clip's rule, which breaks for placeholder ids above the vocabulary);
- the per-position final hidden states (after ``ln_final``, all context positions) are exposed: it is
  what a Stable-Diffusion-style UNet is conditioned on. Their padding id is a parameter because SD 1.x
  pads with end-of-text (49407) where open_clip pads with 0, and the UNet attends to every position.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from retrieval.models.clip import DEFAULT_MODEL, LoadedClip, ModelLoadError, load_clip
from retrieval.models.precision import DTYPES, resolve_device, resolve_precision


@dataclass
class TokenizedPrompts:
    """Token ids of a batch of prompts, with where each placeholder vector goes."""

    ids: torch.Tensor  # (B, L) int64; placeholder slots hold `filler_id`
    eot: torch.Tensor  # (B,) int64, position of the end-of-text token
    slots: list[tuple[int, int, str, int]]  # (row, position, placeholder name, vector index)
    truncated: list[bool]  # (B,) prompt was longer than the context and was cut


class ClipEncoder:
    """A loaded CLIP model that encodes images and texts (with optional placeholder vectors)."""

    def __init__(self, loaded: LoadedClip, device: str | torch.device = "auto", precision: str = "auto"):
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.precision = resolve_precision(precision, self.device)
        self.loaded = loaded
        self.model = loaded.model.to(self.device, dtype=DTYPES[self.precision]).eval()
        self.tokenizer = loaded.tokenizer
        self.spec = loaded.spec
        self.preprocess = loaded.preprocess

    @classmethod
    def from_spec(cls, spec: str = DEFAULT_MODEL, device: str = "auto", precision: str = "auto") -> "ClipEncoder":
        dev = resolve_device(device)
        return cls(load_clip(spec, device="cpu"), device=dev, precision=resolve_precision(precision, dev))

    # ----- sizes
    @property
    def dim(self) -> int:
        """Dimension of the joint image-text space."""
        proj = self.model.text_projection
        return proj.out_features if isinstance(proj, torch.nn.Linear) else proj.shape[1]

    @property
    def width(self) -> int:
        """Width of the text transformer = size of one token embedding."""
        return self.model.token_embedding.weight.shape[1]

    @property
    def image_size(self) -> int:
        """Shorter side of the encoder's input images (pixels)."""
        size = self.model.visual.image_size
        return min(size) if isinstance(size, (tuple, list)) else int(size)

    @property
    def context_length(self) -> int:
        return self.model.positional_embedding.shape[0]

    @property
    def token_embedding(self) -> torch.nn.Embedding:
        return self.model.token_embedding

    # ----- images
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> np.ndarray:
        """(B, 3, H, W) preprocessed pixels -> (B, dim) float32, L2-normalised."""
        x = pixels.to(self.device, dtype=DTYPES[self.precision], non_blocking=True)
        feats = self.model.encode_image(x)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()

    def encode_pil(self, images: Sequence, batch_size: int = 64) -> np.ndarray:
        """PIL images -> (n, dim) float32, L2-normalised."""
        out = [
            self.encode_images(torch.stack([self.preprocess(im) for im in images[i : i + batch_size]]))
            for i in range(0, len(images), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    # ----- texts
    def tokenize(
        self,
        texts: Sequence[str],
        placeholders: Mapping[str, int] | None = None,
        pad_id: int = 0,
        warn_truncation: bool = True,
    ) -> TokenizedPrompts:
        """Tokenize prompts; each placeholder NAME in `placeholders` (name -> number of vectors) becomes that
        many slots. Too-long prompts are cut to the context (end-of-text kept), with a warning."""
        tok = self.tokenizer
        if not hasattr(tok, "encode") or not hasattr(tok, "eot_token_id"):
            raise ModelLoadError(
                f"{self.spec}: placeholder prompts need open_clip's BPE tokenizer; this model uses {type(tok).__name__}"
            )
        placeholders = dict(placeholders or {})
        pattern = (
            re.compile("(" + "|".join(re.escape(p) for p in sorted(placeholders, key=len, reverse=True)) + ")")
            if placeholders
            else None
        )
        L = self.context_length
        ids = torch.full((len(texts), L), pad_id, dtype=torch.long)
        eot = torch.zeros(len(texts), dtype=torch.long)
        slots, truncated = [], []
        for row, text in enumerate(texts):
            seq: list[int | tuple[str, int]] = [tok.sot_token_id]
            for piece in pattern.split(text) if pattern else [text]:
                if piece in placeholders:
                    seq.extend((piece, j) for j in range(placeholders[piece]))
                elif piece.strip():
                    seq.extend(tok.encode(piece))
            seq.append(tok.eot_token_id)
            cut = len(seq) > L
            if cut:
                seq = seq[: L - 1] + [tok.eot_token_id]  # open_clip's truncation rule
                if warn_truncation:
                    warnings.warn(f"prompt longer than the text encoder's {L} tokens was truncated: {text[:80]!r}...")
            truncated.append(cut)
            for pos, item in enumerate(seq):
                if isinstance(item, tuple):
                    slots.append((row, pos, item[0], item[1]))
                    ids[row, pos] = tok.eot_token_id - 1  # filler; the slot's vector replaces its embedding
                else:
                    ids[row, pos] = item
            eot[row] = len(seq) - 1
        return TokenizedPrompts(ids=ids, eot=eot, slots=slots, truncated=truncated)

    def input_embeddings(
        self, tokenized: TokenizedPrompts, vectors: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Token embeddings (B, L, width) with each placeholder slot replaced by its vector (differentiable
        with respect to `vectors`, for token training)."""
        emb = self.model.token_embedding(tokenized.ids.to(self.device))  # (B, L, width)
        if tokenized.slots:
            vectors = vectors or {}
            missing = sorted({name for _, _, name, _ in tokenized.slots} - set(vectors))
            if missing:
                raise KeyError(f"no vectors given for placeholder(s) {missing}")
            rows, pos, vals = [], [], []
            for r, p, name, j in tokenized.slots:
                v = vectors[name]
                if v.ndim != 2 or v.shape[1] != self.width:
                    raise ValueError(f"placeholder {name!r}: vectors must be (n, {self.width}), got {tuple(v.shape)}")
                rows.append(r)
                pos.append(p)
                vals.append(v[j])
            emb = emb.index_put(
                (torch.tensor(rows, device=emb.device), torch.tensor(pos, device=emb.device)), torch.stack(vals).to(emb)
            )
        return emb

    def text_transformer(
        self, embeddings: torch.Tensor, eot: torch.Tensor, skip_last_layers: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the text tower on input embeddings (B, L, width).

        Returns (hidden, features): hidden (B, L, width) the final-layer-normed states of every position
        (diffusion conditioning), features (B, dim) the projected, UNnormalised feature pooled at `eot`.
        `skip_last_layers` > 0 stops that many transformer blocks early, then applies ln_final: Stable
        Diffusion 2.x conditions on the penultimate layer (skip 1). The features then come from those states too.
        """
        m = self.model
        if not hasattr(m, "transformer") or not hasattr(m, "ln_final"):
            raise ModelLoadError(f"{self.spec}: custom-token prompts need open_clip's built-in text transformer")
        n_blocks = len(m.transformer.resblocks)
        if not 0 <= skip_last_layers < n_blocks:
            raise ValueError(
                f"skip_last_layers must be in [0, {n_blocks - 1}] for this {n_blocks}-block text tower, got {skip_last_layers}"
            )
        dtype = m.transformer.get_cast_dtype()
        x = embeddings.to(dtype) + m.positional_embedding.to(dtype)
        if skip_last_layers == 0:
            x = m.transformer(x, attn_mask=m.attn_mask)
        else:
            x = x if m.transformer.batch_first else x.transpose(0, 1)
            for block in m.transformer.resblocks[: n_blocks - skip_last_layers]:
                x = block(x, attn_mask=m.attn_mask)
            x = x if m.transformer.batch_first else x.transpose(0, 1)
        hidden = m.ln_final(x)  # (B, L, width)
        if m.text_pool_type in ("argmax", "eos"):
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eot.to(hidden.device)]
        elif m.text_pool_type == "first":
            pooled = hidden[:, 0]
        elif m.text_pool_type == "last":
            pooled = hidden[:, -1]
        else:
            raise ModelLoadError(f"{self.spec}: unsupported text pooling {m.text_pool_type!r}")
        proj = m.text_projection
        feats = proj(pooled) if isinstance(proj, torch.nn.Linear) else pooled @ proj
        return hidden, feats

    def text_features(
        self,
        texts: Sequence[str],
        vectors: Mapping[str, torch.Tensor] | None = None,
        pad_id: int = 0,
        skip_last_layers: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor, TokenizedPrompts]:
        """Differentiable: (hidden (B, L, width), normalised features (B, dim), tokenized)."""
        vectors = dict(vectors or {})
        tokenized = self.tokenize(texts, {k: v.shape[0] for k, v in vectors.items()}, pad_id=pad_id)
        hidden, feats = self.text_transformer(
            self.input_embeddings(tokenized, vectors), tokenized.eot, skip_last_layers
        )
        return hidden, F.normalize(feats.float(), dim=-1), tokenized

    @torch.no_grad()
    def encode_texts(
        self, texts: Sequence[str], vectors: Mapping[str, torch.Tensor] | None = None, batch_size: int = 256
    ) -> np.ndarray:
        """Texts (with optional placeholder vectors) -> (n, dim) float32, L2-normalised."""
        if isinstance(texts, str):
            texts = [texts]
        out = [
            self.text_features(texts[i : i + batch_size], vectors)[1].cpu().numpy()
            for i in range(0, len(texts), batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @torch.no_grad()
    def text_hidden_states(
        self,
        texts: Sequence[str],
        vectors: Mapping[str, torch.Tensor] | None = None,
        pad_id: int = 0,
        skip_last_layers: int = 0,
    ) -> torch.Tensor:
        """Per-position final hidden states (B, L, width), float32: what a diffusion UNet attends to.
        Use pad_id = end-of-text (49407) for Stable Diffusion 1.x's padding convention, and
        skip_last_layers=1 for Stable Diffusion 2.x's penultimate layer."""
        return self.text_features(texts, vectors, pad_id=pad_id, skip_last_layers=skip_last_layers)[0].float()
