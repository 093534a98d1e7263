"""The images of a gallery folder, and a torch Dataset that decodes them in DataLoader workers.

    files = scan_gallery("~/Pictures")                      # sorted GalleryFile(path, bytes, mtime_ns)
    ds = GalleryDataset(root, files, preprocess)
    loader = DataLoader(ds, batch_size=64, num_workers=4, collate_fn=collate_gallery, worker_init_fn=worker_init)
    for batch in loader:                                    # GalleryBatch: only batch.ok items have pixels
        ...

A file that cannot be decoded never stops the loader: its item comes back marked bad, with the reason.

A gallery is a local folder or an fsspec URL (`s3://bucket/photos`, `gs://...`, `file:///srv/photos`, `memory://g`;
the filesystem's package must be installed: s3fs, gcsfs, ...), so that workers on other machines can read it
(retrieval.distributed). `resolve_gallery` gives the one string an index records for either; local folders take the
os.scandir / os.stat path below, URLs the fsspec one (listing: `fs.find`; reading: `fs.cat_file`).
"""

from __future__ import annotations

import os
import stat
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from retrieval.io.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, load_image_and_size


@dataclass(frozen=True)
class GalleryFile:
    path: str  # relative to the gallery root, POSIX separators ("sub/dir/a.jpg")
    bytes: int  # file size (of the target, for a symlinked file)
    mtime_ns: int  # st_mtime_ns (of the target, for a symlinked file)


def is_url(gallery: str | os.PathLike) -> bool:
    """Whether GALLERY names an fsspec filesystem (`s3://...`, `memory://...`, `simplecache::s3://...`), not a local
    folder. A Path is always a local folder."""
    return isinstance(gallery, str) and "://" in gallery


def resolve_gallery(gallery: str | os.PathLike) -> str:
    """The string an index records for GALLERY and that shard paths are relative to: a URL as given (without a
    trailing "/"), a local folder as its absolute resolved path ("~" expanded). Idempotent."""
    if is_url(gallery):
        return gallery.rstrip("/")
    return str(Path(gallery).expanduser().resolve())


def url_filesystem(url: str):
    """(fsspec filesystem, path inside it) for URL; says which package to install when its protocol lacks one."""
    try:
        import fsspec
    except ImportError as e:  # torch depends on fsspec, so this is rare
        raise ImportError(f"gallery {url} is a URL: install fsspec (`pip install fsspec`)") from e
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:
        raise ImportError(f"gallery {url}: its filesystem needs a package that is not installed ({e})") from e
    except ValueError as e:  # unknown protocol
        raise ValueError(f"gallery {url}: {e}; known protocols: fsspec.available_protocols()") from e


