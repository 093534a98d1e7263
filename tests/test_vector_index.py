"""indexes/vector_index.py against exact ground truth on synthetic clustered vectors.

The reference is numpy brute force written out here: float64 inner products rounded to float32, ranked by
(-score, id). Flat search must equal it exactly; approximate types must reach the recall target, counting
a found id as correct when its exact score is within 1e-6 of the k-th exact score (ties).
"""

import warnings

import faiss
import numpy as np
import pytest

from indexes.vector_index import (
    GPU_MAX_K,
    IndexConfig,
    IndexType,
    SearchParams,
    apply_search_params,
    build_index,
    choose_index_type,
    exact_search,
    load_index,
    recall_at_k,
    save_index,
    search,
    to_gpu_if_available,
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


@pytest.mark.parametrize("index_type", ["flat", *APPROXIMATE])
def test_save_load_round_trip_gives_identical_results(tmp_path, data, built, index_type):
    vectors, ids, queries = data
    index, params = built[index_type]
    path = tmp_path / "index.faiss"
    save_index(index, path)
    save_index(index, path)  # replacing an existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss"]  # no temporary left behind
    loaded = load_index(path)
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
        assert load_index(tmp_path / f"{index_type}.faiss").ntotal == N
    with pytest.raises(ValueError, match="GPU's limit"):
        search(to_gpu_if_available(built["flat"][0]), built["flat"][1], queries[:2], GPU_MAX_K + 1)
