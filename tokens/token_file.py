"""The token file: one custom token as a safetensors file that describes itself.

Layout: the one tensor ``{placeholder: float32 (n_vectors, width)}`` that diffusers' textual-inversion loader
reads (``pipe.load_textual_inversion(path)``: a multi-vector token becomes ``<name>``, ``<name>_1``, ...; the
text encoder's width must equal the token's), and in the safetensors header (``__metadata__``, strings only;
dicts as JSON) everything needed to know where it belongs and how it was made:

| key              | what                                                                          |
| ---------------- | ----------------------------------------------------------------------------- |
| format_version   | FORMAT_VERSION of this layout                                                 |
| name             | the token's name in its store; the placeholder is ``<name>``                  |
| model            | CLIP SPEC whose input embedding space the vectors live in (retrieval.models.clip)  |
| width            | the text width of that CLIP (= n columns of the tensor)                       |
| model_weights    | retrieval.models.clip.weights_id(model): a model folder's weights, checked on load ("": not checked) |
| diffusion        | diffusion SPEC trained through ("" when none: method pt)                      |
| parent           | the parent word, e.g. "dress"                                                 |
| method           | ours, ti, pt or batex                                                         |
| config           | JSON: the TokenTrainConfig it was trained with                                |
| subspace         | JSON: how the vectors are constrained (attribute words and dimension, basis)  |
| init             | JSON: how they were initialised (parent, caption, auto caption, words)        |
| training         | JSON: steps run, last losses, seconds, whether it stopped early and why       |
| concept_feature  | JSON: the normalised mean CLIP image feature of the concept images (GAIR)     |
| concept_images   | the folder the concept images were read from (shown in query reports)         |
| context_attributes | JSON: attribute words for GAIR's context query ([] : the query's default)   |
| created          | ISO time                                                                      |

In prompts a token is named by its placeholder ``<name>`` (PLACEHOLDER_PATTERN, `placeholder_names`), or by ``*``
(STAR) when the prompt uses one token: this module defines that syntax for the whole project.

The vectors stored are the token's effective input embeddings (after the subspace projection of `ours`, Perera et
al. Sec. 4.3's P(e_* - mu_e) + mu_e, the basis combination of `batex`, BaTex Eq. 7): what a prompt's placeholder is
replaced by, here and in diffusers. n_vectors > 1 is one placeholder of several vectors (Perera et al. Sec. 5: "10
trainable tokens"; Qiu et al.'s <0> ... <n>); diffusers expands it to <name>, <name>_1, ...
Files are written atomically (temporary file, fsync, rename).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from retrieval.io.atomic import write_atomic
from retrieval.models.clip import weights_changed

FORMAT_VERSION = 1
# The placeholder syntax, defined here once: a prompt names a token as <name>, or as * when it uses one token.
STAR = "*"  # the placeholder of a prompt's one token, whatever its name
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # a token name: a file name in the store, and <name> in prompts
NAME_PATTERN = re.compile(rf"^{_NAME}$")  # a whole name
PLACEHOLDER_PATTERN = re.compile(rf"<({_NAME})>")  # a <name> in a prompt; group 1: the name
_JSON_KEYS = ("config", "subspace", "init", "training", "concept_feature", "context_attributes")


class TokenFileError(ValueError):
    """A token file that cannot be used as it is; the message says what to do."""


class TokenModelMismatch(TokenFileError):
    """A token made for another CLIP model than the one in use."""


@dataclass(frozen=True)
class TokenInfo:
    """What a token file says about itself (its safetensors metadata)."""

    name: str  # name in the store; placeholder = "<name>"
    model: str  # CLIP SPEC of the embedding space
    width: int  # text width of that CLIP
    n_vectors: int  # vectors the placeholder expands to
    parent: str  # parent word
    method: str  # ours | ti | pt | batex
    diffusion: str = ""  # diffusion SPEC trained through ("" when none)
    # retrieval.models.clip.weights_id of `model` when the token was made: catches a model folder retrained in place
    # ("" when the SPEC pins its weights, and in files from before the field: those are not checked)
    model_weights: str = ""
    config: dict = field(default_factory=dict)  # training config
    subspace: dict = field(default_factory=dict)  # constraint on the vectors
    init: dict = field(default_factory=dict)  # initialisation
    training: dict = field(default_factory=dict)  # training summary
    created: str = ""  # ISO time
    # optional, for composed queries and GAIR (files without them still load; `query --concept-images` fills in)
    concept_feature: list = field(default_factory=list)  # (dim,) normalised mean CLIP feature of the concept images
    concept_images: str = ""  # folder the concept images came from
    context_attributes: list = field(default_factory=list)  # GAIR's attribute words A for this concept
    format_version: int = FORMAT_VERSION

    @property
    def placeholder(self) -> str:
        return placeholder_for(self.name)


@dataclass
class CustomToken:
    """A learned token: its vectors (n_vectors, width) float32 and what it is."""

    vectors: torch.Tensor
    info: TokenInfo

    @property
    def placeholder(self) -> str:
        return self.info.placeholder


def placeholder_for(name: str) -> str:
    """'my-dress' -> '<my-dress>': the token's own placeholder (never a word of CLIP's vocabulary, which
    diffusers' loader refuses)."""
    return f"<{name}>"


