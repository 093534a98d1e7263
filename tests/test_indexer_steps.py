"""The steps of `index_gallery`, each on its own (scan, diff, plan_shards, embed, merge, commit), then the
run's summary counts, exactly, for new, changed, deleted and bad files, a resumed run and a rerun."""

import os
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import retrieval.indexer as ix
from indexes.shards import META_COLUMNS, SKIP_COLUMNS, ShardOutput, read_shard
from indexes.store import IndexStore, IndexWriter, commit_rows, open_committed, read_manifest
from indexes.vector_index import IndexConfig
from retrieval.indexer import (
    FILE_KEY,
    GalleryScan,
    IndexingConfig,
    commit,
    diff,
    embed,
    index_gallery,
    merge,
    plan_shards,
    scan,
)
from tests.tiny import write_gallery

TINY = IndexingConfig(model="tiny-random", device="cpu", precision="fp32", batch_size=4, workers=0, shard_size=8)
DIM = 4  # synthetic committed indexes: (n, 4) embeddings, no model involved
EMBED_SHARD = ix.embed_shard  # the real one, for wrappers that count calls


def cfg(**over) -> IndexingConfig:
    return IndexingConfig(**{**TINY.__dict__, **over})


def files(*rows) -> pd.DataFrame:
    """(path, bytes, mtime_ns) rows -> a scan's frame."""
    return pd.DataFrame(list(rows), columns=FILE_KEY).astype({"bytes": "int64", "mtime_ns": "int64"})


def vectors(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)  # (n, DIM)


@pytest.fixture
def committed(tmp_path) -> IndexStore:
    """A committed generation made without a model: images a, b, c, d (ids 0, 1, 2, 5), bad files bad1, bad2."""
    meta = pd.DataFrame(
        {
            "id": [0, 1, 2, 5],
            "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
            "bytes": [10, 11, 12, 13],
            "mtime_ns": [100, 101, 102, 103],
            "width": [8] * 4,
            "height": [6] * 4,
        }
    )
    skipped = pd.DataFrame(
        {
            "path": ["bad1.jpg", "bad2.jpg"],
            "bytes": [0, 5],
            "mtime_ns": [200, 201],
            "reason": ["empty file", "not an image"],
        }
    )
    commit_rows(
        tmp_path / "idx",
        meta,
        vectors(4, seed=0),
        skipped,
        model="tiny-random",
        gallery_root="/g",
        next_id=7,
        index_config=IndexConfig(),
    )
    return open_committed(tmp_path / "idx")


# The gallery of `committed` later: a same, b changed, c deleted, d same, bad1 same, bad2 changed, e and f new.
LATER = files(
    ("a.jpg", 10, 100),
    ("b.jpg", 99, 101),
    ("bad1.jpg", 0, 200),
    ("bad2.jpg", 5, 999),
    ("d.jpg", 13, 103),
    ("e.jpg", 20, 300),
    ("f.jpg", 21, 301),
)


# ---------------------------------------------------------------- scan
def test_scan_lists_image_files_in_path_order(tmp_path):
    paths = write_gallery(tmp_path / "g", 5)
    (tmp_path / "g" / "notes.txt").write_text("not an image file name")
    s = scan(tmp_path / "g" / ".." / "g")
    assert s.root == str((tmp_path / "g").resolve())
    assert list(s.files.columns) == FILE_KEY and s.files["path"].tolist() == paths
    assert s.files["bytes"].tolist() == [os.stat(tmp_path / "g" / p).st_size for p in paths]
    assert s.files["mtime_ns"].tolist() == [os.stat(tmp_path / "g" / p).st_mtime_ns for p in paths]
    assert s.files.dtypes[["bytes", "mtime_ns"]].tolist() == [np.int64, np.int64]


# ---------------------------------------------------------------- diff
def test_diff_without_an_index_makes_everything_new():
    d = diff(GalleryScan(root="/g", files=LATER), None)
    assert d.new.equals(LATER) and d.todo.equals(LATER) and len(d.changed) == len(d.deleted) == 0
    assert (d.kept_rows.tolist(), len(d.kept_skipped), d.removed, d.next_id) == ([], 0, 0, 0)


