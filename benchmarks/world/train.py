"""Train both of the toy world's models from scratch with one command: the CLIP, then the diffusion model
conditioned on that CLIP's text tower.

    python -m benchmarks.world.train                      # rewrites retrieval/models/weights/toyworld/{clip,diffusion}
    python -m benchmarks.world.train --out /tmp/toyworld  # writes /tmp/toyworld/clip and /tmp/toyworld/diffusion

Measured on 2 CPU cores: CLIP 23 min (3600 steps x 128 pairs, then its zero-shot evaluation on 1000 held-out
scenes); diffusion: autoencoder ~10 min (2000 steps), UNet 53 min on a quiet machine (4000 steps x 64 at 0.8 s;
61 min measured while other jobs shared the cores), evaluation of five samplers on 200 held-out captions 3.5 min:
~90 min in all. Each half is `train_clip.main` / `train_diffusion.main`; see them for the recipes.

Killed, the same command resumes: each half from its OUT/NAME.checkpoints folder (every 200 steps), and a rerun
skips a CLIP that is already written when the diffusion half was under way.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.world import train_clip, train_diffusion
from benchmarks.world.checkpoint import default_folder
from benchmarks.world.config import written_as
from retrieval.models.clip import TOYWORLD_WEIGHTS

WEIGHTS = TOYWORLD_WEIGHTS
# recipe pairs: the CLIP preset and the diffusion preset trained on it
PRESETS = {
    "toyworld": ("toyworld", "toyworld"),
    "toyworld-v2": ("toyworld-v2", "toyworld-v2"),
    "smoke": ("smoke", "smoke"),
}


def _trained_as(folder: Path, config) -> bool:
    """Whether FOLDER holds a CLIP trained under CONFIG (its train_config.json; a field the config class gained
    since counts as its default: `config.written_as`)."""
    path = folder / "train_config.json"
    return path.is_file() and written_as(json.loads(path.read_text()).get("config") or {}, config)


def main(argv: list[str] | None = None) -> None:
    """Train the toy world's CLIP, then its diffusion model on that CLIP; write both model folders."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.world.train", description=main.__doc__)
    parser.add_argument(
        "--preset",
        default="toyworld-v2",
        choices=sorted(PRESETS),
        help="toyworld-v2: the committed models (issue #13's recalibration, world pervl-v2-views); toyworld: the "
        "first pair (world pervl); smoke: a seconds-long twin for tests",
    )
    parser.add_argument(
        "--out", default=str(WEIGHTS), help="folder that receives clip/ and diffusion/ (default: the committed weights)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2: all of a 2-core machine)")
    # a killed run: the same command again resumes (each model from its OUT/NAME.checkpoints folder)
    parser.add_argument(
        "--grid", default="/tmp/toyworld_diffusion_samples.png", help="PNG of generated samples; '' for none"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    clip_out, diffusion_out = out / "clip", out / "diffusion"
    clip_preset, diffusion_preset = PRESETS[args.preset]
    common = ["--device", args.device, "--threads", str(args.threads)]

    t0 = time.time()
    # resumable: each half resumes from its OUT.checkpoints folder; a diffusion checkpoint folder means the CLIP
    # finished (the diffusion half starts only once the CLIP is written), so a rerun skips it
    diffusion_checkpoints = default_folder(diffusion_out)
    if diffusion_checkpoints.is_dir() and _trained_as(clip_out, train_clip.clip_train_config(clip_preset)):
        print(
            f"the CLIP in {clip_out} is trained; resuming the diffusion model from {diffusion_checkpoints}", flush=True
        )
    else:
        train_clip.main(["--preset", clip_preset, "--out", str(clip_out), "--no-progress", *common])
        diffusion_checkpoints.mkdir(parents=True, exist_ok=True)
    # the committed pair names its CLIP "toyworld" (what loaders resolve); elsewhere the folder is the SPEC
    clip_spec = "toyworld" if clip_out.resolve() == (WEIGHTS / "clip").resolve() else str(clip_out.resolve())
    train_diffusion.main(
        [
            "--preset",
            diffusion_preset,
            "--out",
            str(diffusion_out),
            "--clip",
            clip_spec,
            "--grid",
            args.grid,
            "--no-progress",
            *common,
        ]
    )
    print(f"trained both models in {(time.time() - t0) / 60:.1f} min: {clip_out}, {diffusion_out}", flush=True)


if __name__ == "__main__":
    main()
