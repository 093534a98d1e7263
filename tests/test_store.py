"""The segmented index folder (indexes.store, format 2): exact search over segments with tombstones, commits that
write only the change, size-tiered compaction, format 1 migration, reader pins, one writer at a time, and kills."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from indexes.locking import IndexLockedError, WriterLock
from indexes.store import (
    CompactionPolicy,
    IndexStore,
    IndexStoreError,
    IndexWriter,
    Rows,
    commit_rows,
    compact,
    migrate,
    open_committed,
    read_manifest,
    rebuild_index,
)
from indexes.vector_index import IndexConfig, build_index, exact_search, save_index, unit_rows

DIM = 8
ROOT = str(Path(__file__).resolve().parents[1])


def rows(ids, seed: int, dup_of: np.ndarray | None = None) -> Rows:
    """Rows for IDS with seeded unit vectors (float16); DUP_OF: vectors to repeat (exact ties)."""
    ids = np.asarray(ids, np.int64)
    x = np.random.default_rng(seed).normal(size=(len(ids), DIM))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    if dup_of is not None:
        x[: len(dup_of)] = dup_of
    meta = pd.DataFrame(
        {
            "id": ids,
            "path": [f"img{i:06d}.jpg" for i in ids],
            "bytes": ids * 10,
            "mtime_ns": ids * 100,
            "width": 8,
            "height": 6,
        }
    )
    return Rows(meta, x)


def add(index_dir, r: Rows, delete=(), **kw) -> dict:
    next_id = int(r.metadata["id"].max()) + 1 if len(r.metadata) else kw.pop("next_id")
    return commit_rows(
        index_dir, r.metadata, r.embeddings, None, delete, model="m", gallery_root="/g", next_id=next_id, **kw
    )


def brute_force(store: IndexStore, queries: np.ndarray, k: int):
    ids = store.ids
    return exact_search(store.vectors_for_ids(ids), ids, queries, k)


def queries(n: int = 16, seed: int = 99) -> np.ndarray:
    q = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


@pytest.fixture
def three_segments(tmp_path) -> Path:
    """Three flat segments (ids 0-49, 50-89, 90-129) with exact duplicates across them and 12 deleted ids."""
    idx = tmp_path / "idx"
    first = rows(range(50), seed=0)
    add(idx, first, auto_compact=False)
    add(idx, rows(range(50, 90), seed=1, dup_of=first.embeddings[:5]), auto_compact=False)  # ties with ids 0-4
    add(idx, rows(range(90, 130), seed=2, dup_of=first.embeddings[:3]), delete=[1, 7, 8, 55, 60], auto_compact=False)
    add(idx, Rows(first.metadata.iloc[:0], first.embeddings[:0]), delete=[2, 91, 92, 93, 100, 120, 129], next_id=130)
    return idx


# ---------------------------------------------------------------- search
@pytest.mark.parametrize("k", [1, 5, 10, 117, 200])
def test_search_over_segments_equals_brute_force_over_live_rows(three_segments, k):
    with IndexStore(three_segments) as store:
        assert len(store.segments) == 3 and store.count == 130 - 12 and len(store.ids) == 118
        got = store.search(queries(), k)
        want = brute_force(store, queries(), k)
        assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
        assert not np.isin(got[1], [1, 2, 7, 8, 55, 60, 91, 92, 93, 100, 120, 129]).any()


def test_ties_across_segments_rank_by_id(three_segments):
    with IndexStore(three_segments) as store:
        v = store.vectors_for_ids(np.array([0]))  # id 0 is duplicated as ids 50 and 90
        _, found = store.search(v, 3)
        assert found[0].tolist() == [0, 50, 90]


def test_deleted_ids_are_gone_from_every_lookup(three_segments):
    with IndexStore(three_segments) as store:
        with pytest.raises(KeyError, match="no image with id"):
            store.vectors_for_ids(np.array([7]))
        assert store.paths(np.array([0, 129 - 1])) == ["img000000.jpg", "img000128.jpg"]
        assert 7 not in set(store.metadata["id"]) and len(store.metadata) == store.count


# ---------------------------------------------------------------- permissions
def test_an_index_is_readable_by_whom_the_umask_allows_and_a_replaced_file_keeps_its_mode(tmp_path):
    """Atomic writes go through private temporaries (0600 files, 0700 folders); the index they leave has the
    permissions plain writes would: a server under another account can read an index a batch job wrote."""
    from retrieval.io.atomic import atomic_dir, process_umask, write_json

    old = os.umask(0o022)
    try:
        assert process_umask() == 0o022
        idx = tmp_path / "idx"
        add(idx, rows(range(20), seed=0))
        add(idx, rows(range(20, 30), seed=1))
        modes = {str(p.relative_to(idx)): p.stat().st_mode & 0o777 for p in [idx, *idx.rglob("*")]}
        assert len(modes) > 5 and modes == {name: 0o755 if (idx / name).is_dir() else 0o644 for name in modes}, modes
        config = tmp_path / "config.json"
        write_json(config, {"a": 1})
        os.chmod(config, 0o640)
        write_json(config, {"a": 2})  # replaced: the mode its owner gave it stays
        assert config.stat().st_mode & 0o777 == 0o640 and json.loads(config.read_text()) == {"a": 2}
        os.umask(0o077)
        with atomic_dir(tmp_path / "private") as d:
            (d / "x").write_text("x")
        assert (tmp_path / "private").stat().st_mode & 0o777 == 0o700
    finally:
        os.umask(old)


# ---------------------------------------------------------------- commits write only the change
def _files(idx: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(idx)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in idx.rglob("*")
        if p.is_file() and "readers" not in p.parts and not p.name.startswith("writer")
    }


def test_a_commit_writes_only_the_new_rows_and_leaves_every_segment_as_it_was(tmp_path):
    idx = tmp_path / "idx"
    add(idx, rows(range(300), seed=0))
    before = _files(idx)
    add(idx, rows(range(300, 303), seed=1), delete=[5])
    after = _files(idx)
    kept = {n: before[n] for n in before if n.startswith("segments/")}
    assert all(after[n] == kept[n] for n in kept)  # same inode, same mtime: not rewritten
    new = sorted(set(after) - set(before))
    assert {n.split("/")[0] for n in new} == {"segments", "tombstones"}  # skipped=None keeps the list
    m = read_manifest(idx)
    assert m["format_version"] == 2 and m["count"] == 302 and m["tombstones"]["count"] == 1
    assert [s["rows"] for s in m["segments"]] == [300, 3]
    new_segment = [n for n in new if n.startswith("segments/")]
    assert all(n.startswith(f"segments/{m['segments'][1]['name']}/") for n in new_segment)


def test_commit_refuses_unknown_deletes_other_models_and_dims(tmp_path):
    idx = tmp_path / "idx"
    add(idx, rows(range(10), seed=0))
    with pytest.raises(KeyError, match="cannot delete ids \\[42\\]"):
        add(idx, rows(range(10, 12), seed=1), delete=[42])
    with pytest.raises(Exception, match="built with `model=m`"):
        r = rows(range(10, 12), seed=1)
        commit_rows(idx, r.metadata, r.embeddings, model="other", gallery_root="/g", next_id=12)
    assert read_manifest(idx)["count"] == 10  # nothing half-done


def test_deletes_are_checked_against_live_ids_in_full_and_holed_segments(three_segments):
    """Deleting looks only at the segments whose id range holds the ids (a fresh segment by arithmetic, a compacted
    one with holes by its ids); an id never added, compacted away or already tombstoned is refused."""
    compact(three_segments, full=True)  # one segment, ids 0-129 with 12 holes: not a whole range
    add(three_segments, rows(range(130, 140), seed=5))  # a fresh segment: ids 130-139, the whole range
    for gone in ([1], [129], [150], [-3]):  # compacted away (deleted before), compacted away, never added, never
        with pytest.raises(KeyError, match=f"cannot delete ids \\[{gone[0]}\\]"):
            add(three_segments, rows(range(140, 141), seed=6), delete=[3, *gone])
    m = add(three_segments, rows(range(140, 141), seed=6), delete=[3, 4, 135])
    assert [s["dead"] for s in m["segments"]] == [2, 1, 0]  # per segment: 3 and 4 in the first, 135 in the second
    with pytest.raises(KeyError, match="cannot delete ids \\[135\\]"):  # tombstoned already
        add(three_segments, rows(range(141, 142), seed=7), delete=[135])
    with IndexStore(three_segments) as store:
        assert store.count == 118 + 10 + 1 - 3 and not store.has_ids([3, 4, 135]).any()
        assert np.array_equal(store.search(queries(), 10)[1], brute_force(store, queries(), 10)[1])


def test_tuning_queries_are_kept_used_by_later_builds_and_replaced(tmp_path, monkeypatch):
    import indexes.store as store_module

    given = []  # the tuning queries of every build_index call

    def recording(*args, tuning_queries=None, **kw):
        given.append(None if tuning_queries is None else len(tuning_queries))
        return build_index(*args, tuning_queries=tuning_queries, **kw)

    monkeypatch.setattr(store_module, "build_index", recording)
    idx = tmp_path / "idx"
    ivf = IndexConfig(index_type="ivf", flat_max_vectors=0, tune_queries=50)
    text = queries(40, seed=3)
    m = add(idx, rows(range(200), seed=0), index_config=ivf, tuning_queries=text, auto_compact=False)
    entry = m["tuning_queries"]
    assert entry["count"] == 40 and np.allclose(np.load(idx / entry["file"]), text, atol=1e-6)
    m = add(idx, rows(range(200, 400), seed=1), index_config=ivf, auto_compact=False)  # none given: kept
    assert m["tuning_queries"] == entry
    m = compact(idx, full=True)
    assert m["tuning_queries"] == entry and (idx / entry["file"]).is_file()
    assert given == [40, 40, 40]  # the first segment, the second (none given: the stored ones), the merge
    m = add(idx, rows(range(400, 410), seed=2), index_config=ivf, tuning_queries=queries(30, seed=4))
    assert m["tuning_queries"]["count"] == 30 and not (idx / entry["file"]).exists()  # the old file collected
    with pytest.raises(ValueError, match="of shape \\(2, 3\\) for rows of dim 8"):
        add(idx, rows(range(410, 412), seed=5), index_config=ivf, tuning_queries=np.ones((2, 3)))


def test_image_queries_search_with_the_setting_tuned_for_images(tmp_path, monkeypatch):
    import indexes.store as store_module
    from indexes.vector_index import SearchParams
    from indexes.vector_index import search as real_search

    idx = tmp_path / "idx"
    add(idx, rows(range(400), seed=0), index_config=IndexConfig(index_type="ivf", flat_max_vectors=0))
    seen = []
    monkeypatch.setattr(
        store_module, "search", lambda index, p, *a, **kw: seen.append(p.nprobe) or real_search(index, p, *a, **kw)
    )
    with IndexStore(idx) as store:
        store.segments[0].params = SearchParams("ivf", 8, None, 0.99, 4, image_nprobe=2, image_recall=0.97)
        text = store.search(queries(), 10)
        image = store.search(queries(), 10, images=True)
    assert seen == [8, 2] and text[1].shape == image[1].shape == (16, 10)


# ---------------------------------------------------------------- compaction
def test_policy_merges_the_lowest_full_tier_and_segments_full_of_deleted_rows():
    p = CompactionPolicy(merge_factor=3, min_rows=10)
    seg = lambda name, rows, dead=0: {"name": name, "rows": rows, "dead": dead}  # noqa: E731
    assert p.tier(5) == 0 and p.tier(29) == 0 and p.tier(30) == 1 and p.tier(90) == 2
    assert p.plan([seg("a", 5), seg("b", 8)]) == []
    assert p.plan([seg("a", 5), seg("b", 8), seg("c", 40), seg("d", 1)]) == ["a", "b", "d"]
    assert p.plan([seg("c", 40), seg("e", 50), seg("f", 35)]) == ["c", "e", "f"]
    assert p.plan([seg("c", 40), seg("e", 100, dead=60)]) == ["e"]


def test_an_index_refuses_other_weights_behind_its_model_spec(tmp_path):
    """Rows embedded with a model folder's weights; the folder is retrained in place: queries and new rows of the
    new weights are refused (they live in another space); an index from before the field is not checked."""
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{}")
    (folder / "open_clip_model.safetensors").write_bytes(b"weights v1")
    spec, idx = str(folder), tmp_path / "idx"
    with IndexWriter(idx) as w:
        w.commit(rows(range(5), seed=0), model=spec, gallery_root="/g", next_id=5, index_config=IndexConfig())
    recorded = read_manifest(idx)["model_weights"]
    assert len(recorded) == 16
    with IndexStore(idx) as store:
        store.check_model(spec)  # the same weights: fine
    (folder / "open_clip_model.safetensors").write_bytes(b"weights v2, retrained")
    with IndexStore(idx) as store, pytest.raises(IndexStoreError, match="other weights of `model="):
        store.check_model(spec)
    with IndexWriter(idx) as w, pytest.raises(IndexStoreError, match="index the gallery again"):
        w.commit(rows(range(5, 8), seed=1), model=spec, gallery_root="/g", next_id=8, index_config=IndexConfig())
    with IndexWriter(idx) as w:  # deleting rows adds no new embeddings: allowed, and the record is kept
        w.commit(None, delete_ids=np.array([0]), model=spec, gallery_root="/g", next_id=5, index_config=IndexConfig())
    assert read_manifest(idx)["model_weights"] == recorded
    plain = tmp_path / "plain"
    with IndexWriter(plain) as w:  # a SPEC that pins its weights records none
        w.commit(rows(range(3), seed=2), model="m", gallery_root="/g", next_id=3, index_config=IndexConfig())
    assert read_manifest(plain)["model_weights"] == ""


def test_commits_merge_a_full_tier_automatically(tmp_path):
    idx = tmp_path / "idx"
    policy = CompactionPolicy(merge_factor=4, min_rows=5)
    for i in range(7):
        r = rows(range(5 * i, 5 * i + 5), seed=i)
        with IndexWriter(idx, policy=policy) as w:
            w.commit(r, model="m", gallery_root="/g", next_id=5 * i + 5, index_config=IndexConfig())
    m = read_manifest(idx)
    # 4 commits of 5 rows (tier 0) merge into one segment of 20 (tier 1); 3 more of 5 do not fill tier 0 again
    assert [s["rows"] for s in m["segments"]] == [20, 5, 5, 5] and m["count"] == 35
    with IndexStore(idx) as store:
        assert np.array_equal(store.search(queries(), 10)[1], brute_force(store, queries(), 10)[1])


def test_compaction_keeps_answers_drops_deleted_rows_and_removes_old_files(three_segments):
    with IndexStore(three_segments) as store:
        want = store.search(queries(), 20)
    m = compact(three_segments, full=True)
    assert len(m["segments"]) == 1 and m["segments"][0]["rows"] == 118 and m["tombstones"] == {"file": None, "count": 0}
    with IndexStore(three_segments) as store:
        got = store.search(queries(), 20)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    live = {f"segments/{s['name']}" for s in m["segments"]}
    assert {f"segments/{p.name}" for p in (three_segments / "segments").iterdir()} == live
    assert list((three_segments / "tombstones").iterdir()) == []
    assert compact(three_segments, full=True) is None  # nothing left to do


def test_rebuild_with_another_type_keeps_the_rows(three_segments):
    m = rebuild_index(three_segments, IndexConfig(index_type="hnsw"))
    assert [s["index"]["params"]["index_type"] for s in m["segments"]] == ["hnsw"] and m["count"] == 118
    with IndexStore(three_segments) as store:
        assert sorted(store.ids.tolist()) == sorted(set(range(130)) - {1, 2, 7, 8, 55, 60, 91, 92, 93, 100, 120, 129})


# ---------------------------------------------------------------- format 1
def write_format_1(idx: Path, n: int = 20) -> Rows:
    """A format 1 folder as the previous version wrote it: one generation, its manifest."""
    r = rows(range(n), seed=3)
    gen = idx / "gen-000004"
    gen.mkdir(parents=True)
    r.metadata.to_parquet(gen / "metadata.parquet", index=False)
    np.save(gen / "embeddings.npy", r.embeddings, allow_pickle=False)
    pd.DataFrame({"path": ["bad.jpg"], "bytes": [1], "mtime_ns": [2], "reason": ["not an image"]}).to_parquet(
        gen / "skipped.parquet", index=False
    )
    index, params = build_index(unit_rows(r.embeddings), r.metadata["id"].to_numpy(), IndexConfig())
    save_index(index, gen / "index.faiss")
    config = json.loads(json.dumps({k: getattr(v, "value", v) for k, v in IndexConfig().__dict__.items()}))
    manifest = {
        "format_version": 1,
        "generation": 4,
        "directory": "gen-000004",
        "model": "m",
        "dim": DIM,
        "metric": "inner_product",
        "normalization": "l2",
        "embedding_dtype": "float16",
        "count": n,
        "skipped": 1,
        "next_id": n,
        "gallery_root": "/g",
        "created_at": "2026-11-01T00:00:00+00:00",
        "updated_at": "2026-11-01T00:00:00+00:00",
        "index": {"config": config, "params": params.to_dict()},
        "indexing_config": {},
        "library_versions": {},
    }
    (idx / "manifest.json").write_text(json.dumps(manifest))
    return r


def test_format_1_opens_read_only_then_migrates_without_copying(tmp_path):
    idx = tmp_path / "idx"
    write_format_1(idx)
    inode = (idx / "gen-000004" / "embeddings.npy").stat().st_ino
    with IndexStore(idx) as store:  # read as it is
        want = store.search(queries(), 5)
        assert store.count == 20 and store.skipped["path"].tolist() == ["bad.jpg"]
    m = migrate(idx)
    assert m["format_version"] == 2 and m["version"] == 4 and m["migrated_from"] == 1 and m["count"] == 20
    seg = idx / "segments" / m["segments"][0]["name"]
    assert (seg / "embeddings.npy").stat().st_ino == inode  # hard link, no copy
    assert not (idx / "gen-000004").exists()
    with IndexStore(idx) as store:
        assert np.array_equal(store.search(queries(), 5)[1], want[1]) and len(store.skipped) == 1
    assert migrate(idx)["version"] == 4  # already format 2: left as it is


def test_the_next_commit_migrates_a_format_1_folder(tmp_path):
    idx = tmp_path / "idx"
    write_format_1(idx)
    m = add(idx, rows(range(20, 25), seed=4), delete=[3])
    assert m["format_version"] == 2 and m["version"] == 5 and m["count"] == 24 and len(m["segments"]) == 2


# ---------------------------------------------------------------- readers and writers
def test_a_pinned_reader_keeps_its_files_through_commits_and_compaction(three_segments):
    reader = IndexStore(three_segments)  # nothing loaded yet: its indexes load lazily, after the compaction
    want = brute_force(reader, queries(), 10)
    add(three_segments, rows(range(130, 140), seed=5), auto_compact=False)
    compact(three_segments, full=True)
    old = {f"segments/{s.name}" for s in reader.segments}
    assert all((three_segments / n).exists() for n in old)  # pinned: not deleted
    got = reader.search(queries(), 10)
    assert np.array_equal(got[1], want[1]) and not reader.is_current()
    reader.close()
    with IndexWriter(three_segments) as w:  # the next writer collects what no one pins any more
        assert not any((three_segments / n).exists() for n in old)
        assert w.collect_garbage() == []


def test_a_second_writer_is_refused_with_the_holders_name_or_waits(tmp_path):
    idx = tmp_path / "idx"
    add(idx, rows(range(10), seed=0))
    with WriterLock(idx, purpose="indexing /photos"):
        with pytest.raises(IndexLockedError, match=f"pid {os.getpid()}.*indexing /photos.*`wait=True`"):
            add(idx, rows(range(10, 12), seed=1))
        with pytest.raises(IndexLockedError):
            compact(idx, full=True, wait=0.2)
    done = []
    holder = WriterLock(idx).acquire()
    t = threading.Thread(target=lambda: done.append(add(idx, rows(range(10, 12), seed=1), wait=True)))
    t.start()
    time.sleep(0.3)
    assert not done  # waiting
    holder.release()
    t.join(10)
    assert done and done[0]["count"] == 12


READER_LOOP = textwrap.dedent(
    """
    import sys, json, numpy as np
    sys.path.insert(0, {root!r})
    from indexes.store import IndexStore, read_manifest
    from indexes.vector_index import exact_search
    idx, stop = sys.argv[1], sys.argv[2]
    import os, time
    q = np.random.default_rng(1).normal(size=(4, {dim})).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    t, n, versions, errors = time.time(), 0, set(), []
    store = None
    while not os.path.exists(stop) and time.time() - t < 120:  # until the test has written and compacted
        try:
            if store is None or not store.is_current():
                store = IndexStore(idx)   # the previous one is unpinned when dropped
            got = store.search(q, 10)
            ids = store.ids
            want = exact_search(store.vectors_for_ids(ids), ids, q, 10)
            if not np.array_equal(got[1], want[1]) or store.count != len(ids):
                errors.append(f"version {{store.version}}: inconsistent answer")
            versions.add(store.version)
            n += 1
            if n == 1:
                print("ready", flush=True)  # querying: the test starts writing only now (imports are slow under load)
        except Exception as e:
            errors.append(repr(e))
    print(json.dumps({{"queries": n, "versions": sorted(versions), "errors": errors[:5]}}))
    """
)


def test_a_reader_loop_sees_only_whole_versions_while_a_writer_commits_and_compacts(tmp_path):
    idx = tmp_path / "idx"
    add(idx, rows(range(200), seed=0))
    script = tmp_path / "reader.py"
    script.write_text(READER_LOOP.format(root=ROOT, dim=DIM))
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, str(script), str(idx), str(stop)], stdout=subprocess.PIPE, text=True)
    assert reader.stdout.readline().strip() == "ready"  # the reader is querying
    policy = CompactionPolicy(merge_factor=3, min_rows=50)
    for i in range(8):
        r = rows(range(200 + 10 * i, 210 + 10 * i), seed=10 + i)
        with IndexWriter(idx, policy=policy) as w:
            w.commit(
                r,
                delete_ids=np.array([3 * i]),
                model="m",
                gallery_root="/g",
                next_id=210 + 10 * i,
                index_config=IndexConfig(),
            )
    compact(idx, full=True)
    time.sleep(0.5)  # a few queries on the compacted version
    stop.touch()
    out = json.loads(reader.communicate(timeout=60)[0])
    assert out["errors"] == [] and out["queries"] > 10
    assert len(out["versions"]) >= 2  # it switched while the writer committed


KILLED_COMPACTION = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from indexes.store import compact, library_versions
    library_versions()  # torch and open_clip imported: the kill lands in the compaction itself
    print("start", flush=True)
    compact(sys.argv[1], full=True)
    print("done", flush=True)
    """
)