def test_diff_sorts_new_changed_deleted_unchanged(committed):
    d = diff(GalleryScan(root="/g", files=LATER), committed)
    assert d.new["path"].tolist() == ["e.jpg", "f.jpg"]
    assert d.changed["path"].tolist() == ["b.jpg", "bad2.jpg"]  # an image and a skipped file
    assert d.todo["path"].tolist() == ["b.jpg", "bad2.jpg", "e.jpg", "f.jpg"]
    assert d.todo.equals(LATER[LATER["path"].isin(d.todo["path"])].reset_index(drop=True))  # the scanned keys
    assert d.deleted["path"].tolist() == ["c.jpg"]
    assert d.kept_rows.tolist() == [0, 3]  # rows of a and d in the committed metadata
    assert d.kept_skipped["path"].tolist() == ["bad1.jpg"]
    assert (d.removed, d.next_id, d.is_empty) == (2, 7, False)  # b (changed) and c (deleted)


def test_diff_of_the_committed_gallery_is_empty(committed):
    same = pd.concat([committed.metadata[FILE_KEY], committed.skipped[FILE_KEY]]).sort_values("path")
    d = diff(GalleryScan(root="/g", files=same.reset_index(drop=True)), committed)
    assert d.is_empty and len(d.todo) == 0 and d.kept_rows.tolist() == [0, 1, 2, 3] and len(d.kept_skipped) == 2
    assert d.removed == 0
    d = diff(GalleryScan(root="/g", files=same[same["path"] != "bad1.jpg"].reset_index(drop=True)), committed)
    assert not d.is_empty and d.deleted["path"].tolist() == ["bad1.jpg"] and d.removed == 0  # not an image


# ---------------------------------------------------------------- plan_shards
def shard_output(rows_ok, rows_bad, seed) -> ShardOutput:
    return ShardOutput(
        embeddings=vectors(len(rows_ok), seed),
        metadata=pd.DataFrame([(*r, 8, 6) for r in rows_ok], columns=META_COLUMNS),
        skipped=pd.DataFrame([(*r, "empty file") for r in rows_bad], columns=SKIP_COLUMNS),
    )


def test_plan_reuses_finished_rows_once_and_cuts_the_rest():
    todo = files(*[(f"f{i:02d}.jpg", 10 + i, 100 + i) for i in range(10)])
    a = shard_output([("f00.jpg", 10, 100), ("x.jpg", 1, 1), ("f03.jpg", 13, 999)], [("f01.jpg", 11, 101)], seed=1)
    b = shard_output([("f00.jpg", 10, 100), ("f02.jpg", 12, 102)], [], seed=2)
    stale = shard_output([("x.jpg", 1, 1)], [], seed=3)
    plan = plan_shards(todo, [a, stale, b], cfg(shard_size=3), "/g", first_number=5)

    assert len(plan.reused) == 2  # the stale shard holds nothing to do
    ra, rb = plan.reused
    assert ra.metadata["path"].tolist() == ["f00.jpg"] and ra.skipped["path"].tolist() == ["f01.jpg"]
    assert np.array_equal(ra.embeddings, a.embeddings[[0]])  # x.jpg and the old version of f03 are dropped
    assert rb.metadata["path"].tolist() == ["f02.jpg"] and np.array_equal(rb.embeddings, b.embeddings[[1]])
    assert [n for n, _ in plan.to_embed] == [5, 6, 7]
    assert [s.files["path"].tolist() for _, s in plan.to_embed] == [
        ["f03.jpg", "f04.jpg", "f05.jpg"],
        ["f06.jpg", "f07.jpg", "f08.jpg"],
        ["f09.jpg"],
    ]
    assert all(s.model == "tiny-random" and s.gallery_root == "/g" for _, s in plan.to_embed)
    assert plan.to_embed[0][1].files.equals(todo.iloc[3:6].reset_index(drop=True))


def test_plan_without_finished_shards_embeds_all():
    todo = files(*[(f"f{i}.jpg", 1, 1) for i in range(5)])
    plan = plan_shards(todo, [], cfg(shard_size=8), "/g")
    assert plan.reused == [] and [(n, len(s.files)) for n, s in plan.to_embed] == [(0, 5)]
    assert plan_shards(todo.iloc[:0], [], cfg(), "/g").to_embed == []


