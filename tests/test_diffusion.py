"""The diffusion backbone: SD 1.x / 2.x text conditioning equals diffusers', the real loading path on a tiny
saved StableDiffusionPipeline, guided sampling, the training loss, saving, and load errors.

Everything is tiny and seeded (diffusers' get_dummy_components style); nothing is downloaded: the CLIP
tokenizer is built from open_clip's bundled BPE vocabulary. The tiny models are in tests/tiny.py, the `tiny`
fixture (the tiny-random backbone) in conftest.py.
"""

import json

import pytest
import torch

from retrieval.models.clip import save_model_folder
from retrieval.models.diffusion import (
    SAMPLERS,
    DiffusionBackbone,
    DiffusionLoadError,
    SpaceToDepthCodec,
    TextConditioning,
    VaeCodec,
    load_diffusion,
    make_sampler,
    save_diffusion_folder,
)
from retrieval.models.encoders import ClipEncoder
from tests.tiny import WIDTH, tiny_diffusion, tiny_sd_clip, tiny_sd_components, tiny_text_model, write_clip_tokenizer

PROMPT = "a photo of a dress"


@pytest.fixture(scope="module")
def sd_world(tmp_path_factory):
    """A tiny SD 1.x pipeline saved to a folder, and the open_clip CLIP (saved and re-loaded) holding the same
    text tower: the situation of ViT-L-14-quickgelu/openai beside CompVis/stable-diffusion-v1-4."""
    from diffusers import StableDiffusionPipeline

    root = tmp_path_factory.mktemp("sd")
    hf = tiny_text_model()
    clip, cfg = tiny_sd_clip(hf)
    encoder = ClipEncoder.from_spec(str(save_model_folder(clip, cfg, root / "clip")), device="cpu", precision="fp32")
    pipe = StableDiffusionPipeline(**tiny_sd_components(hf, write_clip_tokenizer(root / "tok")))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(root / "pipe")
    backbone = load_diffusion(str(root / "pipe"), clip_encoder=encoder, device="cpu")
    return dict(root=root, pipe=pipe, encoder=encoder, backbone=backbone, hf=hf)


# ----- SD text conditioning equals diffusers'
def test_sd1_conditioning_equals_diffusers(sd_world):
    """Our conditioning == StableDiffusionPipeline.encode_prompt: same tokens, eot padding, final layer."""
    backbone, pipe = sd_world["backbone"], sd_world["pipe"]
    # read from the saved tokenizer/ and text_encoder/
    assert backbone.text == TextConditioning(pad_id=49407, skip_last_layers=0)
    ours = backbone.conditioning([PROMPT, ""])
    theirs, _ = pipe.encode_prompt([PROMPT, ""], torch.device("cpu"), 1, False)
    assert ours.shape == theirs.shape == (2, 77, WIDTH)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_padding_with_zero_does_not_match_sd1(sd_world):
    """open_clip's own padding (0) changes every position after end-of-text (the UNet attends to all 77);
    the causal mask keeps the positions up to end-of-text unchanged."""
    encoder, pipe = sd_world["encoder"], sd_world["pipe"]
    theirs, _ = pipe.encode_prompt([PROMPT], torch.device("cpu"), 1, False)
    zero_padded = encoder.text_hidden_states([PROMPT], pad_id=0)
    eot = encoder.tokenize([PROMPT]).eot.item()
    torch.testing.assert_close(zero_padded[:, : eot + 1], theirs[:, : eot + 1], atol=1e-5, rtol=1e-5)
    assert (zero_padded[:, eot + 1 :] - theirs[:, eot + 1 :]).abs().max() > 1e-2


