"""benchmarks/pervl.py: the protocol's pieces by hand, the real annotation files with stand-in images, and the
quick synthetic profile on tiny models (a complete table, then a resumed run that trains nothing)."""

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from benchmarks import pervl
from benchmarks.pervl import BenchConfig, Benchmark, insert_concept, metrics, parse_args, sample_shots, target_rank
from benchmarks.pervl_data import fsl_image_path, query_image_path, read_split

PERVL = Path(__file__).resolve().parents[2] / "shared" / "pervl" / "deep_fashion"
TINY = {
    "model": "tiny-random",
    "diffusion": "tiny-random",
    "n_negatives": 2,
    "negative_steps": 1,
    "gair_steps": 1,
    "gair_weights": (0.0, 0.5, 1.0),
    "progress": False,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_concept_goes_beside_the_first_person():
    assert (
        insert_concept("a wide lawn is behind a person with raised arms.", "*")
        == "a wide lawn is behind a person wearing a * with raised arms."
    )
    assert (
        insert_concept("The person  stands by a person.", "dress") == "The person wearing a dress stands by a person."
    )
    assert insert_concept("a personal view of a beach", "*") == "a person wearing a *, a personal view of a beach"


def test_rank_counts_ties_against_the_method():
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    assert [target_rank(scores, i) for i in range(4)] == [3, 1, 3, 4]
    assert target_rank(np.array([0.2, 0.2, 0.2]), 1) == 3


def test_mrr_and_recall_on_hand_computed_ranks():
    m = metrics([1, 2, 4, 10, 20])
    assert m["mrr"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 4 + 1 / 10 + 1 / 20) / 5)  # 38.0
    assert (m["r1"], m["r5"], m["r10"]) == (20.0, 60.0, 80.0)
    with pytest.raises(ValueError):
        metrics([])


def test_paired_difference_resamples_concepts(tmp_path, capsys):
    from benchmarks.diagnostics import paired

    same = pervl.paired_mrr_difference([1, 2, 3], [1, 2, 3], ["a", "a", "b"])
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0}
    shift = pervl.paired_mrr_difference([1, 1, 1, 1], [2, 2, 2, 2], ["a", "a", "b", "c"])
    assert shift == pytest.approx({"diff": 50.0, "low": 50.0, "high": 50.0})
    # concept a gains 1 - 1/4 on both its queries, b loses 1/2 - 1: mean (0.75 + 0.75 - 0.5) / 3
    a, b, groups = [1, 1, 2], [4, 4, 1], ["a", "a", "b"]
    out = pervl.paired_mrr_difference(a, b, groups, draws=2000)
    assert out["diff"] == pytest.approx(100 / 3) and out["low"] < out["diff"] < out["high"]
    assert out["low"] == pytest.approx(-50.0) and out["high"] == pytest.approx(75.0)  # all-b and all-a resamples
    assert pervl.paired_mrr_difference(a, b, groups, draws=2000) == out  # seeded
    with pytest.raises(ValueError, match="equal"):
        pervl.paired_mrr_difference([1, 2], [1], ["a", "a"])

    rows = lambda m, r: pd.DataFrame(  # noqa: E731
        {"method": m, "seed": 0, "pair_id": groups, "image_name": ["x1", "x2", "x3"], "rank": r}
    )
    pd.concat([rows("ours", a), rows("pt", b)]).to_parquet(tmp_path / "ranks.parquet")
    got = paired.main([f"{tmp_path}/ranks.parquet:ours", f"{tmp_path}/ranks.parquet:pt", "--draws", "2000"])
    assert got == out and "= +33.3" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="2 \\(method, seed\\) pairs"):
        paired.main([f"{tmp_path}/ranks.parquet", f"{tmp_path}/ranks.parquet:pt"])


def _fake_run(folder: Path, rows: dict, **config) -> Path:
    """A run's outputs as pervl writes them: {(method, seed): ranks of queries q1..qN}."""
    frames = [
        pd.DataFrame(
            {
                "method": m,
                "seed": seed,
                "pair_id": ["1", "1", "2"][: len(r)],
                "image_name": [f"q{i}" for i in range(len(r))],
                "rank": r,
                "seconds": 1.0,
                "gair_w": np.nan,
            }
        )
        for (m, seed), r in rows.items()
    ]
    ranks = pd.concat(frames, ignore_index=True)
    cfg = {**json.loads(json.dumps(pervl.asdict(BenchConfig(world="synthetic", out=str(folder))))), **config}
    split = {"name": "test", "concepts": 2, "queries": 3, "gallery": 3}
    methods = [m for m in pervl.METHODS if m in set(ranks["method"])]
    summary = pervl.summary_record(cfg, split, pervl.method_rows(ranks, methods), 5.0, {})
    pervl.write_outputs(folder, ranks, summary)
    return folder


