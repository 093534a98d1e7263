"""Custom tokens on tiny models (tiny-random CLIP + tiny-random diffusion, CPU): each method's loss, the subspace
and basis constraints, frozen models, the token file (and diffusers' loader), initialisations, batched training,
bad inputs, and the CLI end to end.

Losses are compared on FIXED draws (`evaluate_losses`) before and after a few steps at a raised learning rate:
training's own draws (images, prompts, noise, timesteps) are new every step, so its logged loss is noisy.
"""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from cli import app
from retrieval.io.images import read_image_folder
from retrieval.models.diffusion import load_diffusion
from retrieval.models.pairing import paired_diffusion
from tokens.attributes import ATTRIBUTES
from tokens.initialization import auto_caption
from tokens.methods import (
    METHODS,
    balanced_bce,
    fill_prompt,
    nearest_vocabulary_basis,
    pca_basis,
    project_to_subspace,
    scaled_size,
    subspace_residual,
    token_train_config,
)
from tokens.store import TokenExistsError, TokenNotFoundError, TokenStore
from tokens.token_file import (
    CustomToken,
    TokenFileError,
    TokenInfo,
    TokenModelMismatch,
    load_token_file,
    read_token_info,
    save_token_file,
)
from tokens.trainer import (
    StepReport,
    TrainingCancelled,
    evaluate_losses,
    prepare_concept,
    to_custom_token,
    train_tokens,
)

