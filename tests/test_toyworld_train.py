"""The one command that trains both toy-world models: its smoke twin writes a CLIP folder and a diffusion folder
conditioned on exactly that CLIP, and both load through the users' loaders."""

import json

import pytest

from benchmarks.world import train
from retrieval.models.diffusion import load_diffusion, text_fingerprint
from retrieval.models.encoders import ClipEncoder


@pytest.mark.slow  # end to end: trains both smoke models and writes their folders (run with -m slow)
def test_one_command_trains_clip_then_diffusion_on_it(tmp_path):
    train.main(["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--grid", ""])
    clip_folder, diffusion_folder = tmp_path / "clip", tmp_path / "diffusion"
    meta = json.loads((diffusion_folder / "backbone.json").read_text())
    assert meta["clip"] == str(clip_folder.resolve())  # not the committed "toyworld" CLIP
    clip = ClipEncoder.from_spec(str(clip_folder), device="cpu", precision="fp32")
    assert meta["clip_fingerprint"] == text_fingerprint(clip)
    assert (clip_folder / "eval.json").is_file() and (diffusion_folder / "eval.json").is_file()
    backbone = load_diffusion(str(diffusion_folder), device="cpu")
    assert backbone.clip.width == clip.width == backbone.unet.config.cross_attention_dim
    assert backbone.generate(["a person wearing a red dress on a beach."], steps=2)[0].size == (32, 32)


@pytest.mark.slow  # end to end, twice: a run killed in the diffusion half, then the same command again
def test_a_killed_run_resumes_without_retraining_the_clip(tmp_path, monkeypatch):
    from benchmarks.world import train_clip, train_diffusion

    argv = ["--preset", "smoke", "--out", str(tmp_path), "--device", "cpu", "--threads", "1", "--grid", ""]
    real = train_diffusion.train_diffusion

    class Killed(Exception):
        pass

    def killed_at_step_5(*args, **kwargs):
        def kill(stage, step):
            if stage == "unet" and step == 5:
                raise Killed

        return real(*args, **kwargs, on_step=kill)

    monkeypatch.setattr(train_diffusion, "train_diffusion", killed_at_step_5)
    with pytest.raises(Killed):
        train.main(argv)
    checkpoints = tmp_path / "diffusion.checkpoints"
    assert (checkpoints / "unet.pt").is_file() and (tmp_path / "clip" / "eval.json").is_file()

    monkeypatch.setattr(train_diffusion, "train_diffusion", real)
    monkeypatch.setattr(train_clip, "main", lambda *a, **k: pytest.fail("the trained CLIP was trained again"))
    train.main(argv)
    assert (tmp_path / "diffusion" / "eval.json").is_file() and not checkpoints.exists()


def test_every_recipe_pair_names_presets_both_trainers_have():
    """train.PRESETS pairs a CLIP recipe with a diffusion recipe; v2 is the committed recipe with the logit scale
    held at 100, half of the captions naming details, detail twins and the world with larger details (issue #13,
    sections 3-4); both of its models are trained in that world."""
    from dataclasses import asdict

    from benchmarks.world.garments import DETAIL_FIELDS
    from benchmarks.world.train_clip import clip_train_config
    from benchmarks.world.train_diffusion import diffusion_train_config

    for clip_preset, diffusion_preset in train.PRESETS.values():
        clip_train_config(clip_preset), diffusion_train_config(diffusion_preset)
    v1, v2 = asdict(clip_train_config("toyworld")), asdict(clip_train_config("toyworld-v2"))
    changed = {"fixed_logit_scale", "detail_caption_share", "world_preset", "detail_twins", "detail_change"}
    assert {k for k in v1 if v1[k] != v2[k]} == changed
    assert v2["fixed_logit_scale"] == 100.0 and v2["detail_caption_share"] == 0.5 and v2["detail_twins"]
    assert tuple(v2["detail_change"]) == DETAIL_FIELDS and v2["world_preset"] == "pervl-v2-views"
    d1, d2 = asdict(diffusion_train_config("toyworld")), asdict(diffusion_train_config("toyworld-v2"))
    assert {k for k in d1 if d1[k] != d2[k]} == {"detail_caption_share", "world_preset"}
    assert d2["detail_caption_share"] == 0.5 and d2["world_preset"] == v2["world_preset"]


def test_a_clip_written_before_a_config_field_existed_still_counts_as_trained(tmp_path):
    """A rerun skips a trained CLIP whose train_config.json predates a field (the field's default is what that
    training did), and retrains it when the preset sets the new field, or the folder names a field now gone."""
    from dataclasses import asdict

    from benchmarks.world.train_clip import clip_train_config

    config = clip_train_config("smoke")
    written = json.loads(json.dumps(asdict(config), default=str))
    del written["detail_twins"]  # as written by the code of 2026-12-06
    (tmp_path / "train_config.json").write_text(json.dumps({"config": written}))
    assert train._trained_as(tmp_path, config)
    assert not train._trained_as(tmp_path, clip_train_config("smoke", detail_twins=True))
    assert not train._trained_as(tmp_path, clip_train_config("smoke", steps=7))
    (tmp_path / "train_config.json").write_text(json.dumps({"config": {**written, "retired_field": 1}}))
    assert not train._trained_as(tmp_path, config)
    assert not train._trained_as(tmp_path / "absent", config)