# ---------------------------------------------------------------- embed
def test_embed_writes_each_shard_it_embeds_with_embed_shard(tmp_path, tiny_encoder, monkeypatch):
    root = tmp_path / "g"
    write_gallery(root, 5)
    (root / "d0" / "bad.jpg").write_bytes(b"")
    scanned = scan(root)
    plan = plan_shards(scanned.files, [], cfg(shard_size=2), scanned.root)
    calls = []
    monkeypatch.setattr(ix, "embed_shard", lambda shard, *a, **k: calls.append(shard) or EMBED_SHARD(shard, *a, **k))
    outs = embed(plan, tiny_encoder, cfg(shard_size=2), tmp_path / "work")

    assert len(calls) == len(outs) == 3 and all(c is s for c, (_, s) in zip(calls, plan.to_embed))
    assert sum(len(o.metadata) for o in outs) == 5 and pd.concat([o.skipped for o in outs])["path"].tolist() == [
        "d0/bad.jpg"
    ]
    assert pd.concat([o.skipped for o in outs])["reason"].tolist() == ["empty file"]
    for (number, shard), out in zip(plan.to_embed, outs):
        saved_in, saved_out = read_shard(tmp_path / "work" / f"shard-{number:06d}")
        assert saved_in.files.equals(shard.files) and np.array_equal(saved_out.embeddings, out.embeddings)
        assert saved_out.metadata.equals(out.metadata)
        pil = [Image.open(root / p).convert("RGB") for p in out.metadata["path"]]
        if pil:
            np.testing.assert_allclose(out.embeddings.astype(np.float32), tiny_encoder.encode_pil(pil), atol=2e-3)


def test_embed_shard_refuses_a_shard_of_another_model(tmp_path, tiny_encoder):
    from indexes.shards import ShardInput

    shard = ShardInput(files=files(("a.jpg", 1, 1)), model="ViT-B-32/random", gallery_root=str(tmp_path))
    with pytest.raises(ValueError, match="`model=ViT-B-32/random`"):
        ix.embed_shard(shard, tiny_encoder, cfg())


# ---------------------------------------------------------------- merge and commit
def later_outputs():
    """What embedding LATER's todo files gives: b and f in one shard (bad2 still bad), e in another."""
    return [
        shard_output([("f.jpg", 21, 301), ("b.jpg", 99, 101)], [("bad2.jpg", 5, 999)], seed=4),
        shard_output([("e.jpg", 20, 300)], [], seed=5),
    ]


def test_merge_gives_fresh_ids_in_path_order_and_deletes_removed_rows(committed):
    d = diff(GalleryScan(root="/g", files=LATER), committed)
    outs = later_outputs()
    g = merge(committed, d, outs, DIM)
    added = g.added.metadata
    assert added["path"].tolist() == ["b.jpg", "e.jpg", "f.jpg"] and added["id"].tolist() == [7, 8, 9]
    assert g.deleted_ids.tolist() == [1, 2] and g.next_id == 10 and g.count == 5  # b changed, c deleted
    assert list(added.columns) == ["id"] + META_COLUMNS and (added.dtypes[["id", "bytes"]] == np.int64).all()
    assert added.set_index("path").loc["b.jpg", "bytes"] == 99  # the new version of b
    assert g.added.embeddings.dtype == np.float16 and g.added.embeddings.shape == (3, DIM)
    assert np.array_equal(
        g.added.embeddings, np.stack([outs[0].embeddings[1], outs[1].embeddings[0], outs[0].embeddings[0]])
    )
    assert g.skipped[["path", "mtime_ns"]].values.tolist() == [["bad1.jpg", 200], ["bad2.jpg", 999]]
    with pytest.raises(ValueError, match="dim 8"):
        merge(committed, d, outs, 8)


def test_merge_into_a_scratch_file_equals_merge_in_ram(committed, tmp_path, monkeypatch):
    """With `scratch` the added rows are written chunk by chunk (chunks smaller than a shard here) and come back
    memory-mapped: the same change, with no copy of a run's embeddings in RAM."""
    import indexes.store

    monkeypatch.setattr(indexes.store, "COPY_ROWS", 1)
    d = diff(GalleryScan(root="/g", files=LATER), committed)
    in_ram = merge(committed, d, later_outputs(), DIM)
    on_disk = merge(committed, d, later_outputs(), DIM, scratch=tmp_path / "merged.npy")
    assert isinstance(on_disk.added.embeddings, np.memmap) and not isinstance(in_ram.added.embeddings, np.memmap)
    assert on_disk.added.embeddings.dtype == np.float16
    assert np.array_equal(on_disk.added.embeddings, in_ram.added.embeddings)
    pd.testing.assert_frame_equal(on_disk.added.metadata, in_ram.added.metadata)
    assert on_disk.deleted_ids.tolist() == in_ram.deleted_ids.tolist()


