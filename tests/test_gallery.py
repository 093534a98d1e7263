"""scan_gallery finds exactly the image files (sorted, loop-safe); GalleryDataset decodes them in workers."""

import os
import pickle
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from retrieval.gallery import (
    DecodedItem,
    GalleryBatch,
    GalleryDataset,
    GalleryFile,
    collate_gallery,
    scan_gallery,
    worker_init,
)
from retrieval.io.images import load_image
from tests.badfiles import BAD_REASONS, OK_SIZES, write_bad_files

PREPROCESS = open_clip.image_transform(32, is_train=False)  # Resize, CenterCrop, ToTensor, Normalize -> (3, 32, 32)
needs_symlinks = pytest.mark.skipif(os.name == "nt", reason="symlinks need privileges on Windows")


def touch_image(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (size, 0, 0)).save(path, format="PNG")  # content irrelevant to the scan


def paths(files: list[GalleryFile]) -> list[str]:
    return [f.path for f in files]


# ----- scan_gallery


def test_scan_finds_image_extensions_only_sorted_nested_any_case(tmp_path):
    images = ["b.JPG", "a/c.png", "a/deep/er/e.Jpeg", "z.webp", "x.jpg/f.gif", "m.TIFF", "m.tif", "n.bmp"]
    for i, rel in enumerate(reversed(images)):
        touch_image(tmp_path / rel, size=4 + i)
    for rel in ["README.md", "a/d.txt", "noext", "a/deep/photo.jpg.bak", "a/.DS_Store", "h.heic"]:
        (tmp_path / rel).write_text("not an image")
    files = scan_gallery(tmp_path)
    assert paths(files) == sorted(images)  # "x.jpg/" is a folder: walked, not listed
    assert paths(files) == ["a/c.png", "a/deep/er/e.Jpeg", "b.JPG", "m.TIFF", "m.tif", "n.bmp", "x.jpg/f.gif", "z.webp"]
    for f in files:
        st = os.stat(tmp_path / f.path)
        assert (f.bytes, f.mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert scan_gallery(tmp_path) == files  # deterministic
    assert scan_gallery(str(tmp_path)) == files


def test_scan_order_does_not_depend_on_creation_order(tmp_path):
    names = [f"d{i % 3}/img{i:02d}.png" for i in range(12)]
    for order, root in ((names, tmp_path / "one"), (names[::-1], tmp_path / "two")):
        for rel in order:
            touch_image(root / rel)
    assert paths(scan_gallery(tmp_path / "one")) == paths(scan_gallery(tmp_path / "two")) == sorted(names)


def test_scan_of_empty_folder(tmp_path):
    assert scan_gallery(tmp_path) == []


@needs_symlinks
def test_scan_symlink_loops_end_and_each_file_is_listed_once_per_loop_free_path(tmp_path):
    touch_image(tmp_path / "top.jpg")
    touch_image(tmp_path / "sub/img.png")
    os.symlink("..", tmp_path / "sub/up")  # sub/up -> root: a loop
    os.symlink(".", tmp_path / "sub/self")  # sub/self -> sub: a loop
    os.symlink("sub", tmp_path / "alias")  # alias -> sub: a second, loop-free path to sub
    os.symlink("sub/img.png", tmp_path / "link.jpg")  # a linked file, listed under its link path
    files = scan_gallery(tmp_path)
    assert paths(files) == ["alias/img.png", "link.jpg", "sub/img.png", "top.jpg"]
    target = os.stat(tmp_path / "sub/img.png")
    for f in files[:3]:
        assert (f.bytes, f.mtime_ns) == (target.st_size, target.st_mtime_ns)


@needs_symlinks
def test_scan_follows_a_symlinked_root_and_skips_broken_links(tmp_path):
    touch_image(tmp_path / "real/a.png")
    os.symlink("nowhere.png", tmp_path / "real/broken.png")
    os.symlink("nowhere", tmp_path / "real/broken_dir")  # no image extension: skipped without a word
    os.symlink("real", tmp_path / "root")
    with pytest.warns(UserWarning, match=r"skipping broken symlink .*broken\.png"):
        files = scan_gallery(tmp_path / "root")
    assert paths(files) == ["a.png"]


def test_scan_warns_and_goes_on_past_unreadable_folders(tmp_path, monkeypatch):
    touch_image(tmp_path / "a.png")
    touch_image(tmp_path / "locked/b.png")
    touch_image(tmp_path / "open/c.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.path.basename(os.fspath(path)) == "locked":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)  # chmod 000 does not stop root, who may run the tests
    with pytest.warns(UserWarning, match=r"skipping unreadable folder .*locked \(PermissionError: Permission denied\)"):
        files = scan_gallery(tmp_path)
    assert paths(files) == ["a.png", "open/c.png"]


def test_scan_skips_names_that_are_not_utf8(tmp_path):
    touch_image(tmp_path / "ok.png")
    try:
        touch_image(Path(os.fsdecode(bytes(tmp_path) + b"/bad\xff.png")))
    except (OSError, UnicodeError):
        pytest.skip("this file system does not take non-UTF-8 names")
    with pytest.warns(UserWarning, match="not valid UTF-8; rename it"):
        assert paths(scan_gallery(tmp_path)) == ["ok.png"]


def test_scan_of_missing_root_or_file_root_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"gallery folder .*missing does not exist: check the path"):
        scan_gallery(tmp_path / "missing")
    touch_image(tmp_path / "a.png")
    with pytest.raises(NotADirectoryError, match=r"a\.png is a file, not a folder"):
        scan_gallery(tmp_path / "a.png")


# ----- GalleryDataset, collate_gallery, worker_init


@pytest.fixture(scope="module")
def bad_gallery(tmp_path_factory) -> tuple[Path, list[GalleryFile], dict[str, str]]:
    root = tmp_path_factory.mktemp("gallery")
    expected = write_bad_files(root)
    files = scan_gallery(root)
    assert paths(files) == sorted(expected)
    return root, files, expected


def check_batches(batches: list[GalleryBatch], root: Path, files: list[GalleryFile], expected: dict[str, str]) -> None:
    """Every file appears once, in order, with the right ok flag, reason, size and pixels."""
    indices = torch.cat([b.indices for b in batches])
    assert indices.tolist() == list(range(len(files)))
    for b in batches:
        n = len(b.indices)
        assert b.ok.shape == b.widths.shape == b.heights.shape == (n,) and len(b.reasons) == n
        assert b.indices.dtype == b.widths.dtype == b.heights.dtype == torch.int64 and b.ok.dtype == torch.bool
        assert b.pixels.shape[0] == int(b.ok.sum())
        good = 0
        for j, i in enumerate(b.indices.tolist()):
            name = files[i].path
            assert bool(b.ok[j]) == (expected[name] == "ok"), name
            if expected[name] == "ok":
                assert b.reasons[j] == ""
                assert (int(b.widths[j]), int(b.heights[j])) == OK_SIZES[name]
                assert torch.equal(b.pixels[good], PREPROCESS(load_image(root / name)))
                good += 1
            else:
                assert b.reasons[j].startswith(BAD_REASONS[name]), (name, b.reasons[j])
                assert (int(b.widths[j]), int(b.heights[j])) == (0, 0)
        if good:
            assert b.pixels.shape[1:] == (3, 32, 32) and b.pixels.dtype == torch.float32


def test_dataset_items_mark_bad_files_and_never_raise(bad_gallery):
    root, files, expected = bad_gallery
    ds = GalleryDataset(root, files, PREPROCESS)
    assert len(ds) == len(files) == 19
    items = [ds[i] for i in range(len(ds))]
    assert [it.index for it in items] == list(range(len(files)))
    assert {files[it.index].path for it in items if it.ok} == set(OK_SIZES)
    check_batches([collate_gallery(items)], root, files, expected)


def test_dataloader_with_workers(bad_gallery):
    root, files, expected = bad_gallery
    ds = GalleryDataset(root, files, PREPROCESS)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, collate_fn=collate_gallery, worker_init_fn=worker_init
    )
    batches = list(loader)
    assert [len(b.indices) for b in batches] == [4, 4, 4, 4, 3]
    check_batches(batches, root, files, expected)


