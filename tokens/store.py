"""The token store: a folder of token files, one per name, and a cache of generated negative images.

    <tokens-dir>/<name>.safetensors      a token (tokens.token_file)
    <tokens-dir>/.negatives/<key>/       images sampled for "image of a <parent>", reused across tokens
                                         (tokens.negatives)

A name already taken is refused unless `overwrite`; loading checks the token was made for the CLIP in use.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tokens.token_file import (
    CustomToken,
    TokenFileError,
    TokenInfo,
    check_name,
    load_token_file,
    read_token_info,
    save_token_file,
)

SUFFIX = ".safetensors"
NEGATIVES_DIR = ".negatives"


class TokenExistsError(TokenFileError):
    """A name already taken in the store."""


class TokenNotFoundError(TokenFileError):
    """A name the store does not have."""


@dataclass(frozen=True)
class StoreEntry:
    name: str
    path: Path
    info: TokenInfo | None  # None when the file cannot be read
    problem: str = ""  # why it cannot be read


class TokenStore:
    """A folder of tokens (created on first save)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(
                f"the token store {self.root} is a file, not a folder: pass a folder as `tokens_dir`"
            )

    @property
    def negatives_dir(self) -> Path:
        return self.root / NEGATIVES_DIR

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        return (
            sorted(p.name[: -len(SUFFIX)] for p in self.root.glob(f"*{SUFFIX}") if not p.name.startswith("."))
            if self.root.is_dir()
            else []
        )

    def exists(self, name: str) -> bool:
        return self.path(name).is_file()

    def entries(self) -> list[StoreEntry]:
        """Every token file with its metadata; unreadable files are listed with the reason, not raised."""
        out = []
        for name in self.names():
            path = self.path(name)
            try:
                out.append(StoreEntry(name, path, read_token_info(path)))
            except (TokenFileError, OSError) as e:
                out.append(StoreEntry(name, path, None, str(e)))
        return out

    def _missing(self, name: str) -> TokenNotFoundError:
        known = self.names()
        return TokenNotFoundError(
            f"no token named {name!r} in {self.root}"
            + (f" (it has: {', '.join(known)})" if known else " (it holds no tokens)")
            + ": learn it first, or pass the `tokens_dir` that holds it"
        )

    def info(self, name: str) -> TokenInfo:
        if not self.exists(name):
            raise self._missing(name)
        return read_token_info(self.path(name))

    def load(self, name: str, model: str | None = None, width: int | None = None) -> CustomToken:
        """The token NAME; with MODEL given, an error if it was made for another CLIP (naming both)."""
        if not self.exists(name):
            raise self._missing(name)
        return load_token_file(self.path(name), model=model, width=width)

    def check_free(self, name: str, overwrite: bool = False) -> None:
        """Refuse a taken name unless OVERWRITE (call before training, not only before saving)."""
        if overwrite or not self.exists(name):
            return
        try:
            info = read_token_info(self.path(name))
            what = f" (method {info.method}, parent {info.parent!r}, model {info.model}, made {info.created})"
        except (TokenFileError, OSError):
            what = ""
        raise TokenExistsError(
            f"a token named {name!r} already exists in {self.root}{what}: choose another name, delete it first, "
            "or pass `overwrite=True`"
        )

    def save(self, token: CustomToken, overwrite: bool = False) -> Path:
        self.check_free(token.info.name, overwrite)
        self.root.mkdir(parents=True, exist_ok=True)
        return save_token_file(self.path(token.info.name), token)

    def delete(self, name: str) -> Path:
        path = self.path(name)
        if not path.is_file():
            raise self._missing(name)
        path.unlink()
        return path