def test_embedded_shards_are_memory_mapped_from_work(tmp_path, tiny_encoder):
    root = tmp_path / "g"
    todo = files(
        *[(rel.replace(os.sep, "/"), (root / rel).stat().st_size, 0) for rel in sorted(write_gallery(root, 6))]
    )
    plan = ix.plan_shards(todo, [], cfg(), str(root))
    outs = ix.embed(plan, tiny_encoder, cfg(), tmp_path / "work")
    assert outs and all(isinstance(o.embeddings, np.memmap) for o in outs)
    assert all(Path(o.embeddings.filename).parent.parent == tmp_path / "work" for o in outs)


def test_merge_of_a_first_empty_gallery():
    g = merge(None, diff(GalleryScan(root="/g", files=files()), None), [], DIM)
    assert (len(g.added.metadata), g.added.embeddings.shape, len(g.skipped), g.next_id, g.count) == (
        0,
        (0, DIM),
        0,
        0,
        0,
    )


def test_commit_adds_a_segment_and_tombstones_the_store_reads_back(committed):
    g = merge(committed, diff(GalleryScan(root="/g", files=LATER), committed), later_outputs(), DIM)
    first = committed.manifest["segments"][0]["name"]
    kept = committed.embeddings_of(np.array([0, 5]))
    with IndexWriter(committed.dir) as writer:
        m = commit(writer, g, cfg(), "/g")
    store = IndexStore(committed.dir)
    assert store.manifest == m and (m["version"], m["count"], m["next_id"], m["dim"]) == (2, 5, 10, DIM)
    assert m["model"] == "tiny-random" and m["gallery_root"] == "/g" and m["indexing_config"]["shard_size"] == 8
    assert [s["name"] for s in m["segments"]] == [first, "seg-000002"] and m["tombstones"]["count"] == 2
    assert store.metadata["id"].tolist() == [0, 5, 7, 8, 9] and store.skipped.equals(g.skipped)
    assert np.array_equal(store.embeddings_of(np.array([0, 5])), kept)  # the kept rows were not rewritten
    assert np.array_equal(store.embeddings_of(np.array([7, 8, 9])), g.added.embeddings)
    assert sorted(p.name for p in (committed.dir / "segments").iterdir()) == [first, "seg-000002"]


# ---------------------------------------------------------------- the run: exact counts
def counts(s):
    assert s.count == s.unchanged + s.indexed + s.reused
    return s.indexed, s.reused, s.unchanged, s.removed, s.newly_skipped, len(s.skipped), s.count


def first_line(s) -> str:
    return re.sub(r"\d+\.\d", "T", s.format().splitlines()[0])  # rates and times vary


def bad_gallery(root: Path) -> list[str]:
    """20 good images, and 2 bad files that sort first (d0/bad.jpg, empty) and last (d2/zbad.png, text)."""
    good = write_gallery(root, 20)
    (root / "d0" / "bad.jpg").write_bytes(b"")
    (root / "d2" / "zbad.png").write_text("not a png")
    return good


