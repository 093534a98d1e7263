"""Indexing a gallery: contents, incremental updates, bad files, crashes, model mismatch."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexes.store import IndexStore, IndexStoreError
from indexes.vector_index import IndexConfig, IndexType
from retrieval.indexer import IndexingConfig, index_gallery
from tests.tiny import write_gallery

REPO = Path(__file__).resolve().parents[1]
TINY = IndexingConfig(model="tiny-random", device="cpu", precision="fp32", batch_size=4, workers=0, shard_size=8)


def run(gallery, index_dir, encoder, **over):
    cfg = IndexingConfig(**{**TINY.__dict__, **over})
    return index_gallery(gallery, index_dir, cfg, encoder=encoder, progress=False)


def test_index_contents(gallery, tmp_path, tiny_encoder):
    s = run(gallery, tmp_path / "idx", tiny_encoder)
    store = IndexStore(tmp_path / "idx")
    m = store.manifest
    assert (s.indexed, s.count, len(s.skipped)) == (24, 24, 0)
    assert m["format_version"] == 2 and m["model"] == "tiny-random" and m["dim"] == tiny_encoder.dim
    assert m["metric"] == "inner_product" and m["normalization"] == "l2" and m["count"] == 24
    assert m["gallery_root"] == str(gallery.resolve()) and [
        g["index"]["params"]["index_type"] for g in m["segments"]
    ] == ["flat"]
    assert {"torch", "faiss", "open_clip"} <= set(m["library_versions"])
    assert list(store.metadata.columns) == ["id", "path", "bytes", "mtime_ns", "width", "height"]
    assert store.metadata["id"].tolist() == list(range(24))
    assert store.metadata["path"].tolist() == sorted(store.metadata["path"])  # first ids in path order
    assert (store.metadata[["width", "height"]] == 48).all().all()
    # stored embeddings are the encoder's, within float16 rounding
    pil = [Image.open(gallery / p).convert("RGB") for p in store.metadata["path"]]
    stored = store.embeddings_of(store.metadata["id"]).astype(np.float32)
    np.testing.assert_allclose(stored, tiny_encoder.encode_pil(pil), atol=2e-3)
    assert not (tmp_path / "idx" / "work").exists()


def test_flat_search_equals_brute_force(gallery, tmp_path, tiny_encoder):
    run(gallery, tmp_path / "idx", tiny_encoder)
    store = IndexStore(tmp_path / "idx")
    q = tiny_encoder.encode_texts(["a red dress", "a blue sky", "a cat"])
    scores, ids = store.search(q, 24)
    x = store.vectors_for_ids(store.metadata["id"].to_numpy())
    s = q @ x.T
    for r in range(3):
        order = np.lexsort((store.metadata["id"].to_numpy(), -s[r]))  # score desc, then id asc
        assert ids[r].tolist() == store.metadata["id"].to_numpy()[order].tolist()
        np.testing.assert_allclose(scores[r], s[r][order], atol=1e-5)


def test_incremental_add_change_delete(gallery, tmp_path, tiny_encoder):
    idx = tmp_path / "idx"
    run(gallery, idx, tiny_encoder)
    before = IndexStore(idx).metadata.set_index("path")
    paths = sorted(before.index)
    (gallery / paths[0]).unlink()
    (gallery / paths[1]).unlink()
    changed = paths[2]
    Image.new("RGB", (30, 20), (1, 2, 3)).save(gallery / changed)
    os.utime(gallery / changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    write_gallery(gallery / "new", 3, seed=7)
    s = run(gallery, idx, tiny_encoder)
    assert (s.indexed, s.unchanged, s.removed, s.count) == (4, 21, 3, 25)
    after = IndexStore(idx).metadata.set_index("path")
    unchanged = [p for p in paths[3:]]
    assert (after.loc[unchanged, "id"] == before.loc[unchanged, "id"]).all()  # ids of unchanged images stay
    assert paths[0] not in after.index and paths[1] not in after.index
    # new ids are fresh (never reused) and given in path order: the changed d*/ file, then new/*
    assert after.loc[changed, "id"] == 24 and after.loc[changed, "width"] == 30
    assert sorted(after.loc[[p for p in after.index if p.startswith("new/")], "id"]) == [25, 26, 27]
    assert IndexStore(idx).manifest["next_id"] == 28
    # nothing changed: nothing embedded, nothing committed
    gen = IndexStore(idx).version
    s2 = run(gallery, idx, tiny_encoder)
    assert (s2.indexed, s2.count, s2.removed) == (0, 25, 0)
    assert IndexStore(idx).version == gen


def test_bad_files_are_skipped_and_listed(tmp_path, tiny_encoder):
    from tests.badfiles import write_bad_files

    root = tmp_path / "g"
    root.mkdir()
    expected = write_bad_files(root)
    s = run(root, tmp_path / "idx", tiny_encoder, max_pixels=10_000_000)
    store = IndexStore(tmp_path / "idx")
    bad = {p for p, o in expected.items() if o == "bad"}
    good = {p for p, o in expected.items() if o == "ok"}
    assert set(store.skipped["path"]) == bad and set(store.metadata["path"]) == good
    assert (store.skipped["reason"].str.len() > 0).all()
    assert "skipped" in s.format() and all(p in s.format() for p in bad)
    s2 = run(root, tmp_path / "idx", tiny_encoder)  # unchanged bad files are not retried
    assert s2.indexed == 0 and s2.newly_skipped == 0 and len(s2.skipped) == len(bad)


def test_model_mismatch_is_refused(gallery, tmp_path, tiny_encoder):
    run(gallery, tmp_path / "idx", tiny_encoder)
    with pytest.raises(IndexStoreError, match="built with `model=tiny-random`"):
        index_gallery(gallery, tmp_path / "idx", IndexingConfig(model="ViT-B-32/random"), progress=False)
    with pytest.raises(IndexStoreError, match="tiny-random.*ViT-B-32/random"):
        IndexStore(tmp_path / "idx").check_model("ViT-B-32/random")


def test_empty_gallery(tmp_path, tiny_encoder):
    (tmp_path / "g").mkdir()
    s = run(tmp_path / "g", tmp_path / "idx", tiny_encoder)
    assert s.count == 0
    scores, ids = IndexStore(tmp_path / "idx").search(tiny_encoder.encode_texts(["x"]), 5)
    assert ids.shape == (1, 0)


def test_other_index_type_without_reembedding(gallery, tmp_path, tiny_encoder):
    from indexes.store import rebuild_index

    run(gallery, tmp_path / "idx", tiny_encoder)
    old = IndexStore(tmp_path / "idx")
    before = old.embeddings_of(old.metadata["id"])
    m = rebuild_index(tmp_path / "idx", IndexConfig(index_type=IndexType.HNSW))
    store = IndexStore(tmp_path / "idx")
    assert [g["index"]["params"]["index_type"] for g in m["segments"]] == ["hnsw"]
    assert np.array_equal(store.embeddings_of(store.metadata["id"]), before)


def test_approximate_indexes_keep_the_clips_text_queries_for_tuning(gallery, tmp_path, tiny_encoder):
    """Once the index is large enough for approximate segments (here: always), the first commit stores the CLIP
    text embeddings of the generic tuning prompts; later commits keep them; a flat index stores none."""
    from retrieval.indexer import TUNING_SUBJECTS, TUNING_TEMPLATES, tuning_queries

    run(gallery, tmp_path / "flat", tiny_encoder)
    assert "tuning_queries" not in IndexStore(tmp_path / "flat").manifest
    ivf = IndexConfig(index_type=IndexType.IVF, flat_max_vectors=0)
    run(gallery, tmp_path / "idx", tiny_encoder, index=ivf)
    entry = IndexStore(tmp_path / "idx").manifest["tuning_queries"]
    stored = np.load(tmp_path / "idx" / entry["file"])
    assert len(stored) == len(TUNING_TEMPLATES) * len(TUNING_SUBJECTS) == 200
    np.testing.assert_allclose(stored, tuning_queries(tiny_encoder), atol=1e-6)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(gallery / "added.png")
    try:
        run(gallery, tmp_path / "idx", tiny_encoder, index=ivf)
    finally:
        (gallery / "added.png").unlink()
    assert IndexStore(tmp_path / "idx").manifest["tuning_queries"] == entry


def test_decoding_workers_give_the_same_index(gallery, tmp_path, tiny_encoder):
    run(gallery, tmp_path / "a", tiny_encoder, workers=0)
    run(gallery, tmp_path / "b", tiny_encoder, workers=2)
    a, b = IndexStore(tmp_path / "a"), IndexStore(tmp_path / "b")
    assert a.metadata.equals(b.metadata)
    np.testing.assert_array_equal(a.embeddings, b.embeddings)


# ---------------------------------------------------------------- crashes
SLOW_INDEX = """
import sys, time
import retrieval.indexer as ix
_write = ix.write_shard
def slow_write(*a, **k):  # widen the window between shards so the test can kill mid-run
    out = _write(*a, **k); time.sleep(0.4); return out
