"""Linear probe of the toy CLIP's image features per factor (issue 3 closing note), run by hand:

    python benchmarks/diagnostics/clip_probe.py [MODEL_SPEC]

3000 random scenes (2400 train / 600 test), a linear classifier on the normalised image features for context,
category, colour and pattern. High means the image tower represents the factor. Not part of the tests.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch

torch.set_num_threads(1)
torch.manual_seed(0)
from benchmarks.world import render_scene, trained_world, world_config
from retrieval.models.encoders import ClipEncoder

spec = sys.argv[1] if len(sys.argv) > 1 else "toyworld"
w = world_config(trained_world(spec))
clip = ClipEncoder.from_spec(spec, device="cpu")
rng = np.random.default_rng(5)
from benchmarks.world.scene import sample_scene

scenes = [sample_scene(rng, w) for _ in range(3000)]
ims = [render_scene(s, w) for s in scenes]
f = clip.encode_pil(ims)
# also pre-projection features? use final features
X = torch.from_numpy(f)
for factor in ("category", "pattern", "colour", "context"):
    names = sorted({getattr(s, factor) for s in scenes})
    y = torch.tensor([names.index(getattr(s, factor)) for s in scenes])
    lin = torch.nn.Linear(X.shape[1], len(names))
    opt = torch.optim.Adam(lin.parameters(), 1e-2)
    for _ in range(500):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(X[:2400] * 10), y[:2400])
        loss.backward()
        opt.step()
    acc = (lin(X[2400:] * 10).argmax(1) == y[2400:]).float().mean().item()
    print(factor, "linear probe acc", round(acc, 3), "chance", round(1 / len(names), 3))
