"""Can the world CLIP's image tower see a concept's unnamed details at all? A capacity check (issue #13, section 3).

    python -m benchmarks.world.detail_capacity [--steps 800] [--train-scenes 20000] [--threads 2] [--world-set F=V]

No caption recipe has taught the toy CLIP a detail word, and a linear probe of its image embeddings reads the
trim colour and the emblem at chance (`benchmarks.world_geometry`). Two reasons are possible: the architecture
cannot resolve a 2 px trim band or a 5 px emblem at 64 px, or the contrastive captions never ask for them. This
trains the same image tower (the `toyworld` CLIP preset's ModifiedResNet, from its seeded initialisation) with
supervised heads instead: every field of the details (where the trim runs and its colour; the emblem's shape, spot
and colour: look-alike concepts differ in two of them) and, as a control, the garment's colour, on held-out-stream
scenes whose garment has both a trim and an emblem, and prints held-out accuracy as it goes. High accuracy means
the tower can see the detail and the training signal is what is missing; chance means the architecture cannot.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.world import evaluate, world_config
from benchmarks.world.config import WorldConfig, parse_overrides
from benchmarks.world.evaluate import detailed_scenes, factor_value
from benchmarks.world.garments import DETAIL_FIELDS, EMBLEM_SPOTS, GARMENTS
from benchmarks.world.scene import Scene
from benchmarks.world.train_clip import build_model, clip_train_config, to_pixels

# every field of a garment's details (garments.DETAIL_FIELDS), and the garment's colour as the control
FACTORS = (*DETAIL_FIELDS, "colour")
TRAIN_SEED, TEST_SEED = 12345, 54321  # scene streams of their own (training pairs use small integer seeds)


def factor_classes(world) -> dict[str, list[str]]:
    """Each factor's classes, in the world's order."""
    colours = [c for c, _ in world.colours]
    trims = sorted({t for c in world.categories for t in GARMENTS[c].trims})
    return {
        "trim": trims,
        "trim_colour": colours,
        "emblem": list(world.emblems),
        "emblem_at": list(EMBLEM_SPOTS),
        "emblem_colour": colours,
        "colour": colours,
    }


def labelled(scenes: list[Scene], world) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(N, H, W, 3) uint8 renders and, per factor, (N,) class indices."""
    classes = factor_classes(world)
    images = np.stack([np.asarray(im, dtype=np.uint8) for im in evaluate.render_scenes(scenes, world)])
    labels = {f: torch.tensor([classes[f].index(factor_value(s, f)) for s in scenes]) for f in FACTORS}
    return torch.from_numpy(images), labels


def run(
    steps: int = 800,
    train_scenes: int = 20000,
    test_scenes: int = 1000,
    batch_size: int = 64,
    clip_preset: str = "toyworld",
    every: int = 100,
    world_overrides: dict | None = None,
) -> list[dict]:
    """Train the image tower of CLIP_PRESET (on its world, with WORLD_OVERRIDES, e.g. {"emblem_size": 0.1}) with one
    linear head per factor; [{"step", "loss", factor: held-out accuracy}], every EVERY steps and at the last."""
    config = clip_train_config(clip_preset)
    world = world_config(config.world_preset, **(world_overrides or {}))
    x, y = labelled(detailed_scenes(world, train_scenes, TRAIN_SEED), world)
    xt, yt = labelled(detailed_scenes(world, test_scenes, TEST_SEED), world)
    visual = build_model(config).visual  # seeded like the CLIP's own initialisation
    classes = factor_classes(world)
    heads = torch.nn.ModuleDict({f: torch.nn.Linear(config.model_cfg["embed_dim"], len(classes[f])) for f in FACTORS})
    optimizer = torch.optim.AdamW([*visual.parameters(), *heads.parameters()], lr=1e-3, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)

    def predict(images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = 10 * F.normalize(visual(to_pixels(images)), dim=-1)  # unit features, as the CLIP's loss sees them
        return {f: heads[f](features) for f in FACTORS}

    log = []
    for step in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        out = predict(x[idx])
        loss = sum(F.cross_entropy(out[f], y[f][idx]) for f in FACTORS)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % every == 0 or step == steps - 1:
            visual.eval()
            with torch.no_grad():
                held = predict(xt)
            visual.train()
            log.append(
                {
                    "step": step,
                    "loss": round(loss.item(), 4),
                    **{f: float((held[f].argmax(1) == yt[f]).float().mean()) for f in FACTORS},
                }
            )
    return log


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.world.detail_capacity",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--steps", type=int, default=800, help="optimizer steps of 64 images (default %(default)s)")
    p.add_argument("--train-scenes", type=int, default=20000, help="rendered training scenes (default %(default)s)")
    p.add_argument("--test-scenes", type=int, default=1000, help="held-out scenes scored (default %(default)s)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default %(default)s)")
    p.add_argument(
        "--world-set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a toy-world field, e.g. emblem_size=0.1 (repeatable)",
    )
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    start = time.time()
    overrides = parse_overrides(a.world_set, WorldConfig, "--world-set")
    log = run(a.steps, a.train_scenes, a.test_scenes, world_overrides=overrides)
    world = world_config(clip_train_config().world_preset, **overrides)
    test = detailed_scenes(world, a.test_scenes, TEST_SEED)  # chance: always naming the held-out majority class
    chance = {f: max(Counter(factor_value(s, f) for s in test).values()) / len(test) for f in FACTORS}
    print("| step | loss | " + " | ".join(f"{f} (chance {chance[f]:.2f})" for f in FACTORS) + " |")
    print("|" + "---|" * (2 + len(FACTORS)))
    for e in log:
        print(f"| {e['step']} | {e['loss']:.3f} | " + " | ".join(f"{e[f]:.2f}" for f in FACTORS) + " |")
    print(f"\nheld-out accuracy of supervised heads on the toyworld image tower; {time.time() - start:.0f} s")
    return log


if __name__ == "__main__":
    main()
