"""GAIR's extra seconds per query as |W| grows: all weights in one batched sampler call vs one call per weight.

    python benchmarks/gair_speed.py                        # toy world models, CPU
    python benchmarks/gair_speed.py --model tiny-random --weights 1 3 --steps 2      # smoke run

A token is made up (the parent word's embedding plus noise: sampling cost does not depend on what it means), the
query is a PerVL-style caption, and the context images are generated once beforehand (they are cached per query
in real use), so the times are the I(w) generation, their CLIP features and the scoring. Each setting is timed
`--repeats` times after one warm-up; the median is printed. The plain composed query (no GAIR) is timed too:
GAIR's extra cost is the difference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from retrieval import Engine
from retrieval.composed import composed_feature, plan_query
from retrieval.gair import GairConfig, run_gair
from tokens.methods import word_embeddings
from tokens.token_file import CustomToken, TokenInfo


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python benchmarks/gair_speed.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="toyworld")
    p.add_argument("--diffusion", default="auto")
    p.add_argument("--weights", type=int, nargs="+", default=[1, 3, 6, 11], help="|W| values (evenly spaced in [0, 1])")
    p.add_argument("--steps", type=int, help="sampler steps (default: the diffusion model's)")
    p.add_argument("--vectors", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    engine = Engine(model=a.model, diffusion=a.diffusion or "auto", device=a.device)
    clip, backbone = engine.clip, engine.backbone
    g = torch.Generator().manual_seed(0)
    vectors = word_embeddings(clip, ["dress"]).repeat(a.vectors, 1) + 0.01 * torch.randn(
        a.vectors, clip.width, generator=g
    )
    token = CustomToken(
        vectors,
        TokenInfo(name="t", model=clip.spec, width=clip.width, n_vectors=a.vectors, parent="dress", method="ti"),
    )
    plan = plan_query("a wide lawn is behind a person wearing a * with raised arms.", [token])
    concept = np.ones((1, clip.dim), np.float32)
    steps = a.steps or backbone.sampling["steps"]
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        plain = timed(lambda: composed_feature(clip, plan), a.repeats)
        for n in a.weights:
            weights = tuple(float(w) for w in np.round(np.linspace(0, 1, n), 6)) if n > 1 else (1.0,)
            run_gair(
                [plan], backbone, concept, ["red"], GairConfig(weights=weights, steps=steps), cache
            )  # context cached
            batched = timed(
                lambda: run_gair(
                    [plan], backbone, concept, ["red"], GairConfig(weights=weights, steps=steps, batch_size=64), cache
                ),
                a.repeats,
            )
            single = timed(
                lambda: run_gair(
                    [plan], backbone, concept, ["red"], GairConfig(weights=weights, steps=steps, batch_size=1), cache
                ),
                a.repeats,
            )
            rows.append({"W": n, "batched_s": batched - plain, "one_at_a_time_s": single - plain})
    print("| \\|W\\| | GAIR extra s/query, batched | one weight at a time | speed-up |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['W']} | {r['batched_s']:.2f} | {r['one_at_a_time_s']:.2f} | {r['one_at_a_time_s'] / r['batched_s']:.2f}x |"
        )
    print(
        f"\nmodel {a.model}, diffusion {backbone.spec}, {steps} sampler steps, guidance "
        f"{backbone.sampling['guidance_scale']}, {torch.get_num_threads()} threads, device {backbone.device}; plain "
        f"composed query {plain * 1000:.1f} ms; median of {a.repeats}"
    )
    return rows


if __name__ == "__main__":
    main()