runner = CliRunner()
WIDTH = 32  # tiny-random's text width


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(rgb, n, seed=0, size=32):
    """N noisy images around one colour, with a square of another colour: a 'concept'."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = np.clip(np.array(rgb) + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8)
        a[8:16, 10:20] = (240, 240, 40)
        out.append(Image.fromarray(a))
    return out


RED, BLUE, GREY = blobs((200, 30, 30), 4, 1), blobs((30, 40, 200), 5, 2), blobs((120, 120, 120), 4, 3)


def config(method, **kw):
    base = dict(steps=6, n_vectors=2, lr=2e-2, batch_size=2)
    return token_train_config(method, **{**base, **kw})


def prepared(tiny, method, images=RED, name="red", seed=0, **kw):
    cfg = config(method, **kw)
    return cfg, prepare_concept(name, "dress", images, tiny.clip, tiny, cfg, negatives=GREY, seed=seed)


def weighted(cfg, l_sd, l_ce):
    return cfg.lambda_sd * l_sd + cfg.lambda_ce * l_ce


# ----- each method learns
@pytest.mark.parametrize("method", METHODS)
def test_each_methods_loss_falls(tiny, method):
    # ours at the paper's lambda_CE = 1e-5 is l_SD in practice: raise it so both terms are seen to move
    cfg, concept = prepared(tiny, method, steps=10, **({"lambda_ce": 1.0} if method == "ours" else {}))
    before = evaluate_losses({concept.placeholder: at_start(concept, tiny, cfg)}, [concept], tiny.clip, tiny, cfg)
    trained = train_tokens([concept], tiny.clip, tiny, cfg, progress=False)[0]
    after = evaluate_losses({concept.placeholder: trained.vectors}, [concept], tiny.clip, tiny, cfg)
    assert weighted(cfg, *after) < weighted(cfg, *before), (method, before, after)
    assert trained.summary["steps"] == 10 and not trained.summary["stopped_early"]
    assert len(trained.history) >= 1 and trained.history[0]["step"] == 0


def at_start(concept, tiny, cfg):
    """The effective vectors after 0 steps (for ours the projection of the init, else the init)."""
    return train_tokens([concept], tiny.clip, tiny, replace(cfg, steps=0), progress=False)[0].vectors


# ----- ours: the attribute subspace
def test_projected_token_stays_in_its_subspace(tiny):
    cfg, concept = prepared(tiny, "ours", steps=5)
    k = scaled_size(100, WIDTH)  # 100 of 768 scaled to width 32
    assert len(concept.subspace.words) == k == 4 and set(concept.subspace.words) <= set(ATTRIBUTES)
    assert concept.subspace.basis.shape == (WIDTH, k - 1)  # K centred points span K - 1 directions
    trained = train_tokens([concept], tiny.clip, tiny, cfg, progress=False)[0]
    assert not torch.allclose(trained.vectors, at_start(concept, tiny, cfg))  # it moved ...
    assert subspace_residual(trained.vectors, concept.subspace.basis, concept.subspace.mean) < 1e-5  # ... inside
    assert (
        subspace_residual(concept.init.vectors, concept.subspace.basis, concept.subspace.mean) > 1e-2
    )  # the raw init is not
    assert trained.constraint["kind"] == "attribute-pca" and trained.constraint["dim"] == k - 1


def test_project_to_subspace_is_an_affine_projector():
    torch.manual_seed(0)
    points = torch.randn(6, 16)
    basis, mean = pca_basis(points)
    assert basis.shape == (16, 5)
    torch.testing.assert_close(basis.T @ basis, torch.eye(5), atol=1e-5, rtol=0)
    e = torch.randn(3, 16)
    p = project_to_subspace(e, basis, mean)
    torch.testing.assert_close(project_to_subspace(p, basis, mean), p, atol=1e-5, rtol=0)  # idempotent
    torch.testing.assert_close(project_to_subspace(points, basis, mean), points, atol=1e-5, rtol=0)  # fixes the points
    assert subspace_residual(p, basis, mean) < 1e-5 < subspace_residual(e, basis, mean)


# ----- batex: the vocabulary basis
def test_batex_basis_size_rank_and_one_hot_start(tiny):
    cfg, concept = prepared(tiny, "batex")
    m = scaled_size(576, WIDTH)
    assert m == 24
    bases = concept.basis.bases
    assert bases.shape == (1, m, WIDTH)  # a parent-initialised token: one basis shared by its vectors
    assert int(torch.linalg.matrix_rank(bases[0].double())) == m
    table = tiny.clip.token_embedding.weight.detach()
    torch.testing.assert_close(bases[0, 0], table[2595], atol=0, rtol=0)  # row 0: "dress" itself
    torch.testing.assert_close(at_start(concept, tiny, cfg), table[[2595, 2595]], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="must be in"):
        nearest_vocabulary_basis(table, table[2595], WIDTH + 1)
    collinear = torch.cat([table[2595][None] * s for s in torch.linspace(1.0, 2.0, 50)])  # rank-1 vocabulary
    with pytest.raises(ValueError, match="rank"):
        nearest_vocabulary_basis(collinear, collinear[0] * 1.5 + 1e-3, 4)


# ----- frozen models
def test_only_the_tokens_vectors_change(tiny):
    clip_before = {k: v.clone() for k, v in tiny.clip.model.state_dict().items()}
    unet_before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    flags = [p.requires_grad for p in tiny.unet.parameters()]
    cfg, concept = prepared(tiny, "ours", steps=3, lambda_ce=1.0)
    trained = train_tokens([concept], tiny.clip, tiny, cfg, progress=False)[0]
    assert not torch.equal(trained.vectors, at_start(concept, tiny, cfg))
    for k, v in tiny.clip.model.state_dict().items():
        assert torch.equal(v, clip_before[k]), k  # token_embedding.weight included: the table is never modified
    for k, v in tiny.unet.state_dict().items():
        assert torch.equal(v, unet_before[k]), k
    assert [p.requires_grad for p in tiny.unet.parameters()] == flags  # restored after training
    assert all(p.grad is None for p in tiny.unet.parameters()) and all(
        p.grad is None for p in tiny.clip.model.parameters()
    )


def test_per_row_diffusion_loss_equals_the_backbones(tiny):
    latents = tiny.encode_images(torch.rand(3, 3, 32, 32) * 2 - 1)
    cond = tiny.conditioning(["a red dress", "a coat", "a skirt"])
    g = torch.Generator().manual_seed(7)  # drawn as training_loss draws them: noise, then timesteps
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, tiny.scheduler.config.num_train_timesteps, (3,), generator=g)
    rows = tiny.training_loss(latents, cond, noise=noise, timesteps=t, reduction="none")
    assert rows.shape == (3,) and len(set(rows.tolist())) == 3
    torch.testing.assert_close(
        rows.mean(), tiny.training_loss(latents, cond, torch.Generator().manual_seed(7)), atol=1e-6, rtol=1e-6
    )
    with pytest.raises(ValueError, match="reduction"):
        tiny.training_loss(latents, cond, noise=noise, timesteps=t, reduction="sum")


# ----- initialisation
def test_caption_initialisation_one_vector_per_caption_token(tiny):
    caption = "a red tea kettle with gold leaf"
    ids = tiny.clip.tokenizer.encode(caption)
    table = tiny.clip.token_embedding.weight.detach()
    for method in ("ti", "batex"):
        cfg, concept = prepared(tiny, method, n_vectors=10, init_caption=caption)
        assert concept.n_vectors == len(ids) == 7
        assert concept.init.words == ("a", "red", "tea", "kettle", "with", "gold", "leaf")
        torch.testing.assert_close(at_start(concept, tiny, cfg), table[ids], atol=1e-6, rtol=0)
    assert concept.basis.bases.shape[0] == 7  # batex: one basis per distinct initial vector


def test_auto_caption_and_multi_token_parent(tiny):
    cfg, concept = prepared(tiny, "ti", init_caption="auto")
    # the 3 best attributes (one vector per BPE token: 'two-tone' is three), and not the parent
    assert concept.init.kind == "auto" and concept.n_vectors == len(concept.init.words) >= 3
    assert "dress" not in concept.init.words and "dress" not in concept.init.text
    # the templates put the parent after the token: with the caption in its place, the parent is named once
    for template in (cfg.class_template, *cfg.sd_templates):
        assert fill_prompt(template, concept.init.text, "dress").split().count("dress") == 1, template
    # an attribute sharing a word with the parent is never part of the caption
    feats = tiny.clip.encode_pil(RED)
    picked = auto_caption(
        tiny.clip, torch.from_numpy(feats), "vest dress", ["vest", "dress", "red"], 3, cfg.class_template
    )
    assert picked == "red"
    with pytest.raises(ValueError, match="shares a word with the parent"):
        auto_caption(tiny.clip, torch.from_numpy(feats), "vest dress", ["vest", "Dress"], 3, cfg.class_template)
    cfg = config("ti")
    concept = prepare_concept("vd", "vest  dress", RED, tiny.clip, tiny, cfg, seed=0)
    table = tiny.clip.token_embedding.weight.detach()
    assert concept.parent == "vest dress" and concept.init.words == ("vest", "dress")
    torch.testing.assert_close(concept.init.vectors, table[[12473, 2595]].mean(0).expand(2, -1), atol=1e-6, rtol=0)


# ----- batched training
def test_batched_training_equals_separate_training(tiny):
    cfg = config("ours", steps=4, lambda_ce=1.0)
    a = prepare_concept("a", "dress", RED, tiny.clip, tiny, cfg, negatives=GREY, seed=11)
    b = prepare_concept(
        "b", "coat", BLUE, tiny.clip, tiny, replace(cfg, init_caption="a blue coat"), negatives=GREY, seed=22
    )
    assert a.n_vectors == 2 and b.n_vectors == 3  # different lengths: zero-padded in the stacked parameter
    together = train_tokens([a, b], tiny.clip, tiny, cfg, progress=False)
    alone = [train_tokens([c], tiny.clip, tiny, cfg, progress=False)[0] for c in (a, b)]
    chunked = train_tokens([a, b], tiny.clip, tiny, replace(cfg, concepts_per_forward=1), progress=False)
    for t, s in zip(together, alone):
        assert t.vectors.shape == s.vectors.shape
        torch.testing.assert_close(t.vectors, s.vectors, atol=1e-5, rtol=1e-5)
        assert t.summary["concepts_in_batch"] == 2 and s.summary["concepts_in_batch"] == 1
    for t, k in zip(together, chunked):  # concepts in chunks, gradients accumulated: the same
        torch.testing.assert_close(t.vectors, k.vectors, atol=1e-5, rtol=1e-5)
    a_other_seed = prepare_concept("a", "dress", RED, tiny.clip, tiny, cfg, negatives=GREY, seed=12)
    assert not torch.allclose(
        train_tokens([a_other_seed], tiny.clip, tiny, cfg, progress=False)[0].vectors, alone[0].vectors
    )


# ----- a NaN loss
def test_nan_loss_stops_that_concept_and_keeps_its_last_good_token(tiny, monkeypatch):
    cfg = config("ti", steps=5)
    a = prepare_concept("a", "dress", RED, tiny.clip, tiny, cfg, seed=1)
    b = prepare_concept("b", "dress", BLUE, tiny.clip, tiny, cfg, seed=2)
    clean_a = train_tokens([a], tiny.clip, tiny, cfg, progress=False)[0]
    b_after_one = train_tokens([b], tiny.clip, tiny, config("ti", steps=1), progress=False)[0]
    forward, calls = tiny.unet.forward, {"n": 0}

    def poisoned(sample, *args, **kwargs):  # from the 3rd step on, concept b's rows (the second half) turn NaN
        out = forward(sample, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] >= 3:
            out.sample[sample.shape[0] // 2 :] = float("nan")
        return out

    monkeypatch.setattr(tiny.unet, "forward", poisoned)
    ra, rb = train_tokens([a, b], tiny.clip, tiny, cfg, progress=False)
    assert not ra.summary["stopped_early"] and ra.summary["steps"] == 5
    torch.testing.assert_close(ra.vectors, clean_a.vectors, atol=1e-5, rtol=1e-5)  # a was not disturbed
    assert rb.summary["stopped_early"] and "not finite at step 2" in rb.summary["reason"] and rb.summary["steps"] == 1
    assert torch.isfinite(rb.vectors).all()
    torch.testing.assert_close(rb.vectors, b_after_one.vectors, atol=1e-5, rtol=1e-5)  # the token after 1 update


# ----- the on_step hook: progress and cancel
def test_on_step_sees_every_step_and_changes_nothing(tiny):
    cfg, concept = prepared(tiny, "ours", steps=4, lambda_ce=1.0)
    plain = train_tokens([concept], tiny.clip, tiny, cfg, progress=False)[0]
    reports: list[StepReport] = []
    watched = train_tokens([concept], tiny.clip, tiny, cfg, progress=False, on_step=reports.append)[0]
    assert torch.equal(watched.vectors, plain.vectors)  # the hook only observes: bit-identical
    assert [r.step for r in reports] == [1, 2, 3, 4] and {r.steps for r in reports} == {4}
    assert all(np.isfinite([r.l_sd, r.l_ce, r.loss]).all() for r in reports)
    assert [r.seconds for r in reports] == sorted(r.seconds for r in reports) and reports[0].seconds > 0
    last = reports[-1]  # the summary's last losses are the last step's
    assert (last.l_sd, last.l_ce, last.loss) == (
        plain.summary["last_l_sd"],
        plain.summary["last_l_ce"],
        plain.summary["last_loss"],
    )
    assert last.loss == pytest.approx(weighted(cfg, last.l_sd, last.l_ce), rel=1e-6)


@pytest.mark.parametrize("method", ["ours", "batex", "ti"])
def test_on_step_snapshot_is_the_token_of_a_shorter_training(tiny, method):
    # a snapshot at step k of a 5-step run is what a k-step run returns (constant lr, per-step draws): one run
    # gives a whole convergence curve (benchmarks/token_quality.py)
    cfg, concept = prepared(tiny, method, steps=5, lambda_ce=1.0 if method == "ours" else 0.0)
    snapshots = {}
    train_tokens(
        [concept], tiny.clip, tiny, cfg, progress=False, on_step=lambda r: snapshots.update({r.step: r.vectors()})
    )
    for k in (2, 5):
        short = train_tokens([concept], tiny.clip, tiny, replace(cfg, steps=k), progress=False)[0]
        assert snapshots[k].shape == (1, concept.n_vectors, WIDTH)
        torch.testing.assert_close(snapshots[k][0], short.vectors, atol=1e-6, rtol=0)
    assert not torch.allclose(snapshots[2], snapshots[5])  # the steps between moved it


def test_subspace_rank_caps_the_pca_basis(tiny):
    torch.manual_seed(0)
    points = torch.randn(6, 16)
    full, mean = pca_basis(points)
    top2, mean2 = pca_basis(points, rank=2)
    assert top2.shape == (16, 2) and torch.equal(mean, mean2)
    torch.testing.assert_close(top2, full[:, :2])  # the two directions of largest variance
    assert pca_basis(points, rank=50)[0].shape == (16, 5)  # a cap above the rank changes nothing
    with pytest.raises(ValueError, match="rank must be >= 0"):
        pca_basis(points, rank=-1)
    cfg, concept = prepared(tiny, "ours", steps=3, subspace_rank=1)
    assert concept.subspace.basis.shape == (WIDTH, 1)
    trained = train_tokens([concept], tiny.clip, tiny, cfg, progress=False)[0]
    assert subspace_residual(trained.vectors, concept.subspace.basis, concept.subspace.mean) < 1e-5
    assert trained.constraint["dim"] == 1
    with pytest.raises(ValueError, match="subspace_rank"):
        token_train_config("ours", subspace_rank=-1)


def test_on_step_returning_false_cancels_and_writes_no_token(tiny, tmp_path):

    from tokens.learn import LearnRequest, learn_token

    request = LearnRequest(
        name="stopped",
        images=write_images(tmp_path / "imgs", RED),
        parent="dress",
        method="ti",
        steps=50,
        n_vectors=2,
        model="tiny-random",
        tokens_dir=tmp_path / "store",
        device="cpu",
    )
    seen: list[int] = []
    grads = [p.requires_grad for p in tiny.unet.parameters()]

    def stop_at_two(report: StepReport) -> bool:
        seen.append(report.step)
        return report.step < 2

    with pytest.raises(TrainingCancelled, match="after step 2 of 50") as e:
        learn_token(request, progress=False, models=(tiny.clip, tiny), on_step=stop_at_two)
    assert (e.value.step, e.value.steps) == (2, 50) and seen == [1, 2]  # stopped at that very step
    store = TokenStore(tmp_path / "store")
    assert not store.exists("stopped") and store.names() == []
    assert not list((tmp_path / "store").glob("*.safetensors"))  # no token file at all
    assert [p.requires_grad for p in tiny.unet.parameters()] == grads  # unfrozen again on the way out
    kept = learn_token(replace(request, steps=2), progress=False, models=(tiny.clip, tiny), on_step=lambda r: True)
    assert kept.path.is_file() and kept.token.info.training["steps"] == 2  # True (or None) goes on


# ----- the token file and the store
def make_token(name="tok", model="tiny-random", n=3, width=WIDTH, seed=0):
    torch.manual_seed(seed)
    info = TokenInfo(
        name=name,
        model=model,
        width=width,
        n_vectors=n,
        parent="dress",
        method="ours",
        diffusion="tiny-random",
        config={"lr": 5e-4, "templates": ["a {token}"]},
        subspace={"kind": "attribute-pca", "words": ["red", "striped"]},
        init={"kind": "parent"},
        training={"steps": 3, "last_loss": 0.5},
        created="2025-01-01T00:00:00+00:00",
    )
    return CustomToken(torch.randn(n, width), info)


def test_a_token_of_a_model_folder_retrained_in_place_is_refused(tmp_path):
    """The SPEC names a folder; its weights file changes (retrained, replaced): the token's vectors belong to the
    old weights, and loading it against the new ones is refused. Tokens from before the field load unchecked."""
    from retrieval.models.clip import weights_id

    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text("{}")
    (folder / "open_clip_model.safetensors").write_bytes(b"weights v1")
    spec = str(folder)
    first = weights_id(spec)
    assert len(first) == 16 and weights_id(spec) == first  # only the file is read, nothing loads
    assert weights_id("tiny-random") == "" and weights_id("ViT-B-32/openai") == ""  # the name pins the weights
    assert weights_id(str(tmp_path / "no-such-folder")) == ""
    token = make_token(model=spec)
    token = CustomToken(token.vectors, replace(token.info, model_weights=first))
    path = save_token_file(tmp_path / "tok.safetensors", token)
    assert load_token_file(path, model=spec, width=WIDTH).info.model_weights == first
    (folder / "open_clip_model.safetensors").write_bytes(b"weights v2, retrained")
    assert weights_id(spec) not in ("", first)
    with pytest.raises(TokenModelMismatch, match="other weights of `model=.*learn the token again"):
        load_token_file(path, model=spec, width=WIDTH)
    old = save_token_file(tmp_path / "old.safetensors", make_token(name="old", model=spec))  # no model_weights
    assert load_token_file(old, model=spec, width=WIDTH).info.model_weights == ""


def test_token_file_round_trip(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    token = make_token()
    path = save_token_file(tmp_path / "tok.safetensors", token)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.safetensors"]  # no temporary left
    assert list(load_file(str(path))) == ["<tok>"]  # diffusers' format: exactly one tensor
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["model"] == "tiny-random" and meta["parent"] == "dress" and meta["format_version"] == "1"
    assert json.loads(meta["subspace"])["words"] == ["red", "striped"] and json.loads(meta["config"])["lr"] == 5e-4
    loaded = load_token_file(path, model="tiny-random", width=WIDTH)
    assert torch.equal(loaded.vectors, token.vectors) and loaded.info == token.info
    with pytest.raises(TokenModelMismatch, match="made for `model=tiny-random` .* this run uses `model=toyworld`"):
        load_token_file(path, model="toyworld")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TokenFileError, match="not a readable safetensors"):
        read_token_info(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1, 4)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(TokenFileError, match="not a token file of this project"):
        read_token_info(tmp_path / "plain.safetensors")


def test_store_list_show_delete_and_taken_names(tmp_path):
    store = TokenStore(tmp_path / "store")
    assert store.names() == [] and store.entries() == []
    store.save(make_token("a"))
    store.save(make_token("b", model="toyworld", width=16))
    assert store.names() == ["a", "b"] and [e.info.model for e in store.entries()] == ["tiny-random", "toyworld"]
    with pytest.raises(TokenExistsError, match="already exists .*`overwrite=True`"):
        store.save(make_token("a", seed=1))
    store.save(make_token("a", seed=1), overwrite=True)
    assert torch.equal(store.load("a").vectors, make_token("a", seed=1).vectors)
    with pytest.raises(TokenModelMismatch, match="toyworld.*tiny-random"):
        store.load("b", model="tiny-random")
    with pytest.raises(TokenNotFoundError, match="it has: a, b"):
        store.load("c")
    with pytest.raises(TokenFileError, match="not allowed"):
        store.path("../evil")
    store.delete("a")
    assert store.names() == ["b"]


def test_diffusers_load_textual_inversion_reads_our_file(tmp_path):
    """A tiny StableDiffusionPipeline (text encoder width 32, tokenizer from open_clip's bundled BPE) loads the
    token file, and its prompt embeddings with the token equal ours through the same text tower."""
    import open_clip
    from diffusers import StableDiffusionPipeline

    from retrieval.models.clip import LoadedClip
    from retrieval.models.encoders import ClipEncoder
    from tests.tiny import tiny_sd_clip, tiny_sd_components, tiny_text_model, write_clip_tokenizer

    hf = tiny_text_model()
    model, _ = tiny_sd_clip(hf)  # the open_clip CLIP holding hf's text tower
    clip = ClipEncoder(
        LoadedClip(model, None, open_clip.get_tokenizer("ViT-B-32"), "sd-tiny"), device="cpu", precision="fp32"
    )
    pipe = StableDiffusionPipeline(**tiny_sd_components(hf, write_clip_tokenizer(tmp_path / "tok")))

    token = make_token("tinydress", model="sd-tiny", n=3)
    path = save_token_file(tmp_path / "tinydress.safetensors", token)
    pipe.load_textual_inversion(str(path))
    vocab = pipe.tokenizer.get_vocab()
    assert all(t in vocab for t in ("<tinydress>", "<tinydress>_1", "<tinydress>_2"))
    rows = pipe.text_encoder.get_input_embeddings().weight[
        [vocab["<tinydress>"], vocab["<tinydress>_1"], vocab["<tinydress>_2"]]
    ]
    torch.testing.assert_close(rows, token.vectors, atol=0, rtol=0)
    prompt = "a photo of a <tinydress> dress"
    theirs, _ = pipe.encode_prompt([prompt], torch.device("cpu"), 1, False)
    ours = clip.text_hidden_states([prompt], {"<tinydress>": token.vectors}, pad_id=49407)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_to_custom_token_metadata(tiny, tmp_path):
    cfg, concept = prepared(tiny, "batex", steps=1)
    trained = train_tokens([concept], tiny.clip, tiny, cfg, progress=False)[0]
    token = to_custom_token(trained, cfg, model="tiny-random", diffusion="tiny-random")
    path = TokenStore(tmp_path).save(token)
    info = read_token_info(path)
    assert info.method == "batex" and info.subspace["kind"] == "batex-basis" and info.subspace["m"] == 24
    assert info.init == {"kind": "parent", "text": "dress", "tokens": ["dress"], "n_vectors": 2}
    assert info.config["steps"] == 1 and info.training["steps"] == 1 and info.created


# ----- bad input
def write_images(folder, images, bad=0):
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:02d}.png")
    for j in range(bad):
        (folder / f"bad{j}.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return folder


def test_image_folders_too_few_unreadable_and_missing(tmp_path):
    with pytest.raises(ValueError, match="0 usable images; at least 3 are needed"):
        read_image_folder(write_images(tmp_path / "empty", []), 3)
    with pytest.raises(ValueError, match="2 usable images .*1 unreadable.*at least 3 are needed"):
        read_image_folder(write_images(tmp_path / "few", RED[:2], bad=1), 3)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        got = read_image_folder(write_images(tmp_path / "ok", RED[:3], bad=1), 3)
    assert len(got.images) == 3 and got.skipped[0][0].name == "bad0.jpg"
    with pytest.raises(FileNotFoundError, match="no folder"):
        read_image_folder(tmp_path / "nowhere", 3)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown method"):
        token_train_config("dreambooth")
    with pytest.raises(ValueError, match="must contain"):
        token_train_config("ti", sd_templates=("a photo of a dress",))
    with pytest.raises(ValueError, match="positive and one negative"):
        balanced_bce(torch.zeros(3), torch.ones(3).bool())
    assert paired_diffusion("ViT-L-14-quickgelu/openai") == "sd14" and paired_diffusion("toyworld") == "toyworld"
    assert paired_diffusion("tiny-random") == "tiny-random"
    with pytest.raises(Exception, match="no diffusion model is paired"):
        paired_diffusion("ViT-B-32/openai")


# ----- the CLI end to end
def test_cli_learn_generate_list_show_delete(tmp_path):
    images = write_images(tmp_path / "imgs", RED, bad=1)
    store = tmp_path / "store"
    tiny = ["--model", "tiny-random", "--tokens-dir", str(store), "--device", "cpu"]
    common = [
        "--images",
        str(images),
        "--parent",
        "dress",
        "--steps",
        "2",
        "--n-negatives",
        "2",
        "--negative-steps",
        "2",
        "--no-progress",
        *tiny,
    ]
    learn = ["learn-token", "red", "--vectors", "2", *common]
    r = runner.invoke(app, learn)
    assert r.exit_code == 0, r.output
    assert "learned token 'red'" in r.output and "warning: skipped unreadable image" in r.output
    assert (store / "red.safetensors").is_file() and len(
        list((store / ".negatives").iterdir())
    ) == 1  # negatives cached

    r = runner.invoke(app, learn)  # the name is taken
    assert (
        r.exit_code == 2 and "already exists" in r.output and "--overwrite" in r.output and "Traceback" not in r.output
    )
    r = runner.invoke(app, [*learn, "--overwrite", "--method", "pt", "--init-caption", "a red thing"])
    assert r.exit_code == 2 and "leave out --vectors" in r.output
    learn_pt = ["learn-token", "red", *common, "--overwrite", "--method", "pt", "--init-caption", "a red thing"]
    r = runner.invoke(app, learn_pt)
    assert r.exit_code == 0, r.output
    assert "method pt" in r.output and "init caption: 'a red thing'" in r.output

    r = runner.invoke(app, ["tokens", "list", "--tokens-dir", str(store)])
    assert r.exit_code == 0 and r.output.startswith("red ") and "pt" in r.output and "model=tiny-random" in r.output
    r = runner.invoke(app, ["tokens", "show", "red", "--tokens-dir", str(store)])
    shown = json.loads(r.output)
    assert (
        shown["placeholder"] == "<red>" and shown["n_vectors"] == 3 and shown["init"]["tokens"] == ["a", "red", "thing"]
    )
    feature = np.asarray(shown["concept_feature"])  # kept for GAIR: the normalised mean of the concept images' features
    assert (
        feature.shape == (load_diffusion("tiny-random", device="cpu").clip.dim,)
        and abs(np.linalg.norm(feature) - 1) < 1e-4
    )
    assert shown["concept_images"] == str(images.resolve()) and shown["context_attributes"] == []

    out = tmp_path / "grid.png"
    r = runner.invoke(
        app,
        [
            "generate",
            "a photo of a * dress on a beach",
            "--token",
            "red",
            "--n",
            "2",
            "--steps",
            "2",
            "--out",
            str(out),
            *tiny,
        ],
    )
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (64, 32) and "a photo of a <red> dress on a beach" in r.output

    r = runner.invoke(app, ["tokens", "delete", "red", "--tokens-dir", str(store), "--yes"])
    assert r.exit_code == 0 and not (store / "red.safetensors").exists()


def test_cli_errors_are_messages(tmp_path):
    store = tmp_path / "store"
    TokenStore(store).save(make_token("tok"))
    few = write_images(tmp_path / "few", RED[:2])
    base = ["--model", "tiny-random", "--tokens-dir", str(store), "--device", "cpu", "--no-progress"]
    cases = [
        (["learn-token", "x", "--images", str(few), "--parent", "dress", *base], "at least 3 are needed"),
        (["learn-token", "x", "--images", str(tmp_path / "nope"), "--parent", "dress", *base], "no folder"),
        (["learn-token", "bad/name", "--images", str(few), "--parent", "dress", *base], "not allowed"),
        (["learn-token", "tok", "--images", str(few), "--parent", "dress", *base], "already exists"),
        (
            [
                "learn-token",
                "x",
                "--images",
                str(few),
                "--parent",
                "dress",
                "--method",
                "ti",
                "--negatives",
                str(few),
                *base,
            ],
            "leave it out",
        ),
        (
            ["generate", "a * dress", "--token", "tok", "--model", "toyworld", "--tokens-dir", str(store)],
            "made for --model tiny-random",
        ),
        (["generate", "a * dress", "--token", "nope", "--tokens-dir", str(store)], "no token named 'nope'"),
        (
            ["generate", "a dress", "--token", "tok", "--model", "tiny-random", "--tokens-dir", str(store)],
            "does not use <tok>",
        ),
        (["tokens", "show", "nope", "--tokens-dir", str(store)], "no token named"),
        (["tokens", "delete", "nope", "--tokens-dir", str(store), "--yes"], "no token named"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
        assert "Traceback" not in r.output


@pytest.mark.parametrize("command", ["learn-token", "generate", "tokens"])
def test_token_commands_have_help(command):
    r = runner.invoke(app, [command, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output and len(r.output) > 200


def test_sampled_negatives_are_cached_and_reused(tiny, tmp_path, monkeypatch):
    from tokens.negatives import sampled_negatives

    first = sampled_negatives(tiny, "image of a dress", 2, seed=3, steps=2, guidance=2.0, cache_dir=tmp_path)
    assert len(first.images) == 2 and all(p.is_file() for p in first.paths)
    monkeypatch.setattr(tiny, "generate", lambda *a, **k: pytest.fail("sampled again instead of read from the cache"))
    again = sampled_negatives(tiny, "image of a dress", 2, seed=3, steps=2, guidance=2.0, cache_dir=tmp_path)
    assert [np.asarray(a).tolist() == np.asarray(b).tolist() for a, b in zip(first.images, again.images)] == [
        True,
        True,
    ]


def test_prompt_tuning_with_a_negatives_folder_needs_no_diffusion_model(tmp_path):
    from tokens.learn import LearnRequest, learn_token

    images, negatives = write_images(tmp_path / "imgs", RED), write_images(tmp_path / "neg", GREY)
    request = LearnRequest(
        name="pt1",
        images=images,
        parent="dress",
        method="pt",
        steps=2,
        n_vectors=2,
        negatives=negatives,
        model="tiny-random",
        diffusion="no-such-diffusion-model",
        tokens_dir=tmp_path / "store",
        device="cpu",
    )
    result = learn_token(request, progress=False)  # the bogus --diffusion is never loaded
    assert result.token.info.diffusion == "" and result.token.info.method == "pt"
    assert result.token.info.training["n_negatives"] == 4 and result.path.is_file()