def test_sd2_conditioning_penultimate_layer_and_zero_padding(sd_world, tmp_path):
    """SD 2.x: diffusers' text encoder is the open_clip tower minus its last block, the tokenizer pads with '!'
    (id 0). Loading reads both from the folder and our conditioning matches."""
    from diffusers import StableDiffusionPipeline

    hf1 = tiny_text_model(layers=1)
    t1, t = getattr(hf1, "text_model", hf1), getattr(sd_world["hf"], "text_model", sd_world["hf"])
    t1.embeddings.load_state_dict(t.embeddings.state_dict())
    t1.encoder.layers[0].load_state_dict(t.encoder.layers[0].state_dict())
    t1.final_layer_norm.load_state_dict(t.final_layer_norm.state_dict())
    pipe = StableDiffusionPipeline(**tiny_sd_components(hf1, write_clip_tokenizer(tmp_path / "tok", pad_token="!")))
    pipe.save_pretrained(tmp_path / "pipe")
    backbone = load_diffusion(str(tmp_path / "pipe"), clip_encoder=sd_world["encoder"], device="cpu")
    assert backbone.text == TextConditioning(pad_id=0, skip_last_layers=1)
    theirs, _ = pipe.encode_prompt([PROMPT], torch.device("cpu"), 1, False)
    torch.testing.assert_close(backbone.conditioning([PROMPT]), theirs, atol=1e-5, rtol=1e-5)


def test_sample_equals_stable_diffusion_pipeline(sd_world):
    """The whole guided DDIM loop + VAE decode == diffusers' pipeline given the same embeddings and noise."""
    backbone, pipe = sd_world["backbone"], sd_world["pipe"]
    cond, uncond = backbone.conditioning([PROMPT]), backbone.conditioning([""])
    ours = backbone.sample(cond, uncond, guidance_scale=5.0, steps=3, seed=7)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    theirs = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=noise,
        guidance_scale=5.0,
        num_inference_steps=3,
        output_type="pt",
    ).images
    assert ours.shape == theirs.shape == (1, 3, 16, 16)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_cross_attention_width_must_match_the_clip(tiny):
    import open_clip

    from retrieval.models.clip import LoadedClip

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
    }
    loaded = LoadedClip(open_clip.model.CLIP(**cfg), None, open_clip.get_tokenizer("ViT-B-32"), "width-16")
    with pytest.raises(DiffusionLoadError, match="cross_attention_dim=32 but the CLIP text width is 16"):
        DiffusionBackbone(
            tiny.unet, tiny.scheduler, tiny.codec, ClipEncoder(loaded, device="cpu", precision="fp32"), device="cpu"
        )


# ----- sampling
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_batched_sampling_equals_per_image(sampler):
    """Row i's image depends on its seed only, also for stochastic samplers (DDPM, Euler ancestral: noise every step)."""
    tiny = tiny_diffusion()  # its own: the test sets its sampler
    tiny.sample_scheduler = make_sampler(sampler, tiny.scheduler.config)
    cond = tiny.conditioning(["a red dress", "a blue skirt on a beach", "a photo of a coat"])
    uncond = tiny.conditioning([""])
    batched = tiny.sample(cond, uncond, guidance_scale=4.0, steps=3, seed=5)
    assert batched.shape == (3, 3, 32, 32) and 0 <= batched.min() and batched.max() <= 1
    for i in range(3):
        single = tiny.sample(cond[i : i + 1], uncond, guidance_scale=4.0, steps=3, seed=5 + i)
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched, tiny.sample(cond, uncond, guidance_scale=4.0, steps=3, seed=5))  # reproducible
    assert not torch.allclose(batched, tiny.sample(cond, uncond, guidance_scale=4.0, steps=3, seed=6))


