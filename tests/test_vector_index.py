"""indexes/vector_index.py against exact ground truth on synthetic clustered vectors.

The reference is numpy brute force written out here: float64 inner products rounded to float32, ranked by
(-score, id). Flat search must equal it exactly; approximate types must reach the recall target, counting
a found id as correct when its exact score is within 1e-6 of the k-th exact score (ties).
"""

import os
import subprocess
import sys
import textwrap
import warnings

import faiss
import numpy as np
import pytest

import indexes.vector_index as vector_index
from indexes.vector_index import (
    GPU_MAX_K,
    IndexConfig,
    IndexType,
    SearchParams,
    apply_search_params,
    build_index,
    choose_index_type,
    exact_search,
    exact_search_chunked,
    is_ondisk,
    load_index,
    load_quantizer,
    recall_at_k,
    save_index,
    save_quantizer,
    search,
    to_gpu_if_available,
    train_quantizer,
    unit_rows,
)

N, D, K = 5000, 64, 10
APPROXIMATE = ["hnsw", "ivf", "ivfpq"]


def clustered(n: int, d: int = D, n_clusters: int = 50, spread: float = 0.8, seed: int = 0, stream: int = 0):
    """(n, d) float32 unit vectors from a seeded mixture of gaussians; `stream` draws fresh points from the
    same mixture (same centres)."""
    centres = np.random.default_rng(seed).standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, stream + 1])
    x = centres[rng.integers(n_clusters, size=n)] + rng.standard_normal((n, d)) * (spread / np.sqrt(d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def brute_force(vectors, ids, queries, k):
    """numpy reference: float64 scores rounded to float32, sorted by descending score then ascending id."""
    scores = (queries.astype(np.float64) @ vectors.astype(np.float64).T).astype(np.float32)  # (nq, n)
    order = np.lexsort((np.broadcast_to(ids, scores.shape), -scores), axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), ids[order]


def tie_aware_recall(vectors, ids, queries, found, k):
    """Share of found ids whose exact score reaches the k-th exact score (- 1e-6): a tie counts as correct."""
    true_scores, _ = brute_force(vectors, ids, queries, k)
    row_of = {int(i): r for r, i in enumerate(ids)}
    good = 0
    for q, row in enumerate(found):
        rows = [row_of[int(i)] for i in row if i >= 0]
        exact = vectors[rows].astype(np.float64) @ queries[q].astype(np.float64)
        good += int((exact >= true_scores[q, k - 1] - 1e-6).sum())
    return good / (len(found) * k)


def lookup_for(vectors, ids):
    row_of = {int(i): r for r, i in enumerate(ids)}
    return lambda wanted: vectors[[row_of[int(i)] for i in wanted]]


def scores_of(vectors, ids, queries, found):
    """Exact (float64) scores of the found ids (nq, k); found must hold no padding."""
    picked = lookup_for(vectors, ids)(found.ravel()).reshape(*found.shape, vectors.shape[1])
    return np.einsum("qkd,qd->qk", picked.astype(np.float64), queries.astype(np.float64))


def assert_ranked(scores, found):
    """Descending scores, equal scores by ascending id."""
    assert (np.diff(scores, axis=1) <= 0).all()
    assert ((np.diff(scores, axis=1) < 0) | (np.diff(found, axis=1) > 0)).all()


@pytest.fixture(scope="module")
def data():
    """Database with shuffled, non-contiguous ids (insertion order != id order) and fresh queries."""
    vectors = clustered(N)
    ids = np.random.default_rng(1).permutation(N).astype(np.int64) * 7 + 3
    queries = clustered(300, stream=1)
    return vectors, ids, queries


@pytest.fixture(scope="module")
def built(data):
    """One index of each type over `data`, built once for the module."""
    vectors, ids, _ = data
    return {t: build_index(vectors, ids, IndexConfig(index_type=t)) for t in ["flat", *APPROXIMATE]}


# --- exact search and the tie rule -------------------------------------------------------------------------


def test_flat_search_equals_numpy_brute_force(data, built):
    vectors, ids, queries = data
    index, params = built["flat"]
    assert params == SearchParams("flat", None, None, None, 4)
    scores, found = search(index, params, queries, K)
    true_scores, true_ids = brute_force(vectors, ids, queries, K)
    np.testing.assert_array_equal(found, true_ids)
    np.testing.assert_allclose(scores, true_scores, atol=1e-5)
    assert scores.dtype == np.float32 and found.dtype == np.int64 and found.shape == (len(queries), K)


def test_flat_search_breaks_ties_by_ascending_id():
    """Duplicated vectors score exactly equal; the lower id comes first, whatever the insertion order.
    One vector is repeated 100 times, more than a first fetch of k + margin candidates holds."""
    rng = np.random.default_rng(2)
    base = clustered(600, seed=3)
    copies = np.concatenate([np.arange(600), rng.integers(0, 600, 400), np.full(100, 5)])  # rows of `base`
    vectors = base[copies]
    ids = rng.permutation(len(vectors)).astype(np.int64) * 3  # shuffled ids
    queries = np.concatenate([base[:40], base[[5]], clustered(40, seed=3, stream=1)])
    index, params = build_index(vectors, ids, IndexConfig(index_type="flat"))
    for k in (1, 4, 10, 150):
        scores, found = search(index, params, queries, k)
        true_scores, true_ids = brute_force(vectors, ids, queries, k)
        np.testing.assert_array_equal(found, true_ids)
        np.testing.assert_allclose(scores, true_scores, atol=1e-5)
        # the query equal to the 100-fold vector gets its copies first, in id order
        np.testing.assert_array_equal(found[40, : min(k, 100)], np.sort(ids[copies == 5])[: min(k, 100)])
    ex_scores, ex_ids = exact_search(vectors, ids, queries, 150)
    np.testing.assert_array_equal(ex_ids, brute_force(vectors, ids, queries, 150)[1])


def test_exact_search_matches_brute_force(data):
    vectors, ids, queries = data
    scores, found = exact_search(vectors, ids, queries, 25)
    true_scores, true_ids = brute_force(vectors, ids, queries, 25)
    np.testing.assert_array_equal(found, true_ids)
    np.testing.assert_allclose(scores, true_scores, atol=1e-6)


@pytest.mark.parametrize("index_type", ["flat", *APPROXIMATE])
def test_k_larger_than_n_pads_with_minus_one(index_type):
    vectors = clustered(7, seed=4)
    ids = np.arange(100, 107)
    index, params = build_index(vectors, ids, IndexConfig(index_type=index_type))
    scores, found = search(index, params, vectors[:2], 10, vectors_for_ids=lambda w: vectors[w - 100])
    assert found.shape == scores.shape == (2, 10)
    np.testing.assert_array_equal(found[:, :7], brute_force(vectors, ids, vectors[:2], 7)[1])
    assert (found[:, 7:] == -1).all() and np.isneginf(scores[:, 7:]).all()


# --- approximate types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("index_type", APPROXIMATE)
def test_approximate_types_reach_the_recall_target_with_exact_scores(data, built, index_type):
    vectors, ids, queries = data
    index, params = built[index_type]
    target = IndexConfig().recall_target
    assert params.index_type == index_type
    assert params.measured_recall is not None and params.measured_recall >= target
    assert (params.nprobe if index_type != "hnsw" else params.ef_search) <= GPU_MAX_K
    scores, found = search(index, params, queries, K, vectors_for_ids=lookup_for(vectors, ids))
    assert tie_aware_recall(vectors, ids, queries, found, K) >= target
    # re-ranked: the scores are the exact scores of the returned ids, in (-score, id) order
    np.testing.assert_allclose(scores, scores_of(vectors, ids, queries, found), atol=1e-6)
    assert_ranked(scores, found)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_types_storing_vectors_rerank_without_a_lookup(data, built, index_type):
    vectors, ids, queries = data
    index, params = built[index_type]
    with_lookup = search(index, params, queries, K, vectors_for_ids=lookup_for(vectors, ids))
    without = search(index, params, queries, K)
    np.testing.assert_array_equal(with_lookup[1], without[1])
    np.testing.assert_array_equal(with_lookup[0], without[0])


def test_ivfpq_needs_a_lookup_to_rerank(data, built):
    index, params = built["ivfpq"]
    with pytest.raises(ValueError, match="vectors_for_ids"):
        search(index, params, data[2], K)


def test_ivf_structure_follows_the_documented_rules(built):
    ivf = faiss.extract_index_ivf(built["ivf"][0])
    assert ivf.nlist == min(round(4 * np.sqrt(N)), N // 39)  # 4*sqrt(n), at most n_train/39
    pq = faiss.downcast_index(faiss.extract_index_ivf(built["ivfpq"][0])).pq
    assert (pq.M, pq.nbits) == (D // 4, 8)


def test_tuning_is_deterministic(data, built):
    vectors, ids, _ = data
    assert build_index(vectors, ids, IndexConfig(index_type="ivf"))[1] == built["ivf"][1]


def gap_data(seed: int = 0):
    """Clustered image-like rows and text-like queries: held-out rows displaced by one shared gap vector, as
    CLIP's text embeddings sit apart from its image embeddings (cos to their own image ~0.55 here)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((400, 32))

    def draw(m):
        x = centres[rng.integers(len(centres), size=m)] + rng.standard_normal((m, 32)) * 0.5
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    gap = rng.standard_normal(32)
    gap = 1.5 * gap / np.linalg.norm(gap)
    text = lambda m: unit_rows(draw(m) + gap)  # noqa: E731
    return draw(20_000), text(200), text(500)


def test_tuning_queries_tune_for_text_like_queries_too():
    """Tuned on perturbed rows alone, IVF meets the target for image-like queries but not for queries across
    a modality gap; given such queries (tuning_queries), it meets it on held-out ones too."""
    x, tune, held_out = gap_data()
    ids = np.arange(len(x))
    _, truth = exact_search(x, ids, held_out, K)
    cfg = IndexConfig(index_type="ivf", ivf_nlist=200, tune_queries=300)
    plain, plain_params = build_index(x, ids, cfg)
    tuned, params = build_index(x, ids, cfg, tuning_queries=tune)
    plain_recall = recall_at_k(search(plain, plain_params, held_out, K)[1], truth, K)
    recall = recall_at_k(search(tuned, params, held_out, K)[1], truth, K)
    assert plain_recall < 0.8 < 0.95 <= recall and params.nprobe > plain_params.nprobe, (plain_recall, recall)
    assert params.measured_recall >= cfg.recall_target  # the lower of the two sets' recalls
    # image-like queries keep the smaller setting tuning found enough for them (query by image)
    images = params.for_images()
    assert images.nprobe == params.image_nprobe == plain_params.nprobe < params.nprobe
    assert images.measured_recall == params.image_recall >= cfg.recall_target
    image_queries = unit_rows(x[:300] + np.random.default_rng(1).normal(size=(300, 32)).astype(np.float32) * 0.09)
    _, image_truth = exact_search(x, ids, image_queries, K)
    assert recall_at_k(search(tuned, images, image_queries, K)[1], image_truth, K) >= 0.9
    assert SearchParams.from_dict(params.to_dict()) == params and "image_nprobe" not in plain_params.to_dict()
    with pytest.raises(ValueError, match=r"tuning_queries. of shape \(3, 5\)"):
        build_index(x, ids, cfg, tuning_queries=np.ones((3, 5), np.float32))


def test_unreachable_target_warns_and_records_the_measured_recall(data):
    vectors, ids, _ = data
    config = IndexConfig(index_type="ivfpq", recall_target=1.0, pq_m=2, rerank_factor=1, tune_queries=100)
    with pytest.warns(UserWarning, match="below the target"):
        index, params = build_index(vectors, ids, config)
    assert params.measured_recall < 1.0
    assert params.nprobe == faiss.extract_index_ivf(index).nlist  # the doubling search went to the end


@pytest.mark.parametrize("n", [1, 3, 40, 300])
@pytest.mark.parametrize("index_type", ["flat", *APPROXIMATE])
def test_tiny_databases_work(n, index_type):
    vectors = clustered(n, d=16, seed=5)
    ids = np.arange(n, dtype=np.int64)
    if index_type == "ivfpq" and n < 2:
        with pytest.raises(ValueError, match="use index_type flat"):
            build_index(vectors, ids, IndexConfig(index_type=index_type))
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no tuning warning: tiny sets reach the target
        index, params = build_index(vectors, ids, IndexConfig(index_type=index_type))
    _, found = search(index, params, vectors, K, vectors_for_ids=lambda w: vectors[w])
    true_ids = brute_force(vectors, ids, vectors, min(K, n))[1]
    assert (found[:, n:] == -1).all()
    if index_type == "flat":
        np.testing.assert_array_equal(found[:, :n], true_ids)
    else:
        assert recall_at_k(found, true_ids, K) >= IndexConfig().recall_target


# --- choosing the type -------------------------------------------------------------------------------------------


def test_auto_chooses_flat_then_ivf_then_ivfpq_past_the_memory_budget():
    config = IndexConfig()
    assert choose_index_type(1_000, 768, config) == IndexType.FLAT
    assert choose_index_type(config.flat_max_vectors, 768, config) == IndexType.FLAT
    assert choose_index_type(config.flat_max_vectors + 1, 768, config) == IndexType.IVF
    assert choose_index_type(1_000_000, 768, config) == IndexType.IVF  # 3 GB of float32 < 8 GiB
    assert choose_index_type(5_000_000, 768, config) == IndexType.IVFPQ  # 15 GB > 8 GiB
    small_budget = IndexConfig(memory_budget_bytes=1 << 30)
    assert choose_index_type(1_000_000, 768, small_budget) == IndexType.IVFPQ


def test_explicit_types_pass_through():
    for t in ["flat", "hnsw", "ivf", "ivfpq"]:
        assert choose_index_type(10, 768, IndexConfig(index_type=t)) == IndexType(t)
        assert choose_index_type(10**9, 768, IndexConfig(index_type=IndexType(t))) == IndexType(t)


def test_auto_builds_flat_for_a_small_database(data):
    vectors, ids, _ = data
    assert build_index(vectors[:500], ids[:500])[1].index_type == "flat"
    assert build_index(vectors, ids, IndexConfig(flat_max_vectors=100))[1].index_type == "ivf"


# --- files ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("index_type", ["flat", *APPROXIMATE])
def test_save_load_round_trip_gives_identical_results(tmp_path, data, built, index_type, mmap):
    vectors, ids, queries = data
    index, params = built[index_type]
    path = tmp_path / "index.faiss"
    save_index(index, path)
    save_index(index, path)  # replacing an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss"]  # no temporary left behind
    loaded = load_index(path, mmap=mmap)
    lookup = lookup_for(vectors, ids)
    restored = SearchParams.from_dict(params.to_dict())
    before = search(index, params, queries, K, vectors_for_ids=lookup)
    after = search(loaded, restored, queries, K, vectors_for_ids=lookup)
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[0], after[0])
    # apply_search_params makes plain faiss search use the tuned setting through the id map
    apply_search_params(loaded, restored)
    np.testing.assert_array_equal(loaded.search(queries, K)[1], index.search(queries, K)[1])


def test_load_reports_missing_and_corrupt_files(tmp_path, built):
    with pytest.raises(FileNotFoundError, match="no FAISS index"):
        load_index(tmp_path / "missing.faiss")
    path = tmp_path / "index.faiss"
    save_index(built["ivf"][0], path)
    data = path.read_bytes()
    for name, content in [
        ("truncated", data[: len(data) // 2]),
        ("garbage", b"\x00not an index" * 100),
        ("empty", b""),
    ]:
        bad = tmp_path / f"{name}.faiss"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="not a readable FAISS index.*rebuild"):
            load_index(bad)
    faiss.write_index(faiss.IndexFlatIP(4), str(tmp_path / "plain.faiss"))
    with pytest.raises(ValueError, match="not an IndexIDMap2"):
        load_index(tmp_path / "plain.faiss")


def test_search_params_round_trip_and_validation():
    p = SearchParams("ivf", 16, None, 0.97, 4)
    assert SearchParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown SearchParams keys"):
        SearchParams.from_dict({**p.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="needs nprobe"):
        SearchParams("ivf", None, None, None)
    with pytest.raises(ValueError, match="must be one of"):
        SearchParams("auto", None, None, None)


# --- bad inputs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda v, i: (v.astype(np.float64), i), "must be float32"),
        (lambda v, i: (v[:, 0], i), "2-D"),
        (lambda v, i: (v * 2, i), "L2-normalised"),
        (lambda v, i: (np.where(np.arange(len(v))[:, None] == 3, np.nan, v).astype(np.float32), i), "NaN"),
        (lambda v, i: (v, i[:-1]), "one id per vector"),
        (lambda v, i: (v, np.concatenate([i[:-1], i[:1]])), "must be unique"),
        (lambda v, i: (v, i.astype(np.float64)), "must be integers"),
        (lambda v, i: (v, i - 10), ">= 0"),
        (lambda v, i: (v[:0], i[:0]), "at least one vector"),
    ],
)
def test_bad_database_inputs_raise_value_errors(make, message):
    vectors, ids = clustered(50, seed=6), np.arange(50)
    bad_vectors, bad_ids = make(vectors, ids)
    with pytest.raises(ValueError, match=message):
        build_index(bad_vectors, bad_ids, IndexConfig(index_type="flat"))


def test_bad_search_inputs_raise_value_errors(data, built):
    _, _, queries = data
    index, params = built["flat"]
    with pytest.raises(ValueError, match=r"shape \(nq, 64\)"):
        search(index, params, queries[:, :32], K)
    with pytest.raises(ValueError, match="k must be an integer"):
        search(index, params, queries, 0)
    with pytest.raises(ValueError, match="search parameters are for a ivf index but this index is flat"):
        search(index, built["ivf"][1], queries, K)
    with pytest.raises(ValueError, match="pq_m=5 does not divide d=64"):
        build_index(data[0][:500], data[1][:500], IndexConfig(index_type="ivfpq", pq_m=5))
    with pytest.raises(ValueError, match="unknown index_type"):
        IndexConfig(index_type="annoy")


def test_recall_at_k_ignores_padding():
    true = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
    found = np.array([[4, 9, 1, -1], [6, -1, -1, -1]])
    assert recall_at_k(found, true, 4) == pytest.approx((2 / 4 + 1 / 2) / 2)
    assert recall_at_k(true, true, 4) == 1.0


# --- float16 input -------------------------------------------------------------------------------------------------


def stored(tmp_path, vectors, name="embeddings.npy"):
    """`vectors` as the store keeps them: float16 rows in a .npy file, memory-mapped."""
    path = tmp_path / name
    np.save(path, vectors.astype(np.float16))
    return np.load(path, mmap_mode="r")


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf", "ivfpq"])
def test_float16_memmap_build_equals_the_float32_build_of_unit_rows(tmp_path, monkeypatch, data, index_type):
    """Read in chunks (CHUNK_ROWS patched to 1000: five chunks), float16 rows give the index of their float32
    unit rows. HNSW graphs depend on how the adds are batched, so hnsw is held to the recall target instead."""
    vectors, ids, queries = data
    x16 = stored(tmp_path, vectors)
    x32 = unit_rows(x16)
    config = IndexConfig(index_type=index_type)
    monkeypatch.setattr(vector_index, "CHUNK_ROWS", 1000)
    index, params = build_index(x16, ids, config)
    lookup = lookup_for(x32, ids)
    scores, found = search(index, params, queries, K, vectors_for_ids=lookup)
    if index_type == "hnsw":
        assert params.measured_recall >= config.recall_target
        assert tie_aware_recall(x32, ids, queries, found, K) >= config.recall_target
        return
    reference, ref_params = build_index(x32, ids, config)
    assert params == ref_params
    ref_scores, ref_found = search(reference, ref_params, queries, K, vectors_for_ids=lookup)
    np.testing.assert_array_equal(found, ref_found)
    np.testing.assert_array_equal(scores, ref_scores)
    # the id map and (flat, ivf) the stored vectors are those add_with_ids makes
    np.testing.assert_array_equal(faiss.vector_to_array(index.id_map), ids)
    if index_type != "ivfpq":
        np.testing.assert_array_equal(index.reconstruct_batch(ids[:100]), x32[:100])
        np.testing.assert_array_equal(search(index, params, queries, K)[1], ref_found)


def test_float16_build_converts_chunks_not_the_whole_set(tmp_path, monkeypatch, data):
    """No float32 copy of all n rows: every unit_rows call converts at most a chunk, the training sample or
    the tuning candidates."""
    vectors, ids, _ = data
    x16 = stored(tmp_path, vectors)
    sizes = []

    def recording_unit_rows(x):
        sizes.append(len(x))
        return unit_rows(x)

    monkeypatch.setattr(vector_index, "CHUNK_ROWS", 1000)
    monkeypatch.setattr(vector_index, "unit_rows", recording_unit_rows)
    config = IndexConfig(index_type="ivf", train_sample=2000, tune_queries=40)
    build_index(x16, ids, config)
    assert sizes and max(sizes) <= 2000 < N


def test_bad_float16_rows_raise_value_errors():
    vectors = clustered(50, seed=6).astype(np.float16)
    zero = vectors.copy()
    zero[7] = 0
    with pytest.raises(ValueError, match="row 7 is all zeros"):
        build_index(zero, np.arange(50), IndexConfig(index_type="flat"))
    inf = vectors.copy()
    inf[9, 3] = np.inf
    with pytest.raises(ValueError, match="row 9 contains NaN or inf"):
        build_index(inf, np.arange(50), IndexConfig(index_type="flat"))


def test_exact_search_chunked_equals_exact_search_with_ties(tmp_path, monkeypatch):
    """Merging per-chunk exact top-k is exact: 61 copies of one vector spread over ten chunks of 37 rows come
    back in id order; k beyond n pads."""
    rng = np.random.default_rng(8)
    base = clustered(300, seed=7)
    rows = rng.permutation(np.concatenate([np.arange(300), np.full(60, 11)]))  # rows of `base`
    vectors, ids = base[rows], rng.permutation(len(rows)).astype(np.int64) * 2
    queries = np.concatenate([base[[11]], clustered(30, seed=7, stream=1)])
    monkeypatch.setattr(vector_index, "CHUNK_ROWS", 37)
    for k in (1, 10, 80, 500):
        exp_scores, exp_ids = exact_search(vectors, ids, queries, k)
        got_scores, got_ids = exact_search_chunked(vectors, ids, queries, k)
        np.testing.assert_array_equal(got_ids, exp_ids)
        np.testing.assert_array_equal(got_scores, exp_scores)
    np.testing.assert_array_equal(got_ids[0, :61], np.sort(ids[rows == 11]))
    assert (got_ids[:, len(rows) :] == -1).all() and np.isneginf(got_scores[:, len(rows) :]).all()
    x16 = stored(tmp_path, vectors)
    got_scores, got_ids = exact_search_chunked(x16, ids, queries, 80)
    exp_scores, exp_ids = brute_force(unit_rows(x16), ids, queries, 80)
    np.testing.assert_array_equal(got_ids, exp_ids)
    np.testing.assert_allclose(got_scores, exp_scores, atol=1e-6)


# --- a shared coarse quantizer -------------------------------------------------------------------------------------


def centroids(index_or_quantizer):
    q = index_or_quantizer
    if not isinstance(q, faiss.IndexFlat):
        q = faiss.extract_index_ivf(q).quantizer
    return q.reconstruct_n(0, q.ntotal)


@pytest.mark.parametrize("index_type", ["ivf", "ivfpq"])
def test_a_given_quantizer_gives_the_index_trained_inside(data, built, index_type):
    vectors, ids, queries = data
    config = IndexConfig(index_type=index_type)
    quantizer = train_quantizer(vectors, config)
    index, params = build_index(vectors, ids, config, quantizer=quantizer)
    reference, ref_params = built[index_type]
    assert params == ref_params
    np.testing.assert_array_equal(centroids(index), centroids(reference))
    lookup = lookup_for(vectors, ids)
    expected = search(reference, ref_params, queries, K, vectors_for_ids=lookup)
    np.testing.assert_array_equal(search(index, params, queries, K, vectors_for_ids=lookup)[1], expected[1])
    # the index holds a copy: clearing the caller's quantizer changes nothing
    quantizer.reset()
    assert quantizer.ntotal == 0 and faiss.extract_index_ivf(index).quantizer.ntotal == len(centroids(reference))
    np.testing.assert_array_equal(search(index, params, queries, K, vectors_for_ids=lookup)[1], expected[1])


def test_segments_share_one_quantizer_sized_for_the_collection(tmp_path, data):
    vectors, ids, queries = data
    config = IndexConfig(index_type="ivf")
    assert train_quantizer(vectors, config).ntotal == N // 39  # 4*sqrt(5000) = 283, capped at n_train / 39
    quantizer = train_quantizer(stored(tmp_path, vectors), config, n=100)  # nlist for 100 vectors: 4*sqrt(100)
    assert quantizer.ntotal == 40
    np.testing.assert_allclose(centroids(quantizer), centroids(train_quantizer(vectors, config, n=100)), atol=1e-3)
    half = N // 2
    for part in (slice(0, half), slice(half, N)):
        index, params = build_index(vectors[part], ids[part], config, quantizer=quantizer)
        np.testing.assert_array_equal(centroids(index), centroids(quantizer))
        _, found = search(index, params, queries, K)
        assert tie_aware_recall(vectors[part], ids[part], queries, found, K) >= config.recall_target


def test_bad_quantizers_raise_value_errors(data):
    vectors, ids, _ = data
    config = IndexConfig(index_type="ivf")
    with pytest.raises(ValueError, match="quantizer has d=16 but the vectors have d=64"):
        build_index(vectors, ids, config, quantizer=train_quantizer(clustered(500, d=16), config))
    quantizer = train_quantizer(vectors, config)
    with pytest.raises(ValueError, match="ivf_nlist=7 but the quantizer has 128"):
        build_index(vectors, ids, IndexConfig(index_type="ivf", ivf_nlist=7), quantizer=quantizer)
    with pytest.raises(ValueError, match="IndexFlatIP"):
        build_index(vectors, ids, config, quantizer=faiss.IndexFlatL2(D))
    with pytest.raises(ValueError, match="no centroids"):
        build_index(vectors, ids, config, quantizer=faiss.IndexFlatIP(D))
    # flat has no coarse quantizer: it ignores one
    flat, params = build_index(vectors[:500], ids[:500], IndexConfig(index_type="flat"), quantizer=quantizer)
    assert params.index_type == "flat" and flat.ntotal == 500


def test_quantizer_file_round_trip_and_errors(tmp_path, data, built):
    vectors, _, _ = data
    quantizer = train_quantizer(vectors, IndexConfig(index_type="ivf"))
    path = tmp_path / "coarse.faiss"
    save_quantizer(quantizer, path)
    save_quantizer(quantizer, path)  # replacing an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coarse.faiss"]
    loaded = load_quantizer(path)
    assert isinstance(loaded, faiss.IndexFlatIP)
    np.testing.assert_array_equal(centroids(loaded), centroids(quantizer))
    with pytest.raises(FileNotFoundError, match="no coarse quantizer file"):
        load_quantizer(tmp_path / "missing.faiss")
    save_index(built["ivf"][0], tmp_path / "index.faiss")
    with pytest.raises(ValueError, match="not a coarse quantizer written by save_quantizer"):
        load_quantizer(tmp_path / "index.faiss")
    (tmp_path / "truncated.faiss").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="not a readable coarse quantizer"):
        load_quantizer(tmp_path / "truncated.faiss")
    with pytest.raises(ValueError, match="trained faiss.IndexFlatIP"):
        save_quantizer(built["ivf"][0], tmp_path / "wrong.faiss")


# --- on-disk inverted lists ----------------------------------------------------------------------------------------

ONDISK_N, ONDISK_D = 3000, 32
ONDISK = IndexConfig(index_type="ivf", ondisk_min_vectors=2000)


@pytest.fixture(scope="module")
def ondisk_data():
    vectors = clustered(ONDISK_N, d=ONDISK_D, seed=9)
    ids = np.random.default_rng(10).permutation(ONDISK_N).astype(np.int64) * 5 + 2
    queries = clustered(200, d=ONDISK_D, seed=9, stream=1)
    return vectors, ids, queries


def build_ondisk(folder, vectors, ids, config=ONDISK, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    index, params = build_index(vectors, ids, config, ondisk_path=folder / "index.ivfdata", **kw)
    save_index(index, folder / "index.faiss")
    return index, params


def test_ondisk_index_survives_a_folder_rename_and_equals_the_in_ram_ivf(tmp_path, ondisk_data):
    """float16 memmap -> on-disk lists in a staging folder; saved, the folder renamed (as the store commits a
    segment), loaded: the same ids and scores as the in-RAM IVF with the same quantizer and nprobe."""
    vectors, ids, queries = ondisk_data
    x16 = stored(tmp_path, vectors)
    x32 = unit_rows(x16)
    quantizer = train_quantizer(x16, ONDISK)
    in_ram, ram_params = build_index(x32, ids, ONDISK, quantizer=quantizer)
    assert not is_ondisk(in_ram)

    staging = tmp_path / ".segment-1.tmp"
    index, params = build_ondisk(staging, x16, ids, quantizer=quantizer)
    assert is_ondisk(index) and params == ram_params and params.measured_recall >= ONDISK.recall_target
    assert sorted(p.name for p in staging.iterdir()) == ["index.faiss", "index.ivfdata"]
    assert (staging / "index.ivfdata").stat().st_size == ONDISK_N * (ONDISK_D * 4 + 8)  # compact: codes + ids
    final = staging.rename(tmp_path / "segment-1")

    loaded = load_index(final / "index.faiss")
    assert is_ondisk(loaded) and loaded.ntotal == ONDISK_N
    lookup = lookup_for(x32, ids)
    expected = search(in_ram, ram_params, queries, K, vectors_for_ids=lookup)
    got = search(loaded, params, queries, K, vectors_for_ids=lookup)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    # plain faiss search with the tuned nprobe: the same candidates and float32 scores, the caller's ids
    apply_search_params(loaded, params)
    np.testing.assert_array_equal(loaded.search(queries, 40)[1], in_ram.search(queries, 40)[1])
    np.testing.assert_array_equal(loaded.search(queries, 40)[0], in_ram.search(queries, 40)[0])
    assert to_gpu_if_available(loaded) is loaded
    with pytest.raises(ValueError, match="pass vectors_for_ids"):
        search(loaded, params, queries, K)


def test_ondisk_is_used_only_for_large_ivf(tmp_path, ondisk_data):
    vectors, ids, _ = ondisk_data
    small, _ = build_index(vectors[:1000], ids[:1000], ONDISK, ondisk_path=tmp_path / "index.ivfdata")
    flat_config = IndexConfig(index_type="flat", ondisk_min_vectors=2000)
    flat, _ = build_index(vectors, ids, flat_config, ondisk_path=tmp_path / "index.ivfdata")
    assert not is_ondisk(small) and not is_ondisk(flat) and isinstance(small, faiss.IndexIDMap2)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_ondisk_files_are_checked(tmp_path, ondisk_data):
    vectors, ids, _ = ondisk_data
    with pytest.raises(ValueError, match="must end in .ivfdata"):
        build_index(vectors, ids, ONDISK, ondisk_path=tmp_path / "index.data")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_index(vectors, ids, ONDISK, ondisk_path=tmp_path / "missing" / "index.ivfdata")
    index, _ = build_ondisk(tmp_path / "seg", vectors, ids)
    with pytest.raises(FileExistsError, match="build into a new folder"):
        build_index(vectors, ids, ONDISK, ondisk_path=tmp_path / "seg" / "index.ivfdata")
    with pytest.raises(ValueError, match="save it as .*seg/index.faiss"):
        save_index(index, tmp_path / "seg" / "other.faiss")
    # a copy without its lists, and one with truncated lists
    for name, lists in [("no-lists", None), ("truncated", (tmp_path / "seg" / "index.ivfdata").read_bytes()[:1000])]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "index.faiss").write_bytes((tmp_path / "seg" / "index.faiss").read_bytes())
        if lists is not None:
            (folder / "index.ivfdata").write_bytes(lists)
    with pytest.raises(FileNotFoundError, match="index.ivfdata are missing"):
        load_index(tmp_path / "no-lists" / "index.faiss")
    with pytest.raises(ValueError, match="truncated"):
        load_index(tmp_path / "truncated" / "index.faiss")


RSS_SCRIPT = textwrap.dedent(
    """
    import sys
    import faiss
    import numpy as np
    from indexes.vector_index import load_index

    def rss():  # bytes resident: anonymous + file pages
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(fields["VmRSS"].split()[0]) * 1024

    queries = np.load(sys.argv[2])
    before = rss()
    index = load_index(sys.argv[1])
    index.search(queries[:5], 10, params=faiss.SearchParametersIVF(nprobe=4))
    few_lists = rss()
    index.search(queries, 10, params=faiss.SearchParametersIVF(nprobe=index.nlist))  # every list
    all_lists = rss()
    print(few_lists - before, all_lists - before)
    """
)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the process's RSS from /proc (Linux)")
def test_searching_an_ondisk_index_maps_only_the_lists_it_visits(tmp_path):
    """In a fresh process: loading an on-disk index and probing 4 of its lists for 5 queries grows RSS by far
    less than its lists file (~3 MB, mostly faiss's code paged in); a scan of every list grows it by about
    the file (so the measurement can fail)."""
    n, d = 40_000, 256
    vectors = clustered(n, d=d, n_clusters=200, seed=11)
    config = IndexConfig(index_type="ivf", ondisk_min_vectors=1, tune_queries=50)
    build_ondisk(tmp_path / "seg", vectors, np.arange(n), config)
    np.save(tmp_path / "queries.npy", clustered(20, d=d, n_clusters=200, seed=11, stream=1))
    file_size = (tmp_path / "seg" / "index.ivfdata").stat().st_size  # 41 MB
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "seg" / "index.faiss"), str(tmp_path / "queries.npy")],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    few_lists, all_lists = map(int, out.stdout.split()[-2:])
    assert few_lists < file_size / 4
    assert all_lists > file_size / 2


# --- GPU ---------------------------------------------------------------------------------------------------------------

HAS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@pytest.mark.skipif(HAS_GPU, reason="this machine has a faiss GPU; test_gpu_search_equals_cpu covers it")
def test_to_gpu_if_available_keeps_the_cpu_index_without_a_gpu(built, recwarn):
    for index, _ in built.values():
        assert to_gpu_if_available(index) is index
    assert len(recwarn) == 0


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs faiss with GPU support and a CUDA GPU (pip install -e '.[gpu]')")
def test_gpu_search_equals_cpu(tmp_path, data, built):
    vectors, ids, queries = data
    lookup = lookup_for(vectors, ids)
    for index_type, (index, params) in built.items():
        moved = to_gpu_if_available(index)
        assert (moved is index) == (index_type == "hnsw")
        cpu = search(index, params, queries, K, vectors_for_ids=lookup)
        gpu = search(moved, params, queries, K, vectors_for_ids=lookup)
        if index_type == "flat":
            np.testing.assert_array_equal(gpu[1], cpu[1])
        else:
            assert recall_at_k(gpu[1], cpu[1], K) >= 0.95
        np.testing.assert_allclose(gpu[0], scores_of(vectors, ids, queries, gpu[1]), atol=1e-6)  # re-ranked exactly
        assert_ranked(*gpu)
        save_index(moved, tmp_path / f"{index_type}.faiss")  # GPU indexes are saved through a CPU copy
        loaded = load_index(tmp_path / f"{index_type}.faiss")  # codes mapped from the file (IO_FLAG_MMAP_IFC)
        assert loaded.ntotal == N
        reloaded = search(to_gpu_if_available(loaded), params, queries, K, vectors_for_ids=lookup)
        np.testing.assert_array_equal(reloaded[1], gpu[1])
    with pytest.raises(ValueError, match="GPU's limit"):
        search(to_gpu_if_available(built["flat"][0]), built["flat"][1], queries[:2], GPU_MAX_K + 1)