def test_counts_of_new_changed_deleted_and_bad_files(tmp_path, tiny_encoder, monkeypatch):
    root, idx = tmp_path / "g", tmp_path / "idx"
    good = bad_gallery(root)
    s = index_gallery(root, idx, TINY, progress=False, encoder=tiny_encoder)
    assert counts(s) == (20, 0, 0, 0, 2, 2, 20)
    assert first_line(s) == (
        "indexed 20 new or changed images (T images/s), reused 0 from finished shards, kept 0 "
        "unchanged, removed 0; skipped 2 files (2 new); index holds 20 images (1 segment: flat); T s in all"
    )
    assert s.format().splitlines()[1:] == [
        "  skipped d0/bad.jpg: empty file",
        f"  skipped d2/zbad.png: {s.skipped['reason'].iloc[1]}",
    ]
    assert s.skipped["reason"].iloc[1].startswith("not an image")

    # 3 new, 1 changed, 2 deleted, 1 bad file deleted, 1 bad file mended
    write_gallery(root / "new", 3, seed=7)
    Image.new("RGB", (30, 20), (1, 2, 3)).save(root / good[0])
    os.utime(root / good[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    for p in (good[1], good[2], "d0/bad.jpg", "d2/zbad.png"):
        (root / p).unlink()
    Image.new("RGB", (24, 24), (9, 9, 9)).save(root / "d2" / "zbad.png")
    reads = []  # the committed version's metadata and skipped list are read once; its embeddings never
    for module, name in ((pd, "read_parquet"), (np, "load")):
        real = getattr(module, name)
        monkeypatch.setattr(
            module, name, lambda path, *a, _real=real, **k: reads.append(Path(path)) or _real(path, *a, **k)
        )
    before = read_manifest(idx)
    s = index_gallery(root, idx, TINY, progress=False, encoder=tiny_encoder)
    monkeypatch.undo()
    old = {idx / "segments" / before["segments"][0]["name"], idx / before["skipped_file"]}
    read_old = sorted(p.name for p in reads if p in old or p.parent in old)
    assert read_old == ["metadata.parquet", Path(before["skipped_file"]).name]
    assert counts(s) == (5, 0, 17, 3, 0, 0, 22)  # indexed: 3 new + the changed one + the mended one
    assert first_line(s) == (
        "indexed 5 new or changed images (T images/s), reused 0 from finished shards, kept 17 "
        "unchanged, removed 3; skipped 0 files (0 new); index holds 22 images (2 segments: flat x2); T s in all"
    )
    store = IndexStore(idx)
    assert store.metadata.set_index("path").loc[good[0], "width"] == 30 and "d2/zbad.png" in set(store.metadata["path"])


def test_a_rerun_embeds_nothing_and_loads_no_model(tmp_path, tiny_encoder, monkeypatch):
    root, idx = tmp_path / "g", tmp_path / "idx"
    bad_gallery(root)
    index_gallery(root, idx, TINY, progress=False, encoder=tiny_encoder)
    gen = IndexStore(idx).version

    def no_model(*a, **k):
        raise AssertionError("a rerun with nothing to embed must not load the model")

    monkeypatch.setattr(ix.ClipEncoder, "from_spec", no_model)
    s = index_gallery(root, idx, TINY, progress=False)  # encoder=None
    assert counts(s) == (0, 0, 20, 0, 0, 2, 20) and IndexStore(idx).version == gen
    assert first_line(s).startswith(
        "indexed 0 new or changed images (T images/s), reused 0 from finished shards, kept 20 "
    )

    (root / "d0" / "bad.jpg").unlink()  # only a bad file deleted: a new generation, still no model
    s = index_gallery(root, idx, TINY, progress=False)
    assert counts(s) == (0, 0, 20, 0, 0, 1, 20) and IndexStore(idx).version == gen + 1


def test_counts_of_a_resumed_run(tmp_path, tiny_encoder, monkeypatch):
    root, idx = tmp_path / "g", tmp_path / "idx"
    bad_gallery(root)  # 22 files in path order: bad.jpg, 14 good, then (shard 2) 5 good, zbad.png
    written, write_shard = [], ix.write_shard

    def crash_on_third(work_dir, number, *a):  # a kill after two shards were written
        if len(written) == 2:
            raise KeyboardInterrupt("killed")
        written.append(number)
        return write_shard(work_dir, number, *a)

    monkeypatch.setattr(ix, "write_shard", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        index_gallery(root, idx, TINY, progress=False, encoder=tiny_encoder)
    monkeypatch.undo()
    assert written == [0, 1] and open_committed(idx) is None

    calls = []
    monkeypatch.setattr(
        ix, "embed_shard", lambda shard, *a, **k: calls.append(len(shard.files)) or EMBED_SHARD(shard, *a, **k)
    )
    s = index_gallery(root, idx, TINY, progress=False, encoder=tiny_encoder)
    assert calls == [6]  # only the unfinished shard is embedded
    assert counts(s) == (5, 15, 0, 0, 2, 2, 20)  # reused: 7 + 8 good; bad.jpg from shard 0, zbad.png embedded now
    assert first_line(s).startswith("indexed 5 new or changed images (T images/s), reused 15 from finished shards, ")
    assert not (idx / "work").exists()
    ref = index_gallery(root, tmp_path / "ref", TINY, progress=False, encoder=tiny_encoder)
    assert counts(ref) == (20, 0, 0, 0, 2, 2, 20)
    a, b = IndexStore(idx), IndexStore(tmp_path / "ref")
    assert a.metadata.equals(b.metadata) and a.skipped.equals(b.skipped)
    ea, eb = a.embeddings_of(a.metadata["id"]), b.embeddings_of(b.metadata["id"])
    np.testing.assert_allclose(ea.astype(np.float32), eb.astype(np.float32), atol=1e-3)


def test_encoder_of_another_model_is_refused(gallery, tmp_path, tiny_encoder):
    with pytest.raises(ValueError, match=r"`encoder` is tiny-random, but the config says `model=ViT-B-32/random`"):
        index_gallery(gallery, tmp_path / "idx", cfg(model="ViT-B-32/random"), progress=False, encoder=tiny_encoder)
    assert not (tmp_path / "idx").exists()
