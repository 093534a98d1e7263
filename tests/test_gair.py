"""Composed queries and GAIR (retrieval.composed, retrieval.gair, `cli.py query --token --gair`) on tiny models."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from indexes.store import IndexStore
from retrieval.composed import (
    PAPER_ATTRIBUTES,
    QueryError,
    align_index,
    composed_feature,
    conditioning_pair,
    context_features,
    mix,
    mix_conditioning,
    plan_query,
    slot_spans,
)
from retrieval.engine import Engine
from retrieval.gair import GairConfig, context_key, gair_scores, parse_weights, run_gair
from retrieval.io.cache import write_cached
from retrieval.search import search_vectors
from tests.tiny import make_token, write_gallery
from tokens.store import TokenStore
from tokens.token_file import TokenModelMismatch

runner = CliRunner()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- the planner
def test_the_parent_word_follows_the_token(tiny):
    tok = make_token(tiny.clip)
    p = plan_query("a person wearing a * in front of a brick wall", [tok])
    assert p.composed == "a person wearing a <my-dress> dress in front of a brick wall"
    assert p.with_word("red") == "a person wearing a red dress in front of a brick wall"
    p = plan_query("a person wearing a *  Dress on a beach", [tok])  # the parent already written: not repeated
    assert p.composed == "a person wearing a <my-dress> Dress on a beach"
    p = plan_query("a * dresser", [tok])  # a longer word is not the parent
    assert p.composed == "a <my-dress> dress dresser"


def test_several_tokens_inline(tiny):
    a, b = make_token(tiny.clip, "a-bag", "bag"), make_token(tiny.clip, "my-dress", "dress", seed=1)
    p = plan_query("a <my-dress> next to a <a-bag> and another <my-dress>", [a, b])
    assert p.composed == "a <my-dress> dress next to a <a-bag> bag and another <my-dress> dress"
    assert [t.info.name for t in p.tokens] == ["my-dress", "a-bag"]
    assert p.with_word("old") == "a old dress next to a old bag and another old dress"


@pytest.mark.parametrize(
    "text, names, message",
    [
        ("a person wearing a * dress", [], "no token was given"),
        ("a person wearing a dress", ["my-dress"], "does not use it"),
        ("a person wearing a * and a *", ["my-dress", "a-bag"], "stands for one token"),
        ("a <other> on a beach", ["my-dress"], "no given token has that name"),
        ("   ", ["my-dress"], "empty"),
    ],
)
def test_planner_errors_say_how_to_write_the_query(tiny, text, names, message):
    toks = [make_token(tiny.clip, n, seed=i) for i, n in enumerate(names)]
    with pytest.raises(QueryError, match=message):
        plan_query(text, toks)


def test_a_token_for_another_model_is_refused(tiny, tmp_path):
    store = TokenStore(tmp_path)
    store.save(make_token(tiny.clip, model="ViT-B-32/openai"))
    engine = Engine(tokens_dir=store.root, backbone=tiny)
    with pytest.raises(TokenModelMismatch, match="ViT-B-32/openai"):
        engine.plan("a * on a beach", ["my-dress"])


# ----- features
def test_context_feature_is_the_plain_sentences_and_mix_endpoints(tiny):
    clip = tiny.clip
    tok = make_token(clip)
    p = plan_query("a person wearing a * on a beach", [tok])
    ctx = context_features(clip, p, ["red", "navy blue"])
    plain = clip.encode_texts(
        ["a person wearing a red dress on a beach", "a person wearing a navy blue dress on a beach"]
    )
    np.testing.assert_allclose(ctx, plain, atol=1e-5)
    comp = composed_feature(clip, p)
    np.testing.assert_allclose(comp, clip.encode_texts([p.composed], p.vectors)[0], atol=1e-6)
    assert np.array_equal(mix(comp, ctx.mean(0), 1.0), (comp / np.linalg.norm(comp)).astype(np.float32))
    m = ctx.mean(0)
    np.testing.assert_allclose(mix(comp, m, 0.0), m / np.linalg.norm(m), atol=1e-6)
    assert not np.allclose(mix(comp, m, 0.5), mix(comp, m, 1.0))


def test_alignment_of_n_token_vectors_with_m_attribute_tokens():
    L = 12
    assert align_index([(4, 2)], [(4, 2)], L).tolist() == list(range(L))  # n = m: identity
    # token of 3 vectors at 4..6, attribute of 1 token at 4: the slot repeats it, the rest shifts by -2
    assert align_index([(4, 3)], [(4, 1)], L).tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 6, 7, 8, 9]
    # attribute of 2 tokens for a 1-vector token: the slot takes its first; the tail clamps to the last position
    assert align_index([(2, 1)], [(2, 2)], 6).tolist() == [0, 1, 2, 4, 5, 5]
    # two slots: offsets accumulate
    assert align_index([(1, 2), (5, 2)], [(1, 1), (4, 1)], 9).tolist() == [0, 1, 1, 2, 3, 4, 4, 5, 6]
    assert align_index([(1, 2)], [], 5).tolist() == list(range(5))  # unpaired spans: identity


def test_conditioning_of_a_token_that_is_a_word_equals_the_words(tiny):
    """A 1-vector token holding the embedding of 'red' conditions exactly as the word 'red' (alignment is identity),
    and with 3 vectors the states before the slot still equal the context's (causal text tower)."""
    clip = tiny.clip
    red = clip.token_embedding.weight.detach()[clip.tokenizer.encode("red")]
    p = plan_query("a person wearing a * on a beach", [make_token(clip, vectors=red.clone())])
    h_comp, h_ctx = conditioning_pair(tiny, p, ["red"])
    torch.testing.assert_close(h_comp, h_ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        h_ctx, tiny.conditioning(["a person wearing a red dress on a beach"])[0], atol=1e-5, rtol=1e-5
    )

    p3 = plan_query("a person wearing a * on a beach", [make_token(clip, n=3)])
    h_comp, h_ctx = conditioning_pair(tiny, p3, ["red"])
    tok = clip.tokenize([p3.composed], {"<my-dress>": 3})
    ((start, n),) = slot_spans(tok, 0)
    assert n == 3
    plain = tiny.conditioning(["a person wearing a red dress on a beach"])[0]
    torch.testing.assert_close(h_ctx[:start], h_comp[:start], atol=1e-5, rtol=1e-5)
    for j in range(3):  # the attribute's state, repeated over the slot
        torch.testing.assert_close(h_ctx[start + j], plain[start], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h_ctx[start + 3 : 40], plain[start + 1 : 38], atol=1e-5, rtol=1e-5)  # shifted tail
    mixed = mix_conditioning(h_comp, h_ctx, [0.0, 0.3, 1.0])
    assert torch.equal(mixed[2], h_comp) and torch.equal(mixed[0], h_ctx)
    torch.testing.assert_close(mixed[1], 0.3 * h_comp + 0.7 * h_ctx)