def test_merge_makes_one_table_from_runs_of_one_protocol(tmp_path, capsys):
    a = _fake_run(tmp_path / "a", {("text", 0): [1, 2, 4], ("pt", 0): [1, 1, 2]}, seeds=[0])
    # another session: two more seeds of pt, and text's seed 0 again (the same ranks: counted once)
    b = _fake_run(tmp_path / "b", {("pt", 1): [2, 2, 2], ("pt", 2): [1, 4, 4], ("text", 0): [1, 2, 4]}, seeds=[1, 2])
    got = pervl.main(["--merge", str(a), str(b), "--out", str(tmp_path / "m")])
    pt, text = got["methods"]["pt"], got["methods"]["text"]
    per_seed = [100 * np.mean([1, 1, 0.5]), 100 * np.mean([0.5, 0.5, 0.5]), 100 * np.mean([1, 0.25, 0.25])]
    assert pt["seeds"] == [0, 1, 2] and pt["mrr"] == pytest.approx(np.mean(per_seed))
    assert pt["mrr_std"] == pytest.approx(np.std(per_seed)) and pt["n_queries"] == 3
    assert text["seeds"] == [0] and text["mrr"] == pytest.approx(100 * np.mean([1, 0.5, 0.25]))
    assert list(got["methods"]) == ["text", "pt"] and got["config"]["seeds"] == [0, 1, 2]
    table = capsys.readouterr().out
    assert f"| Prompt tuning | {pt['mrr']:.1f} ± {pt['mrr_std']:.1f} |" in table
    assert f"| Text only | {text['mrr']:.1f} | 33.3 |" in table and "merged from" in table  # one seed: no +-
    saved = pd.read_parquet(tmp_path / "m" / "ranks.parquet")
    assert len(saved) == 4 * 3 and json.loads((tmp_path / "m" / "summary.json").read_text())["merged_from"] == [
        str(a),
        str(b),
    ]

    # refused: another protocol (the field named), a (method, seed) two runs rank differently, a folder of no run
    c = _fake_run(tmp_path / "c", {("ti", 0): [1, 1, 1]}, steps={"ti": 50})
    with pytest.raises(SystemExit, match="fields \\['steps'\\]"):
        pervl.main(["--merge", str(a), str(c), "--out", str(tmp_path / "m2")])
    d = _fake_run(tmp_path / "d", {("pt", 0): [3, 3, 3]})
    with pytest.raises(SystemExit, match="pt seed 0: runs .* rank it differently"):
        pervl.main(["--merge", str(a), str(d), "--out", str(tmp_path / "m2")])
    with pytest.raises(SystemExit, match="not a benchmark output"):
        pervl.main(["--merge", str(a), str(tmp_path), "--out", str(tmp_path / "m2")])
    with pytest.raises(SystemExit, match="no option but --out"):
        pervl.main(["--merge", str(a), "--seeds", "0"])
    assert not (tmp_path / "m2").exists()  # nothing written by a refused merge


def test_shots_are_seeded_subsets():
    names = [f"{i}.jpg" for i in range(12)]
    a = sample_shots(names, 5, 0, "7")
    assert a == sample_shots(names, 5, 0, "7") and len(set(a)) == 5 and set(a) <= set(names)
    assert a == [n for n in names if n in a]  # list order kept
    assert a != sample_shots(names, 5, 1, "7") and a != sample_shots(names, 5, 0, "8")
    assert sample_shots(names[:3], 5, 0, "7") == names[:3]


def test_arguments():
    cfg = parse_args(["--world", "synthetic", "--quick"])
    assert cfg.model == "toyworld" and cfg.concepts == 10 and cfg.seeds == (0,) and cfg.methods == pervl.METHODS
    cfg = parse_args(
        [
            "--annotations",
            "a",
            "--images",
            "b",
            "--methods",
            "text,ours+gair",
            "--seeds",
            "3",
            "4",
            "--parent",
            "dress",
            "--steps",
            "7",
            "--gair-weights",
            "0:1:0.5",
        ]
    )
    assert cfg.methods == ("text", "ours+gair") and cfg.seeds == (3, 4) and cfg.parent == "dress"
    assert cfg.steps == {"pt": 7, "ti": 7, "batex": 7, "ours": 7} and cfg.gair_weights == (0.0, 0.5, 1.0)
    assert cfg.model == "ViT-L-14-quickgelu/openai" and cfg.steps != pervl.SYNTHETIC["steps"]
    with pytest.raises(SystemExit):
        parse_args(["--annotations", "a", "--images", "b", "--methods", "palavra"])
    with pytest.raises(SystemExit):
        parse_args([])  # neither real data nor the synthetic world


def test_world_set_overrides_the_synthetic_worlds_fields(tmp_path):
    cfg = parse_args(["--world", "synthetic", "--world-set", "group_sizes=[4,6]", "--world-set", "n_concepts=12"])
    assert cfg.world_overrides == {"group_sizes": [4, 6], "n_concepts": 12}
    bench = Benchmark(replace(cfg, out=str(tmp_path), concepts=0))
    split, _ = bench.load_split()
    assert len(split.pair_ids) == 12  # the overridden world was written, not the default one
    assert bench.cfg.world_preset == "pervl-v2-views"  # no --world-preset: the world the CLIP (toyworld) learnt
    named = Benchmark(replace(parse_args(["--world", "synthetic", "--world-preset", "tiny"]), out=str(tmp_path)))
    assert named.cfg.world_preset == "tiny"
    with pytest.raises(SystemExit, match="--world synthetic"):
        parse_args(["--annotations", "a", "--images", "b", "--world-set", "n_concepts=12"])
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        parse_args(["--world", "synthetic", "--world-set", "no_such_field=1"])