def test_the_sampling_setting_picks_the_sampler_and_is_saved(tmp_path):
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler

    tiny = tiny_diffusion()  # its own: the test sets its sampler
    assert isinstance(tiny.sample_scheduler, DDIMScheduler) and tiny.sampling["sampler"] == "ddim"
    euler = DiffusionBackbone(
        tiny.unet,
        tiny.scheduler,
        tiny.codec,
        tiny.clip,
        tiny.text,
        device="cpu",
        sampling={"sampler": "euler-a", "steps": 7},
    )
    assert isinstance(euler.sample_scheduler, EulerAncestralDiscreteScheduler)
    assert euler.sample_scheduler.config.prediction_type == tiny.scheduler.config.prediction_type
    assert euler.sampling == {"sampler": "euler-a", "steps": 7, "guidance_scale": 7.5}
    reloaded = load_diffusion(str(save_diffusion_folder(euler, tmp_path / "euler")), device="cpu")
    assert reloaded.sampling == euler.sampling
    assert isinstance(reloaded.sample_scheduler, EulerAncestralDiscreteScheduler)
    with pytest.raises(ValueError, match="unknown sampler 'plms'"):
        make_sampler("plms", tiny.scheduler.config)


def test_guidance_scale_one_is_the_conditional_prediction(tiny):
    cond, uncond = tiny.conditioning(["a red dress"]), tiny.conditioning([""])
    conditional_only = tiny.sample(cond, None, guidance_scale=1.0, steps=3)
    assert torch.equal(conditional_only, tiny.sample(cond, uncond, guidance_scale=1.0, steps=3))
    # CFG with uncond == cond is eps_u + g (eps_c - eps_u) = eps_c: the batched [uncond; cond] path agrees
    torch.testing.assert_close(
        tiny.sample(cond, cond, guidance_scale=7.5, steps=3), conditional_only, atol=1e-5, rtol=1e-5
    )
    with pytest.raises(ValueError, match="uncond"):
        tiny.sample(cond, None, guidance_scale=3.0)


def test_generate_returns_pil_images(tiny):
    images = tiny.generate(["a red dress", "a coat"], n=2, steps=2, guidance_scale=3.0, batch_size=3)
    assert len(images) == 4 and images[0].size == (32, 32) and images[0].mode == "RGB"


def test_space_to_depth_round_trips_exactly():
    codec = SpaceToDepthCodec(2)
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = codec.encode(pixels)
    assert latents.shape == (2, 12, 32, 32)
    assert torch.equal(codec.decode(latents), pixels)


# ----- training
def test_conditioning_is_differentiable_in_the_vectors(tiny):
    vectors = {"*": torch.randn(2, tiny.clip.width, requires_grad=True)}
    cond = tiny.conditioning(["a photo of a * dress"], vectors)
    latents = tiny.encode_images(torch.rand(1, 3, 32, 32) * 2 - 1)
    tiny.training_loss(latents, cond, torch.Generator().manual_seed(0)).backward()
    assert vectors["*"].grad is not None and vectors["*"].grad.abs().sum() > 0


def test_training_loss_is_finite_and_falls_when_overfitting(tiny):
    import copy

    unet = copy.deepcopy(tiny.unet).train()
    backbone = DiffusionBackbone(unet, tiny.scheduler, tiny.codec, tiny.clip, tiny.text, device="cpu")
    torch.manual_seed(0)
    latents = backbone.encode_images(torch.rand(4, 3, 32, 32) * 2 - 1)
    cond = backbone.conditioning(["a red dress", "a coat", "a blue skirt", ""])
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = backbone.training_loss(latents, cond, torch.Generator().manual_seed(0))  # same noise and t: overfit
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0], losses