# ----- GAIR
def test_scores_and_argmax_on_a_stand_in_generator(tiny, monkeypatch):
    """A generator that returns known images: score(w) = min(cos to concept, cos to context), w* its argmax."""
    clip = tiny.clip
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250), (240, 240, 20)]
    known = {c: Image.new("RGB", (32, 32), c) for c in colours}
    weights = (0.0, 0.25, 0.5, 1.0)
    by_row = [known[c] for c in colours]  # I(w_i) = image i; context images: the green one

    def stand_in(cond, uncond, guidance, steps, seeds):
        n = cond.shape[0]
        if n == 1:  # the context image
            return torch.from_numpy(np.asarray(known[colours[1]], np.float32) / 255).permute(2, 0, 1)[None]
        return torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255).permute(2, 0, 1) for im in by_row[:n]])

    monkeypatch.setattr(tiny, "sample", stand_in)
    p = plan_query("a * on a beach", [make_token(clip)])
    concept = clip.encode_pil([known[colours[3]]])  # the concept looks like the yellow image
    out = run_gair([p], tiny, concept, ["red"], GairConfig(weights=weights, steps=1))[0]
    f = clip.encode_pil(by_row)
    ctx = clip.encode_pil([known[colours[1]]])[0]
    expected = np.minimum(f @ concept[0] / np.linalg.norm(concept[0]), f @ ctx / np.linalg.norm(ctx))
    np.testing.assert_allclose(out.scores, expected, atol=1e-5)
    assert out.best == int(np.argmax(expected)) and out.w == weights[out.best]
    np.testing.assert_allclose(
        out.query_vector, mix(composed_feature(clip, p), context_features(clip, p, ["red"]).mean(0), out.w), atol=1e-6
    )
    assert out.to_json()["w"] == out.w and list(out.to_json()["scores"]) == ["0", "0.25", "0.5", "1"]
    scores, *_ = gair_scores(np.eye(3)[:2], np.array([1.0, 0, 0]), np.array([1.0, 1.0, 0]))
    np.testing.assert_allclose(scores, [np.sqrt(0.5), 0.0])


