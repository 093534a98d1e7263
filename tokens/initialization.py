"""Where a token starts: its parent word, a caption (one vector per caption token), or an `auto` caption.

- parent word (default): every one of the n vectors starts at the parent's input embedding, as diffusers'
  textual-inversion example initialises all vectors of a multi-vector token from one initializer token (Perera et
  al. give no initialisation; BaTex Eq. 3-4 start at the user's initial word u). A parent
  of several BPE sub-tokens ("vest dress", "cardigan" if split) starts at the MEAN of its sub-token embeddings
  (recorded in the token file as the sub-tokens used).
- caption ("a red tea kettle with gold leaf"): one vector per BPE token of the caption, each starting at that
  token's embedding (Qiu et al., "An Image is Worth One Sentence", Sec. 3 "Multi-Token Representation" and
  "Supreme Initialization": "the number of placeholder tokens n ... is the number of tokens in the ...
  captioning model outputs"); the caption fixes n_vectors. The user writes the caption: no captioning model runs.
- auto: a caption built offline from the concept's images: the attribute vocabulary (tokens.attributes) ranked
  by CLIP against the images (tokens.methods.attribute_scores), the best `auto_caption_words` attributes, e.g.
  "red striped checked"; then as a caption. The parent is not in it: every prompt template and the planner's
  [t, *, c] put the parent after the token, so "a photo of a <t> dress" reads "a photo of a red striped checked
  dress", the parent once (attributes sharing a word with the parent are skipped for the same reason). Deviation:
  Qiu et al. caption the image with a captioning model (Caption Anything on a clicked region, or a ViT
  classifier's label); this is a CLIP ranking of our attribute words, a stand-in for one.
Qiu et al. train with l_LDM alone on one image for 100 steps; here a caption initialises any method (ours then
projects it, P(e - mu) + mu, at the first step) and `min_images` (3) applies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tokens.methods import TokenTrainConfig, attribute_scores, token_ids


@dataclass(frozen=True)
class Initialization:
    vectors: torch.Tensor  # (n, width) float32
    kind: str  # parent | caption | auto
    text: str  # the parent word or the caption
    words: tuple[str, ...]  # the BPE tokens the vectors come from

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "text": self.text,
            "tokens": list(self.words),
            "n_vectors": int(self.vectors.shape[0]),
        }


def _decode(clip, ids: Sequence[int]) -> tuple[str, ...]:
    return tuple(clip.tokenizer.decode([i]).strip() for i in ids)


def auto_caption(
    clip, image_features: torch.Tensor, parent: str, attributes: Sequence[str], n_words: int, template: str
) -> str:
    """The N_WORDS attributes that best describe the images in CLIP space: 'red striped checked'. Not the parent,
    which the templates put after the token; an attribute sharing a word with the parent is skipped."""
    parent_words = set(parent.lower().split())
    candidates = [a for a in attributes if not set(a.lower().split()) & parent_words]
    if not candidates:
        raise ValueError(
            f"`init_caption=auto`: every attribute shares a word with the parent {parent!r}: give other attributes"
        )
    scores = attribute_scores(clip, image_features, parent, candidates, template)  # (A,)
    return " ".join(candidates[i] for i in scores.argsort(descending=True)[:n_words].tolist())


def initialize(
    clip,
    parent: str,
    config: TokenTrainConfig,
    image_features: torch.Tensor | None = None,
    attributes: Sequence[str] = (),
) -> Initialization:
    """The token's initial vectors (see the module docstring); `image_features` and `attributes` for `auto`."""
    table = clip.token_embedding.weight.detach().float().cpu()
    caption = config.init_caption
    if caption is None:
        ids = token_ids(clip, parent)
        if not ids:
            raise ValueError(f"parent word {parent!r} has no tokens: give a word such as 'dress'")
        mean = table[torch.tensor(ids)].mean(0)  # one sub-token: its embedding; several: their mean
        return Initialization(mean.expand(config.n_vectors, -1).clone(), "parent", parent, _decode(clip, ids))
    kind = "caption"
    if caption.strip().lower() == "auto":
        if image_features is None or not len(attributes):
            raise ValueError("`init_caption=auto` needs the concept's image features and an attribute vocabulary")
        caption, kind = (
            auto_caption(clip, image_features, parent, attributes, config.auto_caption_words, config.class_template),
            "auto",
        )
    ids = token_ids(clip, caption)
    if not ids:
        raise ValueError(
            f"`init_caption` {caption!r} has no tokens: give a short description such as 'a red tea kettle'"
        )
    limit = clip.context_length - 12
    if len(ids) > limit:
        raise ValueError(
            f"`init_caption` has {len(ids)} tokens; at most {limit} fit in a prompt with the template: shorten it"
        )
    return Initialization(table[torch.tensor(ids)].clone(), kind, caption, _decode(clip, ids))