def test_v_prediction_loss(tiny):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction")
    backbone = DiffusionBackbone(tiny.unet, scheduler, tiny.codec, tiny.clip, tiny.text, device="cpu")
    latents = backbone.encode_images(torch.rand(2, 3, 32, 32) * 2 - 1)
    loss = backbone.training_loss(latents, backbone.conditioning(["a", "b"]), torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


# ----- saving and loading
def test_save_and_load_folder(tiny, tmp_path):
    folder = save_diffusion_folder(
        tiny, tmp_path / "model", extra_config={"steps": 3}, extra_files={"train_log.json": [1, 2]}
    )
    assert sorted(p.name for p in folder.iterdir()) == ["backbone.json", "scheduler", "train_log.json", "unet"]
    meta = json.loads((folder / "backbone.json").read_text())
    assert meta["format_version"] == 1 and meta["clip"] == "tiny-random" and meta["training"] == {"steps": 3}
    assert meta["codec"] == {"kind": "space-to-depth", "factor": 2}
    assert meta["text"] == {"pad_id": 49407, "skip_last_layers": 0}
    loaded = load_diffusion(str(folder), device="cpu")  # its CLIP comes from the spec in backbone.json
    for (k, a), (_, b) in zip(tiny.unet.state_dict().items(), loaded.unet.state_dict().items()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.half().float(), msg=k)  # saved in fp16
    assert loaded.scheduler.config.beta_schedule == tiny.scheduler.config.beta_schedule
    save_diffusion_folder(tiny, folder)  # overwriting an existing folder works
    assert not (tmp_path / "model.tmp").exists() and not (tmp_path / "model.old").exists()


def test_a_vae_codec_backbone_saves_and_loads_with_its_scaling_factor(sd_world, tmp_path):
    """A latent backbone (the toy world's layout: VaeCodec) round-trips through save_diffusion_folder: vae/ in fp16
    beside unet/, the latents' scaling factor kept, and the same image decoded."""
    import copy

    backbone = sd_world["backbone"]
    vae = copy.deepcopy(backbone.codec.vae)  # the module's fixture stays as it is
    vae.register_to_config(scaling_factor=0.5)
    saved = DiffusionBackbone(
        backbone.unet, backbone.scheduler, VaeCodec(vae), backbone.clip, backbone.text, device="cpu"
    )
    folder = save_diffusion_folder(saved, tmp_path / "latent")
    assert (folder / "vae" / "config.json").is_file()
    assert json.loads((folder / "backbone.json").read_text())["codec"] == {"kind": "vae", "factor": 2}
    loaded = load_diffusion(str(folder), clip_encoder=sd_world["encoder"], device="cpu")
    assert loaded.codec.kind == "vae" and loaded.codec.scaling_factor == 0.5
    for (k, a), (_, b) in zip(saved.codec.vae.state_dict().items(), loaded.codec.vae.state_dict().items()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.half().float(), msg=k)  # saved in fp16
    a = saved.generate([PROMPT], steps=2, guidance_scale=2.0)[0]
    b = loaded.generate([PROMPT], steps=2, guidance_scale=2.0)[0]
    assert a.size == b.size == (16, 16)


def test_a_retrained_clip_behind_the_same_spec_is_refused(tiny, tmp_path):
    """backbone.json holds a fingerprint of the text tower the UNet was trained on."""
    import copy

    folder = save_diffusion_folder(tiny, tmp_path / "model")
    other = copy.copy(tiny.clip)
    other.model = copy.deepcopy(tiny.clip.model)
    with torch.no_grad():
        other.model.transformer.resblocks[0].mlp.c_fc.bias.add_(0.1)
    with pytest.raises(DiffusionLoadError, match="another text tower"):
        load_diffusion(str(folder), clip_encoder=other, device="cpu")


def test_offline_hub_weights_give_a_clear_error(monkeypatch):
    assert __import__("os").environ.get("HF_HUB_OFFLINE") == "1"  # conftest
    for spec in ("CompVis/stable-diffusion-v1-4", "sd21"):
        with pytest.raises(DiffusionLoadError) as e:
            load_diffusion(spec, device="cpu")
        for words in ("HF_HUB_OFFLINE", "local diffusers folder", "tiny-random"):
            assert words in str(e.value)


def test_unknown_specs_are_refused(tmp_path):
    with pytest.raises(DiffusionLoadError, match="unknown diffusion model"):
        load_diffusion("no-such-model", device="cpu")
    with pytest.raises(DiffusionLoadError, match="neither a diffusers folder"):
        load_diffusion(str(tmp_path), device="cpu")
