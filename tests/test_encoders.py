"""CLIP loading (one factory, real loading path) and the encoder's text side for custom tokens."""

import numpy as np
import pytest
import torch

from retrieval.models.clip import TINY_MODEL_CFG, ModelLoadError, load_clip, parse_spec, save_model_folder
from retrieval.models.encoders import ClipEncoder


def test_parse_spec_forms(tmp_path):
    assert parse_spec("ViT-L-14-quickgelu/openai") == ("open_clip", "ViT-L-14-quickgelu", "openai")
    assert parse_spec("ViT-B-32//abs/ckpt.pt") == ("open_clip", "ViT-B-32", "/abs/ckpt.pt")
    assert parse_spec("hf-hub:org/repo") == ("hf-hub", "hf-hub:org/repo", None)
    assert parse_spec("tiny-random") == ("preset", "tiny-random", None)
    assert parse_spec(str(tmp_path)) == ("local-dir", str(tmp_path), None)
    assert parse_spec(f"local-dir:{tmp_path}") == ("local-dir", str(tmp_path), None)
    with pytest.raises(ModelLoadError):
        parse_spec("  ")


def test_tiny_random_is_seeded():
    a, b = load_clip("tiny-random"), load_clip("tiny-random")
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_local_folder_round_trip(tmp_path, tiny_encoder):
    """A model saved to a folder loads through the same path a downloaded model takes (open_clip local-dir)."""
    folder = save_model_folder(tiny_encoder.model, TINY_MODEL_CFG, tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["open_clip_config.json", "open_clip_model.safetensors"]
    loaded = ClipEncoder.from_spec(str(folder), device="cpu")
    texts = ["a red dress", "a photo of a teapot"]
    np.testing.assert_array_equal(loaded.encode_texts(texts), tiny_encoder.encode_texts(texts))
    pix = torch.rand(2, 3, 32, 32)
    np.testing.assert_allclose(loaded.encode_images(pix), tiny_encoder.encode_images(pix), atol=1e-6)


def test_checkpoint_file_spec(tmp_path, tiny_arch):
    """NAME/PATH: an open_clip architecture plus a local checkpoint file."""
    import open_clip
    from safetensors.torch import save_file

    model = open_clip.create_model(tiny_arch)  # random weights; only the file path matters here
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    loaded = load_clip(f"{tiny_arch}/{tmp_path / 'w.safetensors'}")
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "spec, words",
    [
        ("ViT-L-14-quickgelu/openai", ["offline", "HF_HUB_OFFLINE", "/path/to/folder"]),
        ("No-Such-Arch/openai", ["unknown open_clip architecture"]),
        ("ViT-B-32", ["names no weights", "ViT-B-32/openai"]),
        ("ViT-B-32/not-a-tag", ["not a known tag"]),
    ],
)
def test_unavailable_weights_give_a_clear_error(spec, words, tmp_path):
    with pytest.raises(ModelLoadError) as e:
        load_clip(spec)
    for w in words:
        assert w in str(e.value)


def test_folder_without_weights_is_refused(tmp_path):
    (tmp_path / "open_clip_config.json").write_text('{"model_cfg": {}}')
    with pytest.raises(ModelLoadError, match="no weights"):
        load_clip(str(tmp_path))
    with pytest.raises(ModelLoadError, match="no open_clip_config.json"):
        load_clip(str(tmp_path / ".."))


def test_outputs_are_unit_float32(tiny_encoder):
    t = tiny_encoder.encode_texts(["a dress", "a skirt", "trousers"])
    i = tiny_encoder.encode_images(torch.rand(5, 3, 32, 32))
    for x, n in ((t, 3), (i, 5)):
        assert x.dtype == np.float32 and x.shape == (n, tiny_encoder.dim)
        np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_plain_texts_match_open_clip(tiny_encoder):
    texts = ["a photo of a dress", "a person wearing a red striped skirt in front of a brick wall"]
    m = tiny_encoder.model
    ref = torch.nn.functional.normalize(m.encode_text(tiny_encoder.tokenizer(texts)), dim=-1).numpy()
    np.testing.assert_allclose(tiny_encoder.encode_texts(texts), ref, atol=1e-6)