def scan_gallery(root: str | os.PathLike) -> list[GalleryFile]:
    """All files under ROOT whose extension (any case) is in IMAGE_EXTENSIONS, sorted by path.
    ROOT is a local folder or an fsspec URL (`scan_url_gallery`).

    Symlinks are followed: a linked file is listed under its link path, a linked directory is walked under
    its link path too, except where it leads back to one of its own ancestors (a loop), so every file is
    listed once per path that does not go round a loop. Unreadable directories, broken links and names
    that are not valid UTF-8 are skipped with a warning; only a missing or unreadable root raises.
    """
    if is_url(root):
        return scan_url_gallery(root)
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"gallery folder {root} does not exist: check the path")
    if not root.is_dir():
        raise NotADirectoryError(f"gallery {root} is a file, not a folder: pass the folder that holds the images")
    try:
        top = os.stat(root)
        with os.scandir(root):
            pass
    except PermissionError as e:
        raise PermissionError(f"cannot read gallery folder {root} ({e.strerror}): fix its permissions") from e

    found: list[GalleryFile] = []
    # Depth-first; each entry: (directory on disk, its path relative to root, (st_dev, st_ino) of it and
    # of its ancestors: a directory whose identity is among its ancestors' is a loop).
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [(str(root), "", frozenset({(top.st_dev, top.st_ino)}))]
    while stack:
        directory, rel, ancestors = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError as e:
            warnings.warn(f"skipping unreadable folder {directory} ({type(e).__name__}: {e.strerror})", stacklevel=2)
            continue
        for entry in entries:
            name = entry.name
            entry_rel = f"{rel}/{name}" if rel else name
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                warnings.warn(f"skipping {entry.path!r}: its name is not valid UTF-8; rename it", stacklevel=2)
                continue
            is_image = os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            try:
                if not is_image and not entry.is_dir():  # is_dir follows symlinks; no stat for other files
                    continue
                st = entry.stat()  # follows symlinks
            except OSError as e:
                if entry.is_symlink():
                    warnings.warn(f"skipping broken symlink {entry.path} ({e.strerror})", stacklevel=2)
                else:
                    warnings.warn(f"skipping {entry.path} ({type(e).__name__}: {e.strerror})", stacklevel=2)
                continue
            if stat.S_ISDIR(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if key not in ancestors:  # else a loop: this directory is already being walked above
                    stack.append((entry.path, entry_rel, ancestors | {key}))
            elif is_image and stat.S_ISREG(st.st_mode):  # not a FIFO or device named *.jpg: opening those blocks
                found.append(GalleryFile(path=entry_rel, bytes=st.st_size, mtime_ns=st.st_mtime_ns))
    found.sort(key=lambda f: f.path)
    return found


def scan_url_gallery(url: str) -> list[GalleryFile]:
    """`scan_gallery` for an fsspec URL: every file under it (`fs.find`) with an image extension, sorted by path.
    mtime_ns is the filesystem's modification time (s3 LastModified, gcs updated, local mtime, memory created) at
    the precision it gives; where it gives none, 0 (a changed file is then seen only by its size)."""
    fs, top = url_filesystem(url)
    top = top.rstrip("/")
    if not fs.exists(top):
        raise FileNotFoundError(f"gallery {url} does not exist: check the URL")
    if not fs.isdir(top):
        raise NotADirectoryError(f"gallery {url} is a file, not a folder: pass the folder that holds the images")
    found: list[GalleryFile] = []
    no_time = 0
    for name, info in fs.find(top, withdirs=False, detail=True).items():
        rel = name[len(top) + 1 :] if name.startswith(top + "/") else name.rsplit("/", 1)[-1]
        if info.get("type", "file") != "file" or os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        mtime_ns = _mtime_ns(info)
        no_time += mtime_ns is None
        found.append(GalleryFile(path=rel, bytes=int(info.get("size") or 0), mtime_ns=mtime_ns or 0))
    if no_time:
        warnings.warn(f"{url}: the filesystem gives no modification time for {no_time} files", stacklevel=2)
    found.sort(key=lambda f: f.path)
    return found


# the keys fsspec filesystems give a file's modification time under, most specific first
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


def _mtime_ns(info: dict) -> int | None:
    """A file's modification time in ns from an fsspec info dict (float seconds, datetime or ISO string)."""
    for key in _MTIME_KEYS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if isinstance(value, datetime):
            value = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
            delta = value - datetime(1970, 1, 1, tzinfo=timezone.utc)
            return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000
        return int(round(float(value) * 1e9))
    return None


@dataclass(frozen=True)
class DecodedItem:
    """One file as a DataLoader worker hands it back."""

    index: int  # position in the dataset's `files`
    pixels: torch.Tensor | None  # (C, H, W) from the transform; None for a bad item
    width: int  # upright decoded width; 0 for a bad item
    height: int  # upright decoded height; 0 for a bad item
    reason: str  # "" for a good item, else why it is bad (BadImage.reason categories)

    @property
    def ok(self) -> bool:
        return self.pixels is not None


class GalleryDataset(torch.utils.data.Dataset):
    """FILES of the gallery at ROOT (a local folder or an fsspec URL), decoded with load_image and turned into
    tensors by TRANSFORM. A file of a URL gallery is read whole into a temporary file that load_image decodes,
    so both kinds of gallery pass the very same checks.

    Never raises for a bad file: the item comes back with `ok` False and the reason (BadImage's, or
    "preprocess failed (...)" when the transform raises or returns something that is not a (C, H, W) tensor).
    Picklable when TRANSFORM is, so workers may come from spawn or forkserver.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        files: Sequence[GalleryFile],
        transform: Callable[[Image.Image], torch.Tensor],
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_size: int | None = None,  # the encoder's input size: JPEGs decode at a reduced scale down to it
    ):
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.root = str(root)
        self.files = list(files)
        self.transform = transform
        self.max_pixels = max_pixels
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> DecodedItem:
        try:
            image, (width, height) = load_gallery_image(
                self.root, self.files[i].path, max_pixels=self.max_pixels, min_size=self.min_size
            )
        except BadImage as e:
            return _bad(i, e.reason)
        try:
            pixels = self.transform(image)
        except Exception as e:  # noqa: BLE001 - one odd image must not stop the whole gallery
            return _bad(i, f"preprocess failed ({type(e).__name__}: {e})")
        if not isinstance(pixels, torch.Tensor) or pixels.ndim != 3:
            got = tuple(pixels.shape) if isinstance(pixels, torch.Tensor) else type(pixels).__name__
            return _bad(i, f"preprocess failed (expected a (C, H, W) tensor, got {got})")
        return DecodedItem(index=i, pixels=pixels, width=width, height=height, reason="")


def load_gallery_image(
    root: str | os.PathLike, rel: str, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """load_image_and_size of the file REL of the gallery at ROOT: a local folder, or an fsspec URL whose file is
    read whole into a temporary file that load_image decodes (so both pass the very same checks). Raises BadImage
    for a file that cannot be used, an unreadable one at a URL included."""
    if not is_url(root):
        return load_image_and_size(os.path.join(root, rel), max_pixels=max_pixels, min_size=min_size)
    if ".." in rel.split("/"):  # paths come from the gallery's listing: never one that leads outside it
        raise BadImage(f"path {rel!r} leads outside the gallery")
    fs, top = url_filesystem(str(root))  # fsspec caches filesystem instances: cheap after the first call
    try:
        data = fs.cat_file(f"{top.rstrip('/')}/{rel}")
    except Exception as e:  # noqa: BLE001 - every filesystem raises its own errors; one file must not stop it
        raise BadImage(f"unreadable file ({type(e).__name__}: {e})") from e
    with tempfile.NamedTemporaryFile(suffix=os.path.splitext(rel)[1]) as tmp:
        tmp.write(data)
        tmp.flush()
        return load_image_and_size(tmp.name, max_pixels=max_pixels, min_size=min_size)


def _bad(index: int, reason: str) -> DecodedItem:
    return DecodedItem(index=index, pixels=None, width=0, height=0, reason=reason)


@dataclass
class GalleryBatch:
    indices: torch.Tensor  # (B,) int64, positions into the dataset's `files`
    pixels: torch.Tensor  # (n_ok, C, H, W), only the good items, in batch order; (0, 0, 0, 0) if none
    ok: torch.Tensor  # (B,) bool
    widths: torch.Tensor  # (B,) int64, upright decoded width (0 for bad items)
    heights: torch.Tensor  # (B,) int64
    reasons: list[str]  # (B,), "" for good items

    def pin_memory(self) -> "GalleryBatch":
        """Called by DataLoader(pin_memory=True): page-locks the pixels for a faster copy to the GPU."""
        self.pixels = self.pixels.pin_memory()
        return self


def collate_gallery(items: Sequence[DecodedItem]) -> GalleryBatch:
    """DataLoader collate_fn: DecodedItems -> one GalleryBatch; bad items keep their place in all but `pixels`."""
    good = [it.pixels for it in items if it.pixels is not None]
    shapes = {tuple(p.shape) for p in good}
    if len(shapes) > 1:
        raise ValueError(
            f"the transform gave images of different shapes {sorted(shapes)}: it must resize and crop to one "
            "size (open_clip's preprocess does)"
        )
    return GalleryBatch(
        indices=torch.tensor([it.index for it in items], dtype=torch.int64),
        pixels=torch.stack(good) if good else torch.zeros((0, 0, 0, 0)),
        ok=torch.tensor([it.ok for it in items], dtype=torch.bool),
        widths=torch.tensor([it.width for it in items], dtype=torch.int64),
        heights=torch.tensor([it.height for it in items], dtype=torch.int64),
        reasons=[it.reason for it in items],
    )


def worker_init(worker_id: int) -> None:
    """DataLoader worker_init_fn: one torch thread per decoding worker.

    Workers only decode and resize; with torch's default (one thread per core) each would start an
    OpenMP pool that fights the encoder for the cores (and a pool inherited over fork can deadlock).
    """
    torch.set_num_threads(1)
