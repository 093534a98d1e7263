"""Weighted query mixes in the spirit of rclip: `"2:a red dress" + photo.jpg - "hat"` -> terms -> one query vector.

    parse_mix('"2:a red dress" + photo.jpg - "hat"')
    -> [Term("text", "a red dress", 2.0, 0), Term("file", "photo.jpg", 1.0, 17), Term("text", "hat", -1.0, 29)]

Grammar (whitespace between the parts is free):

    mix    := [sign] term (sign term)*
    sign   := "+" | "-"
    term   := [weight ":"] ( '"' text '"' | "#" digits | filename )
    weight := a positive number: 2, 0.5, .5  (also allowed inside the quotes: "2:a red dress")
    text   := any characters; \\" is a quote, \\\\ a backslash
    filename := characters other than space and quotes, ending in an image extension (photo.jpg): an image
                file (in the server an upload of that name, in the CLI a path)

`#123` is the gallery image of id 123. A query with none of those marks (no `"`, no `#ID`, no FILE.jpg word) is one
plain sentence, weight 1: "a person wearing a * on the grass" stays what it is, `-` and `'` included.

The mixed vector is sum_i w_i f(term_i), L2-normalised (rclip adds its weighted unit features the same way), where
f is the CLIP text feature of a text term and the CLIP image feature of an image term; `-` negates w_i.
`Engine.query_mix` answers a mix; what a FILE term names is the caller's to supply (the CLI opens it as a path,
`read_mix_files`; the server takes it from the request's uploads): the engine never opens a path written in a query.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.io.images import IMAGE_EXTENSIONS, BadImage, load_image

TEXT, GALLERY_ID, FILE = "text", "id", "file"  # the kinds of term

_WEIGHT = re.compile(r"(\d+(?:\.\d*)?|\.\d+):")
_ID = re.compile(r"#(\d+)")
_FILE = re.compile(r"[^\s\"'+]+")  # a filename may contain "-" (my-photo.jpg) but not "+" or quotes
_MARK = re.compile(
    r"(?:^|[\s+\-:])(?:#\d+|[^\s\"'+]+\.(?:" + "|".join(e[1:] for e in sorted(IMAGE_EXTENSIONS)) + r"))(?=$|[\s+\-])",
    re.IGNORECASE,
)


class MixError(ValueError):
    """A query mix that does not parse; says where (0-based character position) and what was expected there."""

    def __init__(self, text: str, position: int, expected: str):
        found = repr(text[position : position + 12]) if position < len(text) else "the end of the query"
        super().__init__(
            f"query mix, at position {position}: found {found}, expected {expected} "
            '(e.g. "2:a red dress" + photo.jpg - "hat", or "a dress" + #12)'
        )
        self.position, self.expected = position, expected


@dataclass(frozen=True)
class Term:
    kind: str  # TEXT, GALLERY_ID or FILE
    value: str  # the text, the id's digits, or the file name
    weight: float  # signed: the operator's sign times the written weight (default 1)
    start: int  # where the term begins in the query (0-based)

    def to_json(self) -> dict:
        return {"kind": self.kind, "value": self.value, "weight": self.weight}


def is_mix(text: str) -> bool:
    """Does TEXT use the mix syntax (a quote, a #ID or an image file name), rather than being one plain sentence?"""
    return '"' in text or _MARK.search(text) is not None


def parse_mix(text: str) -> list[Term]:
    """TEXT -> its terms (see the module docstring); a plain sentence is one text term. Raises MixError."""
    if not text or not text.strip():
        raise MixError(text or "", 0, 'a query (a sentence, "quoted text", #ID or an image file name)')
    if not is_mix(text):
        return [Term(TEXT, " ".join(text.split()), 1.0, len(text) - len(text.lstrip()))]
    terms: list[Term] = []
    pos = _skip(text, 0)
    sign = 1.0
    if pos < len(text) and text[pos] in "+-":  # an optional leading sign
        sign = -1.0 if text[pos] == "-" else 1.0
        pos = _skip(text, pos + 1)
    while True:
        term, pos = _term(text, pos, sign)
        terms.append(term)
        pos = _skip(text, pos)
        if pos == len(text):
            return terms
        if text[pos] not in "+-":
            raise MixError(text, pos, "'+' or '-' between two terms")
        sign = -1.0 if text[pos] == "-" else 1.0
        pos = _skip(text, pos + 1)


def _skip(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def _term(text: str, pos: int, sign: float) -> tuple[Term, int]:
    """One term at POS -> (the term, the position after it)."""
    start = pos
    weight = 1.0
    m = _WEIGHT.match(text, pos)
    if m:
        weight, pos = _positive(text, pos, m.group(1)), m.end()
    if pos >= len(text):
        raise MixError(text, pos, 'a term: "quoted text", #ID or an image file name')
    if text[pos] == '"':
        body, end = _quoted(text, pos)
        inner = _WEIGHT.match(body)
        if inner and m is None:  # "2:a red dress": the weight written inside the quotes
            weight, body = _positive(text, pos + 1, inner.group(1)), body[inner.end() :]
        body = " ".join(body.split())
        if not body:
            raise MixError(text, pos, "some text inside the quotes")
        return Term(TEXT, body, sign * weight, start), end
    m_id = _ID.match(text, pos)
    if m_id:
        return Term(GALLERY_ID, str(int(m_id.group(1))), sign * weight, start), m_id.end()
    if text[pos] == "#":
        raise MixError(text, pos + 1, "the digits of a gallery image id after '#' (#123)")
    m_file = _FILE.match(text, pos)
    if m_file and "." + m_file.group().rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and "." in m_file.group():
        return Term(FILE, m_file.group(), sign * weight, start), m_file.end()
    what = '"quoted text", #ID or an image file name (' + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
    if m_file:
        what += "; put words in double quotes"
    raise MixError(text, pos, what)


def _positive(text: str, pos: int, number: str) -> float:
    weight = float(number)
    if not weight > 0:
        raise MixError(text, pos, "a weight above 0 (the sign comes from '+' or '-')")
    return weight


def _quoted(text: str, pos: int) -> tuple[str, int]:
    """The text of the double-quoted string at POS (escapes resolved) and the position after its closing quote."""
    out, i = [], pos + 1
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text) and text[i + 1] in '"\\':
            out.append(text[i + 1])
            i += 2
        elif c == '"':
            return "".join(out), i + 1
        else:
            out.append(c)
            i += 1
    raise MixError(text, len(text), f"a closing '\"' for the quote opened at position {pos}")


def combine(weights: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """sum_i w_i v_i, L2-normalised: (n,) signed weights and (n, dim) unit features -> (dim,) float32 query."""
    weights = np.asarray(weights, np.float64).reshape(-1)
    vectors = np.asarray(vectors, np.float64)
    if vectors.ndim != 2 or len(vectors) != len(weights):
        raise ValueError(f"combine: {len(weights)} weights for vectors of shape {vectors.shape}")
    q = weights @ vectors  # (dim,)
    norm = float(np.linalg.norm(q))
    if norm < 1e-6:
        raise ValueError("the weighted terms cancel out (their sum is the zero vector): change a weight or a sign")
    return (q / norm).astype(np.float32)


def read_mix_files(terms: list[Term], folder: str | Path = ".") -> dict[str, Image.Image]:
    """The images the FILE terms name, read as paths relative to FOLDER by the safe decoder: {name as written: RGB}.
    A file that is missing or not a usable image raises ValueError naming it and saying why."""
    images = {}
    for t in terms:
        if t.kind == FILE and t.value not in images:
            try:
                images[t.value] = load_image(Path(folder) / t.value)
            except BadImage as e:
                raise ValueError(
                    f"the query names the image file {t.value!r}, which cannot be used: {e.reason} "
                    "(a file name in a mix is the path of an image file; put words in double quotes)"
                ) from None
    return images