def placeholder_names(text: str) -> list[str]:
    """The names of the <name> placeholders in TEXT, in order, repeats kept:
    'a <a> and a <b.1> <a>' -> ['a', 'b.1', 'a']."""
    return PLACEHOLDER_PATTERN.findall(text)


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name or ""):
        raise TokenFileError(
            f"token name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', starting with a letter "
            "or digit (it becomes a file name and the placeholder <NAME>)"
        )
    return name


def check_model(info: TokenInfo, model: str, width: int | None = None, where: str = "") -> None:
    """Refuse a token made for another CLIP, or for other weights behind the same SPEC (a model folder retrained in
    place): its vectors mean nothing in another embedding space."""
    token = f"token {info.name!r}{' (' + where + ')' if where else ''}"
    if info.model != model or (width is not None and info.width != width):
        raise TokenModelMismatch(
            f"{token} was made for `model={info.model}` "
            f"(width {info.width}), but this run uses `model={model}`{f' (width {width})' if width is not None else ''}: "
            f"pass `model={info.model}`, or learn the token again with `model={model}`"
        )
    now = weights_changed(model, info.model_weights)
    if now:
        raise TokenModelMismatch(
            f"{token} was made with other weights of `model={model}` (weights {info.model_weights}, now {now}): the "
            "model was retrained or replaced since; learn the token again"
        )


def save_token_file(path: str | Path, token: CustomToken) -> Path:
    """Write TOKEN to PATH atomically (see the module docstring for the layout)."""
    from safetensors.torch import save_file

    info = token.info
    check_name(info.name)
    vectors = token.vectors.detach().to("cpu", torch.float32).contiguous()
    if vectors.ndim != 2 or vectors.shape != (info.n_vectors, info.width):
        raise TokenFileError(
            f"token {info.name!r}: vectors {tuple(vectors.shape)} do not match n_vectors={info.n_vectors}, width={info.width}"
        )
    if not torch.isfinite(vectors).all():
        raise TokenFileError(f"token {info.name!r}: refusing to save non-finite vectors")
    metadata = {"format": "pt"}
    for key, value in asdict(info).items():
        metadata[key] = json.dumps(value, sort_keys=True, default=str) if key in _JSON_KEYS else str(value)
    path = Path(path)
    write_atomic(
        path, lambda p: save_file({info.placeholder: vectors}, str(p), metadata=metadata), suffix=".safetensors"
    )
    return path


def _info_from_metadata(metadata: dict[str, str], path: Path) -> TokenInfo:
    missing = [
        k for k in ("format_version", "name", "model", "width", "n_vectors", "parent", "method") if k not in metadata
    ]
    if missing:
        raise TokenFileError(
            f"{path} is a safetensors file but not a token file of this project (no {', '.join(missing)} in its "
            "metadata): a plain textual-inversion embedding can be loaded with diffusers, not used here"
        )
    version = int(metadata["format_version"])
    if version != FORMAT_VERSION:
        raise TokenFileError(
            f"{path} has token format_version {version}; this code reads {FORMAT_VERSION}: learn the token again"
        )
    fields = {
        k: json.loads(metadata[k]) if k in _JSON_KEYS else metadata[k]
        for k in TokenInfo.__dataclass_fields__
        if k in metadata
    }
    fields.update(width=int(fields["width"]), n_vectors=int(fields["n_vectors"]), format_version=version)
    return TokenInfo(**fields)


def read_token_info(path: str | Path) -> TokenInfo:
    """The metadata of a token file, without reading its tensor."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no token file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise TokenFileError(
            f"{path} is not a readable safetensors file ({e}); delete it and learn the token again"
        ) from e
    return _info_from_metadata(metadata, path)


def load_token_file(path: str | Path, model: str | None = None, width: int | None = None) -> CustomToken:
    """Read a token file; with MODEL (and WIDTH) given, refuse a token made for another CLIP."""
    from safetensors.torch import load_file

    path = Path(path)
    info = read_token_info(path)
    if model is not None:
        check_model(info, model, width, where=str(path))
    tensors = load_file(str(path))
    if list(tensors) != [info.placeholder]:
        raise TokenFileError(f"{path} should hold exactly one tensor named {info.placeholder!r}, has {sorted(tensors)}")
    vectors = tensors[info.placeholder].float()
    if tuple(vectors.shape) != (info.n_vectors, info.width):
        raise TokenFileError(
            f"{path}: tensor {tuple(vectors.shape)} disagrees with its metadata ({info.n_vectors}, {info.width})"
        )
    return CustomToken(vectors=vectors, info=info)