def test_kill_9_during_compaction_leaves_a_whole_index(tmp_path):
    idx = tmp_path / "idx"
    for i in range(6):
        add(idx, rows(range(4000 * i, 4000 * (i + 1)), seed=i), delete=[4000 * i - 1] if i else (), auto_compact=False)
    with IndexStore(idx) as store:
        want = store.search(queries(), 10)
    script = tmp_path / "compact.py"
    script.write_text(KILLED_COMPACTION.format(root=ROOT))
    interrupted = 0
    for delay in (0.0, 0.02, 0.05, 0.1, 0.2):
        version = read_manifest(idx)["version"]
        p = subprocess.Popen([sys.executable, str(script), str(idx)], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "start"
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        interrupted += read_manifest(idx)["version"] == version
        with IndexStore(idx) as store:  # whichever version the manifest names is whole
            assert np.array_equal(store.search(queries(), 10)[1], want[1]) and store.count == 6 * 4000 - 5
    assert interrupted >= 1  # at least one kill landed before the compaction's commit
    m = compact(idx, full=True) or read_manifest(idx)
    assert len(m["segments"]) == 1
    with IndexStore(idx) as store:
        assert np.array_equal(store.search(queries(), 10)[1], want[1])
    leftovers = [p.name for d in ("segments", "tombstones", "skipped") for p in (idx / d).iterdir()]
    assert not [n for n in leftovers if n.startswith(".") or n.endswith(".tmp")]
    assert open_committed(idx).count == 6 * 4000 - 5


def test_ivf_segments_share_one_quantizer_and_keep_lists_on_disk(tmp_path):
    idx = tmp_path / "idx"
    config = IndexConfig(index_type="ivf", ondisk_min_vectors=1000, recall_target=0.9)
    add(idx, rows(range(3000), seed=0), index_config=config, auto_compact=False)
    m = add(idx, rows(range(3000, 4500), seed=1), delete=[10, 20], index_config=config, auto_compact=False)
    names = [s["index"]["quantizer"] for s in m["segments"]]
    assert names[0] is not None and names == [m["quantizer"]["name"]] * 2  # trained once, shared
    assert all((idx / "segments" / s["name"] / "index.ivfdata").is_file() for s in m["segments"])
    with IndexStore(idx) as store:
        got, want = store.search(queries(64), 10), brute_force(store, queries(64), 10)
        hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got[1], want[1])])
        assert hits >= 0.85 and not np.isin(got[1], [10, 20]).any()
        assert np.allclose(got[0][got[1] == want[1]], want[0][got[1] == want[1]])  # exact scores
    m = compact(idx, config, full=True)
    assert len(m["segments"]) == 1 and m["count"] == 4498
    assert (idx / "segments" / m["segments"][0]["name"] / "index.ivfdata").is_file()
