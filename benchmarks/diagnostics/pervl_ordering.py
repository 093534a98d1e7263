"""Diagnosis of the synthetic-world PerVL table (issue 6 closing note), run by hand after a full run:

    python benchmarks/pervl.py --world synthetic --out /tmp/runs/pervl-full
    python benchmarks/diagnostics/pervl_ordering.py

Seed 0: MRR of image-only and text-only queries and of their mixes, and for each query the kind of its top-1
image (right / same words other concept / same context other words / other), per method. Not part of the tests.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import numpy as np
import pandas as pd
import torch

OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/runs/pervl-full"
torch.set_num_threads(2)
from benchmarks.pervl import Benchmark, metrics, parse_args, sample_shots, target_rank
from benchmarks.pervl_data import fsl_image_path
from retrieval.composed import insert_concept, plan_query
from retrieval.io.images import load_image
from tokens.token_file import load_token_file

cfg = parse_args(["--world", "synthetic", "--out", OUT, "--no-progress"])
b = Benchmark(cfg)
split, images = b.load_split()
gallery = b.gallery_features(split, images)
clip, _ = b.models(False)
q = split.queries
where = {n: i for i, n in enumerate(b.gallery_names)}
gal = b.gallery_names
scenes = pd.read_csv(OUT + "/world/test_scenes.csv").set_index("image_name")
words = lambda n: tuple(scenes.loc[n, ["category", "colour", "pattern"]])


def mrr(v):
    s = v @ gallery.T
    return round(metrics([target_rank(s[i], where[n]) for i, n in enumerate(q["image_name"])])["mrr"], 1)


def kinds(v):
    s = v @ gallery.T
    k = {"right": 0, "same words, other concept": 0, "same context, other words": 0, "other": 0}
    for i, n in enumerate(q["image_name"]):
        t = gal[int(np.argmax(s[i]))]
        if t == n:
            k["right"] += 1
        elif words(t) == words(n):
            k["same words, other concept"] += 1
        elif scenes.loc[t, "context"] == scenes.loc[n, "context"]:
            k["same context, other words"] += 1
        else:
            k["other"] += 1
    return k


unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
shots = {p: sample_shots(split.fsl_train[p], 5, 0, p) for p in split.pair_ids}
means = {p: unit(clip.encode_pil([load_image(fsl_image_path(images, n)) for n in shots[p]]).mean(0)) for p in shots}
img = np.stack([means[p] for p in q["pair_id"]])
txt = clip.encode_texts([insert_concept(c, split.categories[p]) for c, p in zip(q["caption"], q["pair_id"])])
print("image only", mrr(img), kinds(img))
print("text only", mrr(txt), kinds(txt))
for a in (0.25, 0.5, 0.75):
    print("text weight", a, mrr(unit(a * txt + (1 - a) * img)))
print("text+image", kinds(unit(txt + img)))
for m in ("pt", "ti", "batex", "ours"):
    toks = {p: load_token_file(f"{OUT}/cache/tokens/{m}-seed0/c{p}.safetensors") for p in split.pair_ids}
    plans = [plan_query(insert_concept(c, "*"), [toks[p]]) for c, p in zip(q["caption"], q["pair_id"])]
    v = clip.encode_texts([p.composed for p in plans], {t.placeholder: t.vectors for t in toks.values()})
    print(m, mrr(v), kinds(v), "| token + avg image:", mrr(unit(v + img)))