ix.write_shard = slow_write
from cli import app
sys.argv = ["cli.py", "index", sys.argv[1], "--index-dir", sys.argv[2], "--model", "tiny-random", "--device", "cpu",
            "--batch-size", "4", "--shard-size", "8", "--workers", "0", "--no-progress"]
app()
"""


def _spawn(gallery, idx):
    return subprocess.Popen(
        [sys.executable, "-c", SLOW_INDEX, str(gallery), str(idx)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path, tiny_encoder):
    gallery = tmp_path / "g"
    write_gallery(gallery, 40)
    idx, ref = tmp_path / "idx", tmp_path / "ref"
    run(gallery, idx, tiny_encoder)  # generation 1: a readable index exists before the crash
    write_gallery(gallery / "more", 40, seed=3)
    gen1 = IndexStore(idx).metadata

    # kill at several moments: startup, after one shard, after several shards
    for wait_for_shards in (0, 1, 3):
        proc = _spawn(gallery, idx)
        deadline = time.time() + 120
        while time.time() < deadline and len(list((idx / "work").glob("shard-*"))) < wait_for_shards:
            time.sleep(0.01)
        if wait_for_shards == 0:
            time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        store = IndexStore(idx)  # the previous index is still readable and searchable
        assert store.metadata.equals(gen1)
        assert store.search(tiny_encoder.encode_texts(["q"]), 3)[1].shape == (1, 3)
    n_done = len(list((idx / "work").glob("shard-*")))
    assert n_done >= 3

    s = run(gallery, idx, tiny_encoder)  # resume: finished shards are not re-embedded
    assert s.reused == n_done * 8 and s.indexed == 40 - n_done * 8

    shutil.copytree(gallery, tmp_path / "g2")  # uninterrupted reference run on identical files
    run(gallery, ref, tiny_encoder)
    run(gallery, ref, tiny_encoder, shard_size=1000)
    a, b = IndexStore(idx), IndexStore(ref)
    assert a.metadata.equals(b.metadata)
    ea, eb = a.embeddings_of(a.metadata["id"]), b.embeddings_of(b.metadata["id"])
    np.testing.assert_allclose(ea.astype(np.float32), eb.astype(np.float32), atol=1e-3)
    assert a.manifest["count"] == b.manifest["count"] == 80


def test_kill_during_commit_keeps_an_index(tmp_path, tiny_encoder):
    """Leftover temporaries of a commit killed half-way are ignored, then cleaned by the next commit."""
    gallery = tmp_path / "g"
    write_gallery(gallery, 8)
    idx = tmp_path / "idx"
    run(gallery, idx, tiny_encoder)
    (idx / "segments" / ".seg-000002.abc.tmp").mkdir()
    (idx / ".manifest.json.xyz.tmp").write_text("{torn")
    (idx / "segments" / "seg-000002").mkdir()  # a segment written but never committed
    assert IndexStore(idx).count == 8
    write_gallery(gallery / "x", 2, seed=9)
    s = run(gallery, idx, tiny_encoder)
    m = IndexStore(idx).manifest
    assert s.count == 10 and [g["name"] for g in m["segments"]] == ["seg-000001", "seg-000002"]
    assert sorted(p.name for p in (idx / "segments").iterdir()) == ["seg-000001", "seg-000002"]
    assert not [p for p in idx.rglob("*") if p.name.endswith(".tmp")]