def test_batched_generation_equals_one_weight_at_a_time(tiny):
    p = plan_query("a * on a beach", [make_token(tiny.clip)])
    h_comp, h_ctx = conditioning_pair(tiny, p, ["red", "old"])
    cond = mix_conditioning(h_comp, h_ctx, [0.0, 0.5, 1.0])
    batched = tiny.sample_images(cond, [3, 3, 3], steps=3, guidance_scale=2.0, batch_size=3)
    single = [tiny.sample_images(cond[i : i + 1], [3], steps=3, guidance_scale=2.0, batch_size=1)[0] for i in range(3)]
    for a, b in zip(batched, single):
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1
    assert not np.array_equal(np.asarray(batched[0]), np.asarray(batched[2]))  # w changes the image


def test_context_images_are_cached(tiny, tmp_path, monkeypatch):
    p = plan_query("a * on a beach", [make_token(tiny.clip)])
    config = GairConfig(weights=(0.0, 1.0), steps=2, n_context=2)
    first = run_gair([p], tiny, np.ones((1, tiny.clip.dim)), ["red"], config, cache_dir=tmp_path)[0]
    rows = []
    real = tiny.sample
    monkeypatch.setattr(tiny, "sample", lambda cond, *a, **k: rows.append(cond.shape[0]) or real(cond, *a, **k))
    again = run_gair([p], tiny, np.ones((1, tiny.clip.dim)), ["red"], config, cache_dir=tmp_path)[0]
    assert rows == [2]  # only the two I(w); the context images came from the cache
    assert [
        np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(first.context_images, again.context_images)
    ] == [True, True]
    np.testing.assert_allclose(first.scores, again.scores, atol=1e-6)


def test_context_cache_key_holds_each_slots_number_of_vectors(tiny, tmp_path, monkeypatch):
    """x_c repeats the attribute's state over the token's n positions, so tokens that differ only in n_vectors
    have different context images: they must not share a cache entry. Entries under the old key (no
    slot_vectors) are not read."""
    config = GairConfig(weights=(0.0, 1.0), steps=2, n_context=1)
    text = "a * on a beach"
    p3 = plan_query(text, [make_token(tiny.clip, n=3)])
    p1 = plan_query(text, [make_token(tiny.clip, n=1)])
    k3, k1 = (context_key(tiny, p, ["red"], config) for p in (p3, p1))
    assert k3["query"] == k1["query"] and k3["slot_vectors"] == [3] and k1["slot_vectors"] == [1]
    # the token's values do not enter x_c: another 3-vector token of the same parent shares the entry
    assert context_key(tiny, plan_query(text, [make_token(tiny.clip, n=3, seed=5)]), ["red"], config) == k3
    # per slot, in order: <a> x <b> x <a> and <a> x <b> x <b> render the same context sentence
    a, b = make_token(tiny.clip, "a", n=1), make_token(tiny.clip, "b", n=2, seed=1)
    aba, abb = plan_query("<a> and <b> and <a>", [a, b]), plan_query("<a> and <b> and <b>", [a, b])
    assert aba.with_word("{attribute}") == abb.with_word("{attribute}")
    assert context_key(tiny, aba, ["red"], config)["slot_vectors"] == [1, 2, 1]
    assert context_key(tiny, abb, ["red"], config)["slot_vectors"] == [1, 2, 2]

    ones = np.ones((1, tiny.clip.dim))
    fresh1 = run_gair([p1], tiny, ones, ["red"], config)[0].context_images  # no cache
    # an entry written under the old key, without slot_vectors, holding other images: not read
    old_key = {k: v for k, v in k1.items() if k != "slot_vectors"}
    write_cached(tmp_path, "context", old_key, [Image.new("RGB", fresh1[0].size, (255, 0, 255))])
    cached3 = run_gair([p3], tiny, ones, ["red"], config, cache_dir=tmp_path)[0].context_images
    assert np.asarray(cached3[0]).tolist() != np.asarray(fresh1[0]).tolist()  # n changes x_c
    rows = []
    real = tiny.sample
    monkeypatch.setattr(tiny, "sample", lambda cond, *a, **k: rows.append(cond.shape[0]) or real(cond, *a, **k))
    cached1 = run_gair([p1], tiny, ones, ["red"], config, cache_dir=tmp_path)[0].context_images
    assert rows == [1, 2]  # the context image was made for n = 1, then the two I(w)
    assert np.asarray(cached1[0]).tolist() == np.asarray(fresh1[0]).tolist()


