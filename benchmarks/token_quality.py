"""Token quality in the toy world: per method, does a token tell its concept apart, does it generate it, at what cost.

    python -m benchmarks.token_quality                                   # toyworld CLIP + diffusion, 5 concepts
    python -m benchmarks.token_quality --model tiny-random --diffusion tiny-random --steps 10   # smoke run
    python -m benchmarks.token_quality --methods ti batex ours ours+caption --steps 50 200 500   # convergence

Convergence (issue #13, section 6): with several `--steps`, every method trains ONCE, to the largest budget, and
each budget's row is the token at that step (`StepReport.vectors`). The learning rate is constant and every step
draws its own batch, so that snapshot is exactly the token a training of that many steps returns (tested:
tests/test_tokens.py, `test_on_step_snapshot_is_the_token_of_a_shorter_training`). `ours+caption` is ours
initialised from an `auto` caption (Qiu et al., One-Sentence report, Sec. 3); `ours+rR` is ours with P cut to the R
principal directions of largest variance (`TokenTrainConfig.subspace_rank`; Perera et al. Sec. 4.3 give no
dimension for P, ours keeps all: r = K - 1 = 16 on the toy world).

Data: the toy world's `test` split (`write_split`, world preset `pervl`). The N concepts are the first concept of
each of the first N groups (different words); each token is learned from the concept's few-shot images with its
category as the parent word, all N concepts of a method in ONE batched loop (`tokens.learn.learn_tokens`).
Negatives (ours, pt) are sampled from the diffusion model for the parent prompt, as `learn-token` does.

Retrieval: MRR of the token prompt below, each evaluation image of the concept ranked against the evaluation
images of the split's other concepts (look-alikes included).

Discrimination (Perera et al., Table 3's three questions). Every image x is scored by the token's prompt,
s(x) = cos(f(x), g("a person wearing a * <parent>.")) in the toy world's CLIP; each number is the ROC AUC of s
(the probability that a positive outscores a negative, ties counting 1/2), averaged over the N concepts:
- AUC concept/parent: positives = the concept's evaluation images (contexts its few-shot images never show);
  negatives = `--parent-images` rendered scenes of other garments of the parent category (random words, details).
- AUC concept/others: positives = the same; negatives = the evaluation images of every other concept of the split
  (including the concepts sharing its three words and differing only in unnamed details: the hard negatives).
- AUC parent/classes: positives = the rendered scenes of the parent category; negatives = as many rendered scenes
  of the other categories. High means the token still means its parent (it composes with "dress" as a dress).
Generation (Table 2 style): for each concept and each of its evaluation contexts, `--gen-per-context` images for
"a person wearing a * <parent> <pose> <place>." (the caption grammar the toy diffusion model was trained on),
read back by the toy world's CLIP: words accuracy = its zero-shot category, colour and pattern
(`benchmarks.world.evaluate.classify`) all those of the concept; object accuracy (Perera et al. Table 2's) = the
image is closer to the concept (its few-shot images' mean feature) than to any look-alike concept sharing its three
words (chance: 1 / group size, 1/2-1/3); context accuracy = the prompted context. The row `words` generates from
the concept's words instead of the token: words accuracy is what a token should match, object accuracy sits at
chance (words do not say the details).
Cost: seconds per optimiser step of the batched loop (all N concepts), and per concept.
`--negatives-source world` replaces the sampled negatives by rendered scenes of the parent category (a different
random stream from the evaluation's): with `--methods pt` nothing then needs the diffusion model.
A row `words` scores the concept's own words ("a person wearing a red striped dress.") without training: what
the token must beat.

Defaults: the papers' learning rate (5e-4) and batch (4), but a CPU budget of `--steps 200` for every method (the
papers: 20000 steps; BaTex 500): the table compares methods at equal, short budgets. Adam moves a coordinate by up
to lr per step, so 200 steps can already move a token far on the toy CLIP's embedding scale (entries ~0.02).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.world import trained_world, world_config, write_split
from benchmarks.world.captions import CONTEXT_WORDS, POSE_WORDS, garment_phrase
from benchmarks.world.evaluate import classify
from benchmarks.world.render import render_scene
from benchmarks.world.scene import sample_scene
from benchmarks.world.split import plan_split
from retrieval import Engine
from retrieval.io.atomic import write_json
from retrieval.io.images import image_grid, load_image
from tokens.learn import ConceptImages, learn_tokens
from tokens.methods import METHODS, MODEL_DEFAULTS, fill_prompt, token_train_config

SCORE_TEMPLATE = MODEL_DEFAULTS["toyworld"]["class_template"]  # the toy grammar's "a person wearing {g}."
SD_TEMPLATES = MODEL_DEFAULTS["toyworld"]["sd_templates"]  # the grammar's forms


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC = P(score of a positive > score of a negative), ties 1/2 (Mann-Whitney U / (n_pos n_neg))."""
    diff = pos[:, None] - neg[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def pick_concepts(plan, n: int):
    """The first concept of each of the first N groups (consecutive concepts of a group share their words)."""
    picked, seen = [], set()
    for c in plan.concepts:
        if c.words not in seen:
            seen.add(c.words)
            picked.append(c)
        if len(picked) == n:
            break
    return picked


def category_scenes(world, per_category: int, seed: int = 4242) -> dict[str, list]:
    """PER_CATEGORY random (non-concept) scenes of every category, from their own stream."""
    rng = np.random.default_rng(seed)
    out = {c: [] for c in world.categories}
    while min(len(v) for v in out.values()) < per_category:
        s = sample_scene(rng, world)
        if len(out[s.category]) < per_category:
            out[s.category].append(s)
    return out


def prompt_scores(clip, features: np.ndarray, prompt: str, vectors: dict | None) -> np.ndarray:
    return features @ clip.encode_texts([prompt], vectors)[0]


def evaluate_prompt(clip, prompt, vectors, concept, eval_feats, other_feats, parent_feats, class_feats) -> dict:
    s_concept = prompt_scores(clip, eval_feats, prompt, vectors)
    s_others = prompt_scores(clip, other_feats, prompt, vectors)
    # each evaluation image ranked against the other concepts' evaluation images only (one answer per query)
    ranks = 1 + (s_others[None, :] > s_concept[:, None]).sum(1)
    return {
        "mrr": float(np.mean(1.0 / ranks)),
        "auc_concept_parent": auc(s_concept, prompt_scores(clip, parent_feats, prompt, vectors)),
        "auc_concept_others": auc(s_concept, s_others),
        "auc_parent_classes": auc(
            prompt_scores(clip, parent_feats, prompt, vectors), prompt_scores(clip, class_feats, prompt, vectors)
        ),
    }


GEN_COLUMNS = ("gen_words", "gen_object", "gen_context")
# what --methods accepts: the four methods, and ours initialised from an `auto` caption (Qiu et al. Sec. 3)
# and ours with P of rank R (the paper gives no dimension; ours keeps every direction)
VARIANTS: dict[str, tuple[str, dict]] = (
    {m: (m, {}) for m in METHODS}
    | {"ours+caption": ("ours", {"init_caption": "auto"})}
    | {f"ours+r{r}": ("ours", {"subspace_rank": r}) for r in (1, 2, 4, 8)}
)


def variant_config(name: str, **overrides):
    method, extra = VARIANTS[name]
    return token_train_config(method, **{**overrides, **extra})


def generation_accuracy(
    backbone, clip, world, concept, placeholder, vectors, eval_scenes, per_context, steps, guidance, seed, lookalikes
):
    """Generated images of the concept in each of its evaluation contexts, read back by the toy CLIP.

    PLACEHOLDER None: the concept's words instead of the token (the reference a token is compared with).
    LOOKALIKES: {pair_id: unit mean feature of its few-shot images} for the concept and every concept sharing its
    three words (they differ in unnamed details only)."""
    garment = f"a {placeholder} {concept.category}" if placeholder else garment_phrase(*concept.words)
    prompts, contexts = [], []
    for s in eval_scenes:
        place = CONTEXT_WORDS[s.context].places[0]
        prompts.append(f"a person wearing {garment} {POSE_WORDS[s.pose].ing} {place}.")
        contexts += [s.context] * per_context
    images = backbone.generate(prompts, vectors, n=per_context, guidance_scale=guidance, steps=steps, seed=seed)
    got = {f: classify(clip, images, f, world) for f in ("category", "colour", "pattern", "context")}
    words = [
        cat == concept.category and col == concept.colour and pat == concept.pattern
        for cat, col, pat in zip(got["category"], got["colour"], got["pattern"])
    ]
    ids = list(lookalikes)
    sims = clip.encode_pil(images) @ np.stack([lookalikes[i] for i in ids]).T  # (n images, n look-alikes)
    own = [ids[j] == concept.pair_id for j in sims.argmax(1)]
    return {
        "gen_words": float(np.mean(words)),
        "gen_object": float(np.mean(own)),
        "gen_context": float(np.mean([c == t for c, t in zip(got["context"], contexts)])),
        "images": images,
    }


def run(args) -> list[dict]:
    """The table's rows; OUT/token_quality.json is rewritten (atomically) after each method, so a long convergence
    run that is killed keeps every method it finished ("complete": false until the last)."""
    out = Path(args.out)
    world = world_config(trained_world(args.model))
    # 1. the world: split, picked concepts, their few-shot and evaluation images; parent/other-class scenes
    paths = write_split(out / "world", world, "test")
    plan = plan_split(world, "test")
    concepts = pick_concepts(plan, args.concepts)
    by_concept = {c.pair_id: [q for q in plan.queries if q.scene.concept == c.pair_id] for c in plan.concepts}
    image_dir = paths.images / "train" / "image"
    configs = {m: variant_config(m) for m in args.methods}
    need_diffusion = any(c.needs_diffusion(negatives_given=args.negatives_source == "world") for c in configs.values())
    engine = Engine(model=args.model, diffusion=args.diffusion or "auto", device=args.device)  # models load once
    clip, backbone = engine.clip, engine.backbone if need_diffusion else None
    if backbone is not None:  # unset sampler settings: the diffusion model's own (backbone.json's best measured)
        args.sample_steps = args.sample_steps or backbone.sampling["steps"]
        args.guidance = args.guidance if args.guidance is not None else backbone.sampling["guidance_scale"]

    def feats_of(scenes):
        return clip.encode_pil([render_scene(s, world) for s in scenes])

    def feats_of_files(items):
        return clip.encode_pil([load_image(image_dir / q.name) for q in items])

    scenes = category_scenes(world, args.parent_images)
    class_feats = {cat: feats_of(v) for cat, v in scenes.items()}
    eval_feats = {c.pair_id: feats_of_files(by_concept[c.pair_id]) for c in plan.concepts}
    rows = []

    def score(c, prompt, vectors):
        """evaluate_prompt against the concept's negatives: the other concepts' evaluation images, other classes."""
        others = np.concatenate([eval_feats[o.pair_id] for o in plan.concepts if o.pair_id != c.pair_id])
        rest = np.concatenate([class_feats[k] for k in world.categories if k != c.category])
        return evaluate_prompt(clip, prompt, vectors, c, eval_feats[c.pair_id], others, class_feats[c.category], rest)

    # 2. the no-training reference: the concept's own words
    ref = [score(c, f"a person wearing {garment_phrase(c.category, c.colour, c.pattern)}.", None) for c in concepts]
    # look-alikes: per picked concept, the unit mean few-shot feature of it and of every concept sharing its words
    fsl_images = {c.pair_id: [load_image(image_dir / im.name) for im in plan.fsl[c.pair_id]] for c in concepts}

    def unit_mean(images):
        f = clip.encode_pil(images).mean(0)
        return f / np.linalg.norm(f)

    lookalikes = {
        c.pair_id: {
            o.pair_id: unit_mean(
                fsl_images.get(o.pair_id) or [load_image(image_dir / im.name) for im in plan.fsl[o.pair_id]]
            )
            for o in plan.concepts
            if o.words == c.words
        }
        for c in concepts
    }

    def generation(c, placeholder, vectors):
        return generation_accuracy(
            backbone,
            clip,
            world,
            c,
            placeholder,
            vectors,
            [q.scene for q in by_concept[c.pair_id]],
            args.gen_per_context,
            args.sample_steps,
            args.guidance,
            args.seed,
            lookalikes[c.pair_id],
        )

    gen_ref = [generation(c, None, None) for c in concepts] if backbone is not None else []
    nan = float("nan")
    rows.append(
        {
            "method": "words",
            "steps": 0,
            **{k: float(np.mean([r[k] for r in ref])) for k in ref[0]},
            **{k: float(np.mean([g[k] for g in gen_ref])) if gen_ref else nan for k in GEN_COLUMNS},
            "s_per_step": nan,
            "s_per_concept_step": nan,
        }
    )
    # 3. each method: one batched training of all concepts, then the measurements
    parent_scenes = category_scenes(world, args.negatives, seed=777) if args.negatives_source == "world" else {}
    budgets = sorted(set(args.steps))
    for method in args.methods:
        config = variant_config(
            method,
            steps=budgets[-1],
            lr=args.lr,
            n_vectors=args.vectors,
            seed=args.seed,
            sd_templates=SD_TEMPLATES,
            class_template=SCORE_TEMPLATE,
            n_negatives=args.negatives,
            negative_steps=args.sample_steps,
            negative_guidance=args.guidance,
            min_images=1,
        )
        to_learn = []
        for c in concepts:
            negatives = None  # sampled from the diffusion model for the parent prompt (ours, pt)
            if config.uses_ce and parent_scenes:  # rendered scenes of the parent, from their own stream
                negatives = [render_scene(s, world) for s in parent_scenes[c.category]]
            to_learn.append(ConceptImages(f"c{c.pair_id}", c.category, fsl_images[c.pair_id], negatives))
        snapshots = {}  # budget -> (C, n_max, width): the tokens at that step of the one training

        def keep(report):
            if report.step in budgets:
                snapshots[report.step] = report.vectors()

        learned = learn_tokens(
            clip,
            backbone,
            config,
            to_learn,
            out / "negatives",
            progress=not args.no_progress and sys.stderr.isatty(),
            on_step=keep,
        )
        seconds = learned[0].info.training["seconds"]  # the batched loop's, all concepts
        steps_run = max(t.info.training["steps"] for t in learned) or 1
        for steps in budgets:
            per = []
            for i, (c, t) in enumerate(zip(concepts, learned)):
                # a budget past the step where training stopped (every loss non-finite): what that shorter run kept
                at = snapshots[steps][i, : len(t.vectors)] if steps in snapshots else t.vectors
                vectors = {t.placeholder: at.to(clip.device)}
                m = score(c, fill_prompt(SCORE_TEMPLATE, t.placeholder, c.category), vectors)
                if backbone is None:  # no diffusion model loaded (pt with rendered negatives): no generation columns
                    per.append({**m, **{k: nan for k in GEN_COLUMNS}})
                    continue
                g = generation(c, t.placeholder, vectors)
                if args.save_images:
                    grid = image_grid(g["images"], columns=len(g["images"]))
                    grid.save(out / f"gen-{method}-{steps}-{c.pair_id}.png")
                per.append({**m, **{k: g[k] for k in GEN_COLUMNS}})
            rows.append(
                {
                    "method": method,
                    "steps": steps,
                    **{k: float(np.mean([r[k] for r in per])) for k in per[0]},
                    "s_per_step": seconds / steps_run,
                    "s_per_concept_step": seconds / steps_run / len(concepts),
                }
            )
        write_json(
            out / "token_quality.json", {"args": vars(args), "rows": rows, "complete": method == args.methods[-1]}
        )
    return rows


def _cell(value) -> str:
    if isinstance(value, (str, int)):
        return str(value)
    return "-" if np.isnan(value) else f"{value:.3f}"


def markdown(rows: list[dict]) -> str:
    cols = [
        ("method", "method"),
        ("steps", "steps"),
        ("mrr", "MRR"),
        ("auc_concept_parent", "AUC concept/parent"),
        ("auc_concept_others", "AUC concept/others"),
        ("auc_parent_classes", "AUC parent/classes"),
        ("gen_words", "gen words acc"),
        ("gen_object", "gen object acc"),
        ("gen_context", "gen context acc"),
        ("s_per_step", "s/step (batch)"),
        ("s_per_concept_step", "s/step/concept"),
    ]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [_cell(r[k]) for k, _ in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="toyworld", help="CLIP SPEC (default: the toy world's)")
    parser.add_argument("--diffusion", default="auto", help="diffusion SPEC (auto: the one paired with --model)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(VARIANTS))
    parser.add_argument("--concepts", type=int, default=5)
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[200],
        help="optimiser steps, every method (CPU budget); several (50 200 1000): a convergence table from one "
        "training per method (a row per budget: the token at that step)",
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="learning rate, every method (the papers')")
    parser.add_argument("--vectors", type=int, default=10)
    parser.add_argument("--negatives", type=int, default=16, help="negatives per parent (ours, pt)")
    parser.add_argument(
        "--negatives-source",
        default="diffusion",
        choices=("diffusion", "world"),
        help="diffusion: sampled for the parent prompt (as learn-token does); world: rendered scenes of "
        "the parent category (pt then needs no diffusion model)",
    )
    parser.add_argument(
        "--sample-steps", type=int, help="sampler steps for negatives and generated images (default: the model's own)"
    )
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's own)")
    parser.add_argument("--gen-per-context", type=int, default=2)
    parser.add_argument("--parent-images", type=int, default=40, help="rendered scenes per category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="out/token_quality")
    parser.add_argument("--save-images", action="store_true", help="write each concept's generated images")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bars (none either when stderr is not a terminal)"
    )
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    rows = run(args)
    table = markdown(rows)
    print(table)
    print(
        f"\n{args.concepts} concepts, {args.steps} steps, lr {args.lr}, model {args.model}, diffusion {args.diffusion}, "
        f"negatives from {args.negatives_source}; "
        f"{time.perf_counter() - t:.0f} s in all"
    )


if __name__ == "__main__":
    main()