@pytest.mark.skipif(not PERVL.is_dir(), reason="needs ../shared/pervl (the real PerVL annotation files)")
def test_real_annotation_files_with_stand_in_images(tmp_path):
    split = read_split(PERVL, "test")
    root = tmp_path / "df2"
    rng = np.random.default_rng(0)
    paths = [fsl_image_path(root, n) for ns in split.fsl_train.values() for n in ns]
    paths += [query_image_path(root, n) for n in split.queries["image_name"]]
    (root / "train" / "image").mkdir(parents=True)
    cfg = BenchConfig(
        annotations=str(PERVL),
        images=str(root),
        out=str(tmp_path / "out"),
        methods=("text", "text+image", "pt"),
        seeds=(0,),
        steps={"pt": 1},
        **TINY,
    )
    with pytest.raises(SystemExit, match=r"874 of 874 images .* missing.*DeepFashion2"):
        Benchmark(cfg).run()
    for p in paths:
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(p)
    summary = Benchmark(cfg).run()
    assert summary["split"] == {"name": "test", "concepts": 50, "queries": 221, "gallery": 221}
    assert {m: s["n_queries"] for m, s in summary["methods"].items()} == {"text": 221, "text+image": 221, "pt": 221}
    ranks = pd.read_csv(tmp_path / "out" / "ranks.csv")
    assert len(ranks) == 3 * 221 and ranks["rank"].between(1, 221).all()
    text = ranks[ranks["method"] == "text"]
    assert text["query"].str.contains(" wearing a ").all()
    assert summary["methods"]["text"]["mrr"] == pytest.approx(100 * (1 / text["rank"]).mean())


def test_quick_synthetic_profile_gives_a_complete_table_and_resumes(tmp_path, monkeypatch, capsys):
    args = [
        "--world",
        "synthetic",
        "--world-preset",
        "tiny",
        "--quick",
        "--model",
        "tiny-random",
        "--diffusion",
        "tiny-random",
        "--steps",
        "2",
        "--gair-steps",
        "1",
        "--gair-weights",
        "0,0.5,1",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    summary = pervl.main(args)
    table = capsys.readouterr().out
    for m in pervl.METHODS:
        row = summary["methods"][m]
        assert row["n_queries"] == 12 and 0 < row["mrr"] <= 100 and f"| {pervl.METHOD_NAMES[m]} |" in table
    assert "PALAVRA | not reproduced" in table and "Ideal Words | not reproduced" in table
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["methods"]["ours"]["mrr"] == summary["methods"]["ours"]["mrr"] and saved["config"]["concepts"] == 10
    ranks = pd.read_parquet(tmp_path / "ranks.parquet")
    assert len(ranks) == 12 * len(pervl.METHODS)
    gair = ranks["method"].str.endswith("+gair")
    assert set(ranks.loc[gair, "gair_w"]) <= {0.0, 0.5, 1.0} and ranks.loc[~gair, "gair_w"].isna().all()
    assert summary["methods"]["ours+gair"]["gair_w_mean"] == pytest.approx(
        ranks.loc[ranks["method"] == "ours+gair", "gair_w"].mean()
    )

    # an interrupted or repeated run resumes from the caches: nothing is trained or generated again
    import tokens.learn

    monkeypatch.setattr(tokens.learn, "train_tokens", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr("retrieval.gair.run_gair", lambda *a, **k: pytest.fail("generated again"))
    again = pervl.main(args)
    assert {m: r["mrr"] for m, r in again["methods"].items()} == {m: r["mrr"] for m, r in summary["methods"].items()}

    # --lambda-ce (an ablation of ours' loss balance): its own tokens and ranks beside the paper's, which stay cached
    monkeypatch.undo()
    paper_key = (tmp_path / "cache" / "tokens" / "ours-seed0" / "key.json").read_text()
    ablated = pervl.main(args + ["--methods", "ours", "--lambda-ce", "0.5"])
    assert "ours' lambda_CE 0.5" in capsys.readouterr().out and ablated["config"]["lambda_ce"] == 0.5
    folder = tmp_path / "cache" / "tokens" / "ours-lambda_ce0.5-seed0"
    assert json.loads((folder / "key.json").read_text())["config"]["lambda_ce"] == 0.5
    assert (tmp_path / "cache" / "tokens" / "ours-seed0" / "key.json").read_text() == paper_key
    assert len(list((tmp_path / "cache" / "ranks").glob("ours-seed0-*.parquet"))) == 2  # one per lambda_CE
    with pytest.raises(SystemExit):
        parse_args(args + ["--lambda-ce", "-1"])
    assert parse_args(args + ["--lambda-ce", "1e-5"]).lambda_ce is None  # the paper's value: the default's cache
