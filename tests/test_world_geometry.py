"""benchmarks/world_geometry.py: the statistics on hand-made vectors with closed forms, and one tiny run of the
whole measurement (tiny world, tiny-random CLIP) through the same code path the toyworld CLIP takes."""

import json
import math

import numpy as np
import pytest

from benchmarks import world_geometry as wg

TOL = 1e-12  # float64 arithmetic on a handful of vectors


def e(i: int, d: int = 4) -> np.ndarray:
    v = np.zeros(d)
    v[i] = 1.0
    return v


def test_modality_gap_closed_form():
    # images at (cos a, ±sin a, 0), texts at (0, 0, 1): centroids (cos a, 0, 0) and (0, 0, 1), gap sqrt(cos² a + 1)
    a = 0.7
    images = np.array([[math.cos(a), math.sin(a), 0.0], [math.cos(a), -math.sin(a), 0.0]]) * np.array([[3.0], [0.5]])
    texts = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 5.0]])  # norms differ: rows are normalised first
    assert wg.modality_gap(images, texts) == pytest.approx(math.sqrt(math.cos(a) ** 2 + 1), abs=TOL)
    assert wg.modality_gap(images, images) == pytest.approx(0.0, abs=TOL)
    assert wg.modality_gap(e(0)[None], -e(0)[None]) == pytest.approx(2.0, abs=TOL)  # the largest possible
    with pytest.raises(ValueError, match="zero vector"):
        wg.modality_gap(np.zeros((1, 3)), texts)