def test_outcome_keeps_g_star_and_g_a_and_tells_images_as_they_arrive(tiny, tmp_path):
    clip = tiny.clip
    p = plan_query("a * on a beach", [make_token(clip)])
    config = GairConfig(weights=(0.0, 0.5, 1.0), steps=1, n_context=2, batch_size=2)
    seen: list[tuple[int, int]] = []
    out = run_gair(
        [p],
        tiny,
        np.ones((1, clip.dim)),
        ["red", "old"],
        config,
        cache_dir=tmp_path,
        on_image=lambda *a: seen.append(a),
    )[0]
    # g_* and g_A of step 1, (dim,) float32: any other w is mixed from them, nothing encoded again
    g_star, g_ctx = composed_feature(clip, p), context_features(clip, p, ["red", "old"]).mean(0)
    assert out.composed_feature.shape == out.context_feature.shape == (clip.dim,)
    assert out.composed_feature.dtype == out.context_feature.dtype == np.float32
    np.testing.assert_allclose(out.composed_feature, g_star, atol=1e-6)
    np.testing.assert_allclose(out.context_feature, g_ctx, atol=1e-6)
    assert np.array_equal(out.query_at(out.w), out.query_vector)
    np.testing.assert_allclose(out.query_at(0.3), mix(g_star, g_ctx, 0.3), atol=1e-6)
    # images done / total: 0 first, then per sampler batch (2 context images, then 3 I(w) in batches of 2)
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]
    seen.clear()
    run_gair(
        [p],
        tiny,
        np.ones((1, clip.dim)),
        ["red", "old"],
        config,
        cache_dir=tmp_path,
        on_image=lambda *a: seen.append(a),
    )
    assert seen == [(0, 5), (2, 5), (4, 5), (5, 5)]  # the cached context images count as done at once


def test_weights_parse_and_check():
    assert parse_weights("0:1:0.1") == tuple(round(i / 10, 1) for i in range(11))
    assert parse_weights("0, 0.5,1") == (0.0, 0.5, 1.0)
    for bad in ("a,b", "0:1:0", "1:0"):
        with pytest.raises(QueryError):
            GairConfig(weights=parse_weights(bad))
    with pytest.raises(QueryError, match=r"in \[0, 1\]"):
        GairConfig(weights=(0.0, 1.5))


