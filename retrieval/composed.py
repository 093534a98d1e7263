"""Composed queries with custom tokens: the query planner and its text features (Perera et al., Sec. 4.4).

A user writes a query with `*` where their concept goes ("a person wearing a * in front of a brick wall") and
names the token (`tokens=["my-dress"]`); several concepts are written inline as `<name>`. The planner builds the
paper's [t, *, c]: the token's placeholder followed by its parent word c ("a person wearing a <my-dress> dress in
front of a brick wall"); a parent the user already wrote after the slot is not repeated.

Features (g is the CLIP text encoder, pooled at end-of-text and L2-normalised):
- composed: g([t, *, c]);
- context: (1/|A|) sum_i g([t, a_i, c]), every token slot replaced by the attribute word a_i (Perera et al.,
  Sec. 4.4, the query q and Algorithm 1; A defaults to their DeepFashion2 list of Sec. 5, `PAPER_ATTRIBUTES`).
Order: Sec. 4.4 writes [t, *, c] (token, then parent), Sec. 4 "Generation" writes d(g([t, c, *])); we follow 4.4
(and 4.2's 'image of a * c'). The caption rewrite `insert_concept` is PerVL's / PALAVRA's protocol, not the
paper's; its Fig. 6 queries read the same way ("The person wearing a * stands in front of ...").

Diffusion conditioning (for GAIR) mixes per-position hidden-state sequences, so the sequences of [t, *, c] and
[t, a_i, c] must be aligned position by position although the token has n vectors and a_i has m BPE tokens
(usually 1). `align_index` maps each position of the composed sequence to one of the context sequence:
- before the first slot: the same position (the shared prefix, start-of-text included);
- inside a slot of n positions: the attribute's m positions resampled to n (position s + j -> s' + floor(j m / n);
  n = 10, m = 1: all ten take the attribute's one state);
- after a slot: shifted by (m - n), so the rest of the sentence, its end-of-text and the padding line up word by
  word; positions past the context sequence's end take its last position (padding).
n = m gives the identity. The attribute goes into the context prompt as a placeholder whose vectors are its own
word-embedding rows, so its slot is known exactly, and the features equal those of the plain sentence (tested).
This alignment is ours: the paper mixes pooled features (Algorithm 1) and does not say how d() is conditioned
on a mixture; the aligned context sequence repeats the attribute's state over the token's n positions, so it
is not the plain sentence's conditioning.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from tokens.token_file import STAR, CustomToken, check_model, placeholder_names

# The attribute words of Perera et al.'s GAIR on DeepFashion2 (Sec. 5, "Text-to-Image Retrieval: DeepFashion2":
# "used 'red', 'old', 'worn', 'bright', 'dark', 'pink' as the list of attributes A"): the context query's A.
PAPER_ATTRIBUTES: tuple[str, ...] = ("red", "old", "worn", "bright", "dark", "pink")


class QueryError(ValueError):
    """A query that cannot be planned as written; the message says how to write it."""


@dataclass(frozen=True)
class ComposedQuery:
    """A planned query: text pieces and token slots, [t, *, c] with each slot followed by its parent word."""

    text: str  # as the user wrote it
    parts: tuple  # str pieces and int slots (index into `tokens`), in order
    tokens: tuple[CustomToken, ...]  # the distinct tokens, in order of first use

    def render(self, slot_text: Mapping[int, str] | str) -> str:
        """The sentence with each slot replaced by SLOT_TEXT (one string for all, or per token index)."""
        out = []
        for p in self.parts:
            out.append(p if isinstance(p, str) else (slot_text if isinstance(slot_text, str) else slot_text[p]))
        return "".join(out)

    @property
    def composed(self) -> str:
        """[t, *, c] (Perera et al. Sec. 4.4): 'a person wearing a <my-dress> dress in front of a brick wall'."""
        return self.render({i: t.placeholder for i, t in enumerate(self.tokens)})

    def with_word(self, word: str) -> str:
        """[t, a, c] (Sec. 4.4's [t, a_i, c]): every slot replaced by WORD: 'a person wearing a red dress in front of a
        brick wall'."""
        return self.render(word)

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        return {t.placeholder: t.vectors for t in self.tokens}

    @property
    def models(self) -> set[str]:
        return {t.info.model for t in self.tokens}


def _follows(rest: str, parent: str) -> bool:
    """Does REST (the text after a slot) start with the word(s) PARENT?"""
    return (
        re.match(r"\s*" + r"\s+".join(map(re.escape, parent.split())) + r"(?![\w-])", rest, re.IGNORECASE) is not None
    )


def plan_query(text: str, tokens: Sequence[CustomToken]) -> ComposedQuery:
    """Plan TEXT with TOKENS: `*` stands for the one token given, `<name>` for the token of that name; each slot is
    followed by its token's parent word. Errors (QueryError) say how to write the query."""
    text = " ".join((text or "").split())
    if not text:
        raise QueryError('the query is empty: write what to find, e.g. "a person wearing a * on a beach"')
    by_name = {t.info.name: t for t in tokens}
    stars = text.count(STAR)
    named = placeholder_names(text)
    # 1. what the query refers to, against what was given
    if stars and not tokens:
        raise QueryError("the query has '*' but no token was given: add `tokens=[NAME]` (see `tokens list`)")
    if stars and len(tokens) > 1:
        raise QueryError(
            f"'*' stands for one token but {len(tokens)} were given: write each token's placeholder instead "
            f"({', '.join(t.placeholder for t in tokens)})"
        )
    unknown = sorted({n for n in named if n not in by_name})
    if unknown:
        raise QueryError(
            f"the query names {', '.join('<' + n + '>' for n in unknown)} but no given token has "
            f"{'that name' if len(unknown) == 1 else 'those names'}: add `tokens=[{unknown[0]!r}]`"
        )
    unused = [t.info.name for t in tokens if not (stars or t.info.name in named)]
    if unused:
        raise QueryError(
            f"token {unused[0]!r} is given but the query does not use it (it does not use <{unused[0]}> or *): write * "
            f"(one token) or <{unused[0]}> where "
            f'the concept goes, e.g. "a person wearing a * on a beach"'
        )
    # 2. split into pieces and slots; the parent word follows each slot unless already written
    pattern = re.compile(r"\*|<(?:" + "|".join(re.escape(n) for n in by_name) + r")>") if tokens else None
    parts: list = []
    order: list[str] = []
    pos = 0
    for m in pattern.finditer(text) if pattern else ():
        name = tokens[0].info.name if m.group() == STAR else m.group()[1:-1]
        if name not in order:
            order.append(name)
        parts.append(text[pos : m.start()])
        parts.append(order.index(name))
        parent = by_name[name].info.parent
        if not _follows(text[m.end() :], parent):
            parts.append(" " + parent)
        pos = m.end()
    parts.append(text[pos:])
    parts = [p for p in parts if p != ""]
    return ComposedQuery(text=text, parts=tuple(parts), tokens=tuple(by_name[n] for n in order))


def check_query_model(plan: ComposedQuery, model: str, width: int) -> None:
    """Refuse tokens made for another CLIP than MODEL (the index's): their vectors mean nothing in its space."""
    for t in plan.tokens:
        check_model(t.info, model, width, where="query")


def truncated(clip, plan: ComposedQuery, attributes: Sequence[str] = ()) -> bool:
    """Do the composed prompt or any context prompt exceed the text encoder's context (77 tokens)?"""
    tok = clip.tokenize(
        [plan.composed, *[plan.with_word(a) for a in attributes]],
        {t.placeholder: t.vectors.shape[0] for t in plan.tokens},
        warn_truncation=False,
    )
    return any(tok.truncated)


def insert_concept(caption: str, slot: str) -> str:
    """PerVL's query rewrite: 'wearing a SLOT' right after the first 'person' of CAPTION ('a wide lawn is behind a
    person with raised arms.' -> '... a person wearing a * with raised arms.'); a caption without 'person' gets
    'a person wearing a SLOT, ' in front. SLOT is '*' for a token, or a word."""
    caption = " ".join(str(caption).split())
    m = re.search(r"\bperson\b", caption, re.IGNORECASE)
    if m is None:
        return f"a person wearing a {slot}, {caption}"
    return f"{caption[: m.end()]} wearing a {slot}{caption[m.end() :]}"


# ----- features
def attribute_placeholder(word: str) -> str:
    return f"<@attribute {word}>"


def attribute_vectors(clip, words: Sequence[str]) -> dict[str, torch.Tensor]:
    """Each word's own input-embedding rows (m, width), keyed by its placeholder: the context prompt with the word
    as a placeholder is the plain sentence, with its slot's position known."""
    table = clip.token_embedding.weight.detach()
    out = {}
    for w in words:
        ids = clip.tokenizer.encode(w)
        if not ids:
            raise QueryError(f"attribute {w!r} has no tokens: give words, e.g. `attributes=red,old,worn`")
        out[attribute_placeholder(w)] = table[torch.tensor(ids, device=table.device)]
    return out


def check_attributes(attributes: Sequence[str]) -> tuple[str, ...]:
    words = tuple(" ".join(a.split()) for a in attributes if a and a.strip())
    if not words:
        raise QueryError("no attribute words for the context query: give e.g. `attributes=red,old,worn`")
    bad = [a for a in words if STAR in a or "<" in a or ">" in a]
    if bad:
        raise QueryError(f"attribute words cannot hold '*', '<' or '>': {bad}")
    return words


def _encode(clip, texts: list[str], vectors: Mapping[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is reported by `truncated`, once
        return clip.text_features(texts, vectors)[1].float().cpu().numpy()


def composed_feature(clip, plan: ComposedQuery) -> np.ndarray:
    """g([t, *, c]): (dim,) float32, unit norm."""
    return _encode(clip, [plan.composed], plan.vectors)[0]


def context_features(clip, plan: ComposedQuery, attributes: Sequence[str]) -> np.ndarray:
    """g([t, a_i, c]) for each attribute: (|A|, dim) float32, each unit norm. Their mean is the context feature."""
    attributes = check_attributes(attributes)
    vectors = attribute_vectors(clip, attributes)
    return _encode(clip, [plan.with_word(attribute_placeholder(a)) for a in attributes], vectors)


def mix(composed: np.ndarray, context_mean: np.ndarray, w: float) -> np.ndarray:
    """q(w) = w g([t, *, c]) + (1 - w) mean_i g([t, a_i, c]) (Perera et al., Sec. 4.4 and Algorithm 1; g gives unit
    features), L2-normalised for search (ranking by dot product with unit gallery features is unchanged by it).
    w = 1 is exactly the composed query, w = 0 the context-only query."""
    q = w * composed.astype(np.float64) + (1.0 - w) * context_mean.astype(np.float64)
    return (q / max(np.linalg.norm(q), 1e-12)).astype(np.float32)


# ----- aligned hidden states for the diffusion conditioning
def slot_spans(tokens, row: int) -> list[tuple[int, int]]:
    """(start, length) of each placeholder occurrence in ROW of a TokenizedPrompts, in order of position."""
    spans: list[list[int]] = []
    for _, pos, _, j in sorted((s for s in tokens.slots if s[0] == row), key=lambda s: s[1]):
        if j == 0 or not spans:
            spans.append([pos, 1])
        else:
            spans[-1][1] += 1
    return [(s, n) for s, n in spans]


def align_index(
    composed_spans: Sequence[tuple[int, int]], context_spans: Sequence[tuple[int, int]], length: int
) -> torch.Tensor:
    """(length,) positions of the context sequence that line up with each position of the composed sequence
    (rules in the module docstring). Spans that do not pair up (a slot cut by truncation) give the identity."""
    if len(composed_spans) != len(context_spans):
        return torch.arange(length)
    index = []
    for p in range(length):
        offset, q = 0, None
        for (s, n), (s2, m) in zip(composed_spans, context_spans):
            if p < s:
                break
            if p < s + n:
                q = s2 + ((p - s) * m) // n
                break
            offset = (s2 + m) - (s + n)
        index.append(p + offset if q is None else q)
    return torch.tensor(index).clamp_(0, length - 1)


@torch.no_grad()
def conditioning_pair(backbone, plan: ComposedQuery, attributes: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(H_composed (L, W), H_context (L, W)): the UNet's conditioning for [t, *, c] and the mean over attributes
    of the [t, a_i, c] sequences, each aligned to the composed one (`align_index`)."""
    attributes = check_attributes(attributes)
    a_vectors = attribute_vectors(backbone.clip, attributes)
    context_texts = [plan.with_word(attribute_placeholder(a)) for a in attributes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation is reported by `truncated`, once
        h_comp, comp_tok = backbone.encode_prompts([plan.composed], plan.vectors)
        h_ctx, ctx_tok = backbone.encode_prompts(context_texts, a_vectors)  # (A, L, W)
    h_comp = h_comp[0]  # (L, W)
    L = h_comp.shape[0]
    comp_spans = slot_spans(comp_tok, 0)
    aligned = [
        h_ctx[i][align_index(comp_spans, slot_spans(ctx_tok, i), L).to(h_ctx.device)] for i in range(len(attributes))
    ]
    return h_comp, torch.stack(aligned).mean(0)


def mix_conditioning(h_composed: torch.Tensor, h_context: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """(|W|, L, width): w H([t, *, c]) + (1 - w) H_context for each w, the mixture of Algorithm 1 applied to the
    per-position hidden states the UNet attends to (our reading of "I <- d(g[q])": the paper mixes pooled
    features)."""
    w = torch.tensor([float(x) for x in weights], dtype=h_composed.dtype, device=h_composed.device)[:, None, None]
    return w * h_composed[None] + (1 - w) * h_context[None]