def test_small_max_pixels_marks_larger_images_bad(bad_gallery):
    root, files, _ = bad_gallery
    ds = GalleryDataset(root, files, PREPROCESS, max_pixels=20 * 20)
    by_name = {files[i].path: ds[i] for i in range(len(ds))}
    assert by_name["gray.jpg"].ok and by_name["bitonal.png"].ok  # 20 x 20 and 16 x 8
    assert by_name["good.png"].reason == "too many pixels (36 x 28 > 400)"


def num_threads_transform(image: Image.Image) -> torch.Tensor:
    return torch.full((1, 1, 1), float(torch.get_num_threads()))


def test_worker_init_gives_each_worker_one_thread(bad_gallery):
    root, files, _ = bad_gallery
    ds = GalleryDataset(root, files[:4], num_threads_transform)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=2, num_workers=2, collate_fn=collate_gallery, worker_init_fn=worker_init
    )
    threads = torch.cat([b.pixels.flatten() for b in loader])
    assert threads.tolist() == [1.0] * int(sum(ds[i].ok for i in range(len(ds))))


def test_transform_failures_are_bad_items(bad_gallery):
    root, files, _ = bad_gallery
    i = next(k for k, f in enumerate(files) if f.path == "good.png")

    def raises(image):
        raise ValueError("no way")

    item = GalleryDataset(root, files, raises)[i]
    assert (item.ok, item.pixels, item.width, item.height) == (False, None, 0, 0)
    assert item.reason == "preprocess failed (ValueError: no way)"
    item = GalleryDataset(root, files, lambda im: np.zeros((3, 4, 4)))[i]
    assert item.reason == "preprocess failed (expected a (C, H, W) tensor, got ndarray)"
    item = GalleryDataset(root, files, lambda im: torch.zeros(4, 4))[i]
    assert item.reason == "preprocess failed (expected a (C, H, W) tensor, got (4, 4))"


def test_dataset_pickles_for_spawn_and_forkserver_workers(bad_gallery):
    root, files, _ = bad_gallery
    ds = GalleryDataset(root, files, PREPROCESS, max_pixels=10_000_000)
    again = pickle.loads(pickle.dumps(ds))
    assert (again.root, again.files, again.max_pixels) == (str(root), files, 10_000_000)
    assert torch.equal(again[0].pixels, ds[0].pixels)


def test_collate_all_bad_and_mixed_shapes():
    bad = [DecodedItem(index=i, pixels=None, width=0, height=0, reason="empty file") for i in (3, 1)]
    batch = collate_gallery(bad)
    assert batch.indices.tolist() == [3, 1] and batch.ok.tolist() == [False, False]
    assert batch.pixels.shape == (0, 0, 0, 0) and batch.reasons == ["empty file", "empty file"]
    mixed = [DecodedItem(i, pixels=torch.zeros(3, s, s), width=s, height=s, reason="") for i, s in enumerate((4, 5))]
    with pytest.raises(ValueError, match="different shapes"):
        collate_gallery(mixed)


def test_worker_init_sets_one_thread():
    before = torch.get_num_threads()
    try:
        worker_init(0)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