# ----- end to end: an index, a token store, the CLI
@pytest.fixture
def world(tiny, tmp_path):
    gallery = tmp_path / "gallery"
    write_gallery(gallery, 12)
    idx = tmp_path / "idx"
    r = runner.invoke(
        app,
        [
            "index",
            str(gallery),
            "--index-dir",
            str(idx),
            "--model",
            "tiny-random",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    store = TokenStore(tmp_path / "tokens")
    concept = tmp_path / "concept"
    write_gallery(concept, 3, seed=5, subdirs=1)
    store.save(make_token(tiny.clip, "my-dress", n=2))
    store.save(make_token(tiny.clip, "old-style", n=1, feature=[]))  # no stored concept feature
    return idx, store, concept / "d0"


def test_python_entry_point_w1_is_the_plain_composed_query(tiny, world):
    idx, store, _ = world
    index = IndexStore(idx)
    engine = Engine(index.dir, tokens_dir=store.root, backbone=tiny)
    plain = engine.query("a person wearing a * on a beach", ["my-dress"], k=5)
    expected = search_vectors(
        index, composed_feature(tiny.clip, engine.plan("a person wearing a * on a beach", ["my-dress"]))[None], 5
    )[0]
    assert [h.id for h in plain.hits] == [h.id for h in expected] and plain.gair is None
    one = engine.query(
        "a person wearing a * on a beach", ["my-dress"], k=5, gair=True, gair_config=GairConfig(weights=(1.0,), steps=2)
    )
    assert [h.id for h in one.hits] == [h.id for h in plain.hits]
    np.testing.assert_allclose([h.score for h in one.hits], [h.score for h in plain.hits], atol=1e-5)
    zero = engine.query(
        "a person wearing a * on a beach", ["my-dress"], k=5, gair=True, gair_config=GairConfig(weights=(0.0,), steps=2)
    )
    ctx = context_features(
        tiny.clip, engine.plan("a person wearing a * on a beach", ["my-dress"]), PAPER_ATTRIBUTES
    ).mean(0)
    assert [h.id for h in zero.hits] == [h.id for h in search_vectors(index, mix(ctx, ctx, 0.0)[None], 5)[0]]
    with pytest.raises(QueryError, match="`concept_images=DIR`"):
        engine.query("a * on a beach", ["old-style"], gair=True, gair_config=GairConfig(weights=(0.0, 1.0), steps=1))


def test_engine_passes_on_image_through(tiny, world):
    idx, store, _ = world
    engine = Engine(idx, tokens_dir=store.root, backbone=tiny)
    seen: list[tuple[int, int]] = []
    result = engine.query(
        "a * on a beach",
        ["my-dress"],
        k=2,
        gair=True,
        gair_config=GairConfig(weights=(0.0, 1.0), steps=1),
        on_image=lambda done, total: seen.append((done, total)),
    )
    assert seen[0] == (0, 3) and seen[-1] == (3, 3) and result.gair is not None
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_cli_query_with_token_gair_json_and_report(world, tmp_path):
    idx, store, concept = world
    base = ["--index-dir", str(idx), "--tokens-dir", str(store.root), "--device", "cpu", "--no-progress"]
    r = runner.invoke(app, ["query", "a person wearing a * on a beach", "--token", "my-dress", "--k", "3", *base])
    assert r.exit_code == 0, r.output
    assert "encoded as: a person wearing a <my-dress> dress on a beach" in r.output
    assert len([line for line in r.output.splitlines() if not line.startswith("#")]) == 3

    report = tmp_path / "r.html"
    r = runner.invoke(
        app,
        [
            "query",
            "a person <i class=x> wearing a * on a beach",
            "--token",
            "my-dress",
            "--gair",
            "--weights",
            "0,0.5,1",
            "--steps",
            "2",
            "--attributes",
            "red,old",
            "--json",
            "--report",
            str(report),
            *base,
        ],
    )
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout.splitlines()[0])
    assert obj["gair"]["w"] in (0.0, 0.5, 1.0) and list(obj["gair"]["scores"]) == ["0", "0.5", "1"]
    assert obj["attributes"] == ["red", "old"] and len(obj["results"]) == 10
    page = report.read_text()
    assert "<i class=x>" not in page and "&lt;i class=x&gt;" in page
    assert page.count("class=chosen") == 1 and "w = 0.5" in page and "Context images" in page
    assert page.count("data:image/jpeg;base64,") >= 3 + 1 + 10  # generated, context, results

    r = runner.invoke(
        app,
        [
            "query",
            "a * on a beach",
            "--token",
            "old-style",
            "--gair",
            "--steps",
            "1",
            "--weights",
            "0,1",
            "--concept-images",
            str(concept),
            "--k",
            "2",
            *base,
        ],
    )
    assert r.exit_code == 0, r.output
    assert "GAIR w* = " in r.output and "<- w*" in r.output

    long = "a person wearing a * " + "standing very still " * 30
    r = runner.invoke(app, ["query", long, "--token", "my-dress", "--k", "1", *base])
    assert r.exit_code == 0 and "truncated" in r.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["a person wearing a * dress"], "no token was given"),
        (["a person wearing a dress", "--token", "my-dress"], "does not use it"),
        (["a * on a beach", "--token", "nobody"], "no token named 'nobody'"),
        (["a <my-dress> on a beach"], "add --token my-dress"),
        (["a * on a beach", "--token", "my-dress", "--gair", "--weights", "0,2"], "in [0, 1]"),
    ],
)
def test_cli_query_errors_are_messages(world, args, message):
    idx, store, _ = world
    r = runner.invoke(
        app, ["query", *args, "--index-dir", str(idx), "--tokens-dir", str(store.root), "--device", "cpu"]
    )
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_cli_refuses_a_token_made_for_another_model(world, tiny):
    idx, store, _ = world
    store.save(make_token(tiny.clip, "elsewhere", model="ViT-B-32/openai"))
    r = runner.invoke(
        app,
        ["query", "a * on a beach", "--token", "elsewhere", "--index-dir", str(idx), "--tokens-dir", str(store.root)],
    )
    assert r.exit_code == 2 and "ViT-B-32/openai" in r.output and "tiny-random" in r.output


def test_gair_speed_benchmark_runs_on_tiny_models(capsys):
    from benchmarks import gair_speed

    rows = gair_speed.main(["--model", "tiny-random", "--weights", "1", "3", "--steps", "1", "--repeats", "1"])
    assert [r["W"] for r in rows] == [1, 3] and all(r["batched_s"] > 0 and r["one_at_a_time_s"] > 0 for r in rows)
    assert "| 3 |" in capsys.readouterr().out
