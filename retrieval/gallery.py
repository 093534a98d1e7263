"""The images of a gallery folder, and a torch Dataset that decodes them in DataLoader workers.

    files = scan_gallery("~/Pictures")                      # sorted GalleryFile(path, bytes, mtime_ns)
    ds = GalleryDataset(root, files, preprocess)
    loader = DataLoader(ds, batch_size=64, num_workers=4, collate_fn=collate_gallery, worker_init_fn=worker_init)
    for batch in loader:                                    # GalleryBatch: only batch.ok items have pixels
        ...

A file that cannot be decoded never stops the loader: its item comes back marked bad, with the reason.
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
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


def scan_gallery(root: str | os.PathLike) -> list[GalleryFile]:
    """All files under ROOT whose extension (any case) is in IMAGE_EXTENSIONS, sorted by path.

    Symlinks are followed: a linked file is listed under its link path, a linked directory is walked under
    its link path too, except where it leads back to one of its own ancestors (a loop), so every file is
    listed once per path that does not go round a loop. Unreadable directories, broken links and names
    that are not valid UTF-8 are skipped with a warning; only a missing or unreadable root raises.
    """
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
    """FILES of the gallery at ROOT, decoded with load_image and turned into tensors by TRANSFORM.

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
            image, (width, height) = load_image_and_size(
                os.path.join(self.root, self.files[i].path), max_pixels=self.max_pixels, min_size=self.min_size
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
