"""How much each term of `ours`' loss moves the token: the gradient norms of lambda_SD l_SD and lambda_CE l_CE
(Perera et al. Sec. 4.2, L = lambda_SD l_SD + lambda_CE l_CE; Sec. 5: lambda_SD = 1, lambda_CE = 1e-5) with respect
to the token's trainable numbers, on the synthetic benchmark's concepts, at the token's initialisation and at the
token the benchmark learned (when its cache holds one). Run by hand after a benchmark run:

    python benchmarks/pervl.py --world synthetic --seeds 0 --steps 1000 --methods ours --out /tmp/runs/pervl50
    python benchmarks/diagnostics/loss_balance.py /tmp/runs/pervl50 [N_CONCEPTS] [DRAWS]

AdamW rescales the summed gradient, so what matters is the ratio of the two terms: when the weighted l_CE gradient
is a tiny share of the l_SD one, `ours` trains as textual inversion in the attribute subspace. Not part of the tests.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import torch

torch.set_num_threads(2)
from benchmarks.pervl import Benchmark, parse_args, sample_shots
from benchmarks.pervl_data import fsl_image_path
from retrieval.io.images import load_image
from retrieval.models.precision import autocast
from tokens.learn import ConceptImages, prepare_concepts
from tokens.token_file import load_token_file
from tokens.trainer import _trainable, class_data, draw_sd_batch, step_losses

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/runs/pervl50"
N = int(sys.argv[2]) if len(sys.argv) > 2 else 8
DRAWS = int(sys.argv[3]) if len(sys.argv) > 3 else 8

b = Benchmark(parse_args(["--world", "synthetic", "--seeds", "0", "--out", OUT, "--no-progress"]))
split, images = b.load_split()
clip, backbone = b.models(True)
config = b.train_config("ours", 0)
config = dataclasses.replace(  # negatives sampled the diffusion model's own way, as the benchmark's (its cache)
    config,
    negative_steps=b.cfg.negative_steps or backbone.sampling["steps"],
    negative_guidance=backbone.sampling["guidance_scale"],
)
concepts = prepare_concepts(
    clip,
    backbone,
    config,
    [
        ConceptImages(
            f"c{pair_id}",
            b.parent_of(split, pair_id),
            [
                load_image(fsl_image_path(images, n))
                for n in sample_shots(split.fsl_train[pair_id], b.cfg.shots, 0, pair_id)
            ],
            seed=i,  # the benchmark's seed-0 concept seeds
        )
        for i, pair_id in enumerate(split.pair_ids[:N])
    ],
    Path(OUT) / "cache" / "negatives",
)
ce = class_data(concepts, clip, config)
T = backbone.scheduler.config.num_train_timesteps
mixed = lambda: autocast(clip.device, backbone.precision)  # noqa: E731


def norms(holder) -> np.ndarray:
    """(DRAWS, C, 2): |grad of lambda_SD l_SD|, |grad of lambda_CE l_CE| per concept and draw of (image, t, noise)."""
    generators = [torch.Generator().manual_seed(1000 + i) for i in range(len(concepts))]
    out = []
    for _ in range(DRAWS):
        stacked = holder.vectors()
        vectors = {c.placeholder: stacked[i, : c.n_vectors] for i, c in enumerate(concepts)}
        batch = draw_sd_batch(concepts, generators, config, T, clip.device)
        l_sd, l_ce = step_losses(vectors, concepts, clip, backbone, config, batch, ce, mixed)
        row = []
        for i in range(len(concepts)):
            g_sd = torch.autograd.grad(config.lambda_sd * l_sd[i], holder.param, retain_graph=True)[0]
            g_ce = torch.autograd.grad(config.lambda_ce * l_ce[i], holder.param, retain_graph=True)[0]
            row.append([float(g_sd.norm()), float(g_ce.norm())])
        out.append(row)
    return np.array(out)


def report(label: str, holder) -> None:
    n = norms(holder)
    ratio = n[..., 1] / n[..., 0]
    print(
        f"{label}: |grad lambda_SD l_SD| median {np.median(n[..., 0]):.3g}, |grad lambda_CE l_CE| median "
        f"{np.median(n[..., 1]):.3g}; ratio CE/SD median {np.median(ratio):.3g} (per concept: "
        f"{', '.join(f'{r:.2g}' for r in np.median(ratio, 0))}); lambda_CE for a 1:1 balance ~ "
        f"{config.lambda_ce / np.median(ratio):.3g}"
    )


print(f"{len(concepts)} concepts, {DRAWS} draws each; lambda_SD {config.lambda_sd}, lambda_CE {config.lambda_ce}")
holder = _trainable(concepts, config, clip.width, clip.device)
holder.param.requires_grad_(True)
report("at initialisation", holder)
folder = Path(OUT) / "cache" / "tokens" / "ours-seed0"
if folder.is_dir():
    with torch.no_grad():  # the learned vectors, expressed in the holder's coefficients: P(e - mu) + mu is linear
        learned = torch.stack([load_token_file(folder / f"{c.name}.safetensors").vectors for c in concepts])
        holder.param.copy_(learned)  # the subspace projection of a vector already in the subspace is itself
    report("at the learned token (1000 steps)", holder)