def test_placeholder_with_a_words_embedding_equals_the_word(tiny_encoder):
    (dress,) = tiny_encoder.tokenizer.encode("dress")
    vec = {"*": tiny_encoder.token_embedding.weight[[dress]].clone()}
    a = tiny_encoder.encode_texts(["a person wearing a * on a beach"], vec)
    b = tiny_encoder.encode_texts(["a person wearing a dress on a beach"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_multi_vector_placeholder_expands_positions(tiny_encoder):
    """A 3-vector token takes 3 positions: equal to the 3-word phrase whose embeddings it carries."""
    ids = tiny_encoder.tokenizer.encode("red tea kettle")
    vec = {"<k>": tiny_encoder.token_embedding.weight[ids].clone()}
    toks = tiny_encoder.tokenize(["a photo of a <k>"], {"<k>": 3})
    assert [s[1] for s in toks.slots] == [5, 6, 7] and int(toks.eot[0]) == 8
    a = tiny_encoder.encode_texts(["a photo of a <k>"], vec)
    b = tiny_encoder.encode_texts(["a photo of a red tea kettle"])
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_pooling_uses_true_end_of_text_not_argmax(tiny_encoder):
    """A placeholder vector must not move the pooling position, whatever id fills its slot."""
    toks = tiny_encoder.tokenize(["a * b"], {"*": 1})
    assert int(toks.ids[0].argmax()) == int(toks.eot[0])
    # a filler id above the eot id would fool argmax pooling; ours reads toks.eot
    toks.ids[0, toks.slots[0][1]] = 49407
    emb = tiny_encoder.input_embeddings(toks, {"*": torch.zeros(1, tiny_encoder.width)})
    h, f = tiny_encoder.text_transformer(emb, toks.eot)
    assert h.shape == (1, 77, tiny_encoder.width)
    ref = tiny_encoder.model.ln_final(h)  # noqa: F841 (shape only)
    np.testing.assert_allclose(
        f.detach().numpy(),
        (h[0, int(toks.eot[0])] @ tiny_encoder.model.text_projection).detach().numpy()[None],
        atol=1e-6,
    )


def test_hidden_states_padding_convention(tiny_encoder):
    """Positions up to end-of-text are independent of the pad id (causal mask); padding positions are not."""
    h0 = tiny_encoder.text_hidden_states(["a red dress"], pad_id=0)
    h1 = tiny_encoder.text_hidden_states(["a red dress"], pad_id=49407)
    eot = int(tiny_encoder.tokenize(["a red dress"]).eot[0])
    torch.testing.assert_close(h0[:, : eot + 1], h1[:, : eot + 1])
    assert not torch.allclose(h0[:, eot + 1 :], h1[:, eot + 1 :])


def test_gradient_reaches_only_the_placeholder(tiny_encoder):
    v = torch.randn(2, tiny_encoder.width, requires_grad=True)
    _, feats, _ = tiny_encoder.text_features(["a photo of a *"], {"*": v})
    feats.sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert tiny_encoder.token_embedding.weight.grad is None


def test_truncation_warns_and_keeps_end_of_text(tiny_encoder):
    long = " ".join(["red"] * 100)
    with pytest.warns(UserWarning, match="truncated"):
        toks = tiny_encoder.tokenize([long])
    assert toks.truncated == [True] and int(toks.eot[0]) == 76 and int(toks.ids[0, 76]) == 49407


def test_wrong_vector_shape_is_refused(tiny_encoder):
    with pytest.raises(ValueError, match=r"\(n, 32\)"):
        tiny_encoder.encode_texts(["a *"], {"*": torch.zeros(1, 7)})


def test_auto_device_and_precision_on_cpu():
    from retrieval.models.encoders import resolve_device, resolve_precision

    dev = resolve_device("auto")
    assert dev.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