def test_pair_cosines():
    basis = np.eye(3) * 2.0
    assert np.allclose(wg.row_cosines(basis, basis), 1.0, atol=TOL)
    off = wg.off_diagonal_cosines(basis, basis)
    assert off.shape == (6,) and np.allclose(off, 0.0, atol=TOL)
    # rows at 0 and 60 degrees: the two off-diagonal cosines are both cos 60 = 0.5, the diagonal 1
    a = np.array([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    assert np.allclose(wg.off_diagonal_cosines(a, a), 0.5, atol=TOL)
    assert np.allclose(wg.row_cosines(a, a[::-1]), 0.5, atol=TOL)
    with pytest.raises(ValueError, match="one shape"):
        wg.row_cosines(a, basis)
    with pytest.raises(ValueError, match=">= 2"):
        wg.off_diagonal_cosines(a[:1], a[:1])


def concept(words, shots, shot_contexts, queries, query_contexts, query_texts, others=None, other_contexts=()):
    d = len(shots[0])
    return wg.ConceptFeatures(
        words=words,
        shots=np.array(shots),
        shot_contexts=tuple(shot_contexts),
        others=np.zeros((0, d)) if others is None else np.array(others),
        other_contexts=tuple(other_contexts),
        queries=np.array(queries),
        query_contexts=tuple(query_contexts),
        query_texts=np.array(query_texts),
    )


def test_concept_statistics():
    dress = ("dress", "red", "plain")
    # shots e0 (beach) and e1 (beach), query e0 (grass) with its text e2
    a = concept(dress, [e(0), e(1)], ["beach", "beach"], [e(0)], ["grass"], [e(2)])
    # same pairs: (e0, e0) = 1 and (e1, e0) = 0 in different contexts; (e0, e1) shares the beach and is left out
    assert np.allclose(np.sort(wg.same_concept_cosines(a)), [0.0, 1.0], atol=TOL)
    # an extra few-shot image counts in the pairs, not in the shot mean
    a2 = concept(dress, [e(0)], ["beach"], [e(0)], ["grass"], [e(2)], others=[e(0)], other_contexts=["street"])
    assert np.allclose(wg.same_concept_cosines(a2), 1.0, atol=TOL) and len(wg.same_concept_cosines(a2)) == 3
    assert np.allclose(wg.shot_mean(a2), e(0), atol=TOL)
    lookalike = concept(dress, [e(3)], ["trees"], [e(3)], ["grass"], [e(2)])  # same words, other details
    stranger = concept(("top", "blue", "striped"), [e(0)], ["trees"], [e(1)], ["couch"], [e(1)])  # other words
    held = wg.held_out_cosines([a, lookalike, stranger])
    # a's query e0: parent text e2 -> 0; shot mean unit(e0 + e1) -> 1/sqrt2; text+image unit(e2 + unit(e0 + e1))
    # -> (1/sqrt2) / sqrt2 = 1/2; look-alike shot mean e3 -> 0 (the stranger's e0 must not count)
    assert held["parent_text"][0] == pytest.approx(0.0, abs=TOL)
    assert held["shot_mean"][0] == pytest.approx(1 / math.sqrt(2), abs=TOL)
    assert held["text_plus_shots"][0] == pytest.approx(0.5, abs=TOL)
    assert np.allclose(held["lookalike"], [0.0, 0.0], atol=TOL)  # a vs the look-alike, the look-alike vs a
    assert len(held["parent_text"]) == 3  # one per query of every concept


def test_geometry_and_published_table_agree():
    rng = np.random.default_rng(0)
    images, texts = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    stats = wg.geometry(
        images, texts, [concept(("dress", "red", "plain"), [e(0)], ["beach"], [e(0)], ["grass"], [e(1)])]
    )
    assert set(stats) == set(wg.STATISTICS)
    assert stats["unrelated_images"]["n"] == 10 and stats["non_matching_pair"]["n"] == 20
    assert stats["held_out_vs_lookalike_shot_mean"] == {"value": None, "sd": None, "n": 0}  # no look-alike given
    assert stats["modality_gap"]["value"] == pytest.approx(wg.modality_gap(images, texts), abs=TOL)
    assert set(wg.PUBLISHED) <= set(wg.STATISTICS)
    assert all(
        set(models) <= set(wg.MODELS) and all(p.source for p in models.values()) for models in wg.PUBLISHED.values()
    )


def test_tiny_world_run_is_reproducible(tiny_encoder):
    config = wg.GeometryConfig(model="tiny-random", world_preset="tiny", n_pairs=8, n_concepts=3, probe_scenes=12)
    first, again = wg.measure(config, tiny_encoder), wg.measure(config, tiny_encoder)
    assert first["statistics"] == again["statistics"]  # exact: same seeds, same arithmetic
    stats = first["statistics"]
    assert 0.0 <= stats["modality_gap"]["value"] <= 2.0
    for key, stat in stats.items():
        if key != "modality_gap":
            assert stat["n"] > 0 and abs(stat["value"]) <= 1.0 + 1e-9, key
    assert first["details"] == again["details"] and first["details"]["scenes"] == 12
    assert set(first["details"]["probe"]) == set(wg.PROBE_FACTORS)
    assert all(0 <= v["accuracy"] <= 1 and 0 < v["chance"] < 1 for v in first["details"]["probe"].values())
    assert first["details"]["detail_swap"]["n"] == first["details"]["colour_swap"]["n"] == 12
    other_seed = wg.measure(
        wg.GeometryConfig(world_preset="tiny", n_pairs=8, n_concepts=3, world_seed=1, probe_scenes=12), tiny_encoder
    )
    assert other_seed["statistics"]["modality_gap"] != stats["modality_gap"]
    table = wg.markdown(first)
    assert all(label in table for label in wg.STATISTICS.values()) and "not found" in table and "0.82 [1]" in table
    assert "Linear probe of the image embeddings: trim " in table and "emblem colour" in table


def test_linear_probe_reads_what_the_features_carry():
    rng = np.random.default_rng(0)
    labels = [str(v) for v in rng.integers(0, 4, 300)]
    carried = np.eye(4)[[int(v) for v in labels]] + 0.05 * rng.normal(size=(300, 4))
    noise = rng.normal(size=(300, 4))
    assert wg.linear_probe(np.hstack([carried, noise]), labels) == 1.0
    assert wg.linear_probe(noise, labels) < 0.45  # chance 0.25
    with pytest.raises(ValueError, match="fit and to test"):
        wg.linear_probe(noise[:1], labels[:1])


def test_cli_json(capsys):
    result = wg.main(
        [
            "--model",
            "tiny-random",
            "--world-preset",
            "tiny",
            "--n",
            "4",
            "--concepts",
            "2",
            "--probe-scenes",
            "6",
            "--json",
        ]
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["statistics"] == json.loads(json.dumps(result["statistics"]))
    assert printed["published"]["modality_gap"]["ViT-B/32"]["value"] == "0.82"
    with pytest.raises(ValueError, match="n_pairs >= 2"):
        wg.measure(wg.GeometryConfig(n_pairs=1))
