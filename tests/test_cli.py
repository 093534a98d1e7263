"""The CLI end to end, in-process with typer's CliRunner (and once as a subprocess)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from retrieval import Engine
from retrieval.mix import parse_mix, read_mix_files

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
FAST = ["--model", "tiny-random", "--device", "cpu", "--workers", "0", "--batch-size", "8", "--no-progress"]


@pytest.fixture
def indexed(gallery, tmp_path):
    idx = tmp_path / "idx"
    r = runner.invoke(app, ["index", str(gallery), "--index-dir", str(idx), *FAST])
    assert r.exit_code == 0, r.output
    return idx


@pytest.mark.parametrize("command", ["index", "reindex", "compact", "migrate", "query", "info", "demo"])
def test_every_command_has_help(command):
    r = runner.invoke(app, [command, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output and len(r.output) > 200


def test_index_prints_a_summary(gallery, tmp_path):
    r = runner.invoke(app, ["index", str(gallery), "--index-dir", str(tmp_path / "i"), *FAST])
    assert r.exit_code == 0, r.output
    assert "indexed 24 new or changed images" in r.output and "skipped 0 files" in r.output


def test_query_table_json_and_html(indexed, tmp_path):
    r = runner.invoke(app, ["query", "a red dress", "--index-dir", str(indexed), "--k", "3"])
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.output.splitlines() if not line.startswith("#")]
    assert [row[0] for row in rows] == ["1", "2", "3"] and all(row[2].endswith((".jpg", ".png")) for row in rows)

    r = runner.invoke(app, ["query", "a red dress", "--index-dir", str(indexed), "--k", "5", "--json"])
    obj = json.loads(r.stdout)
    assert obj["query"] == "a red dress" and obj["model"] == "tiny-random"
    assert [h["rank"] for h in obj["results"]] == [1, 2, 3, 4, 5]
    assert obj["results"] == sorted(obj["results"], key=lambda h: -h["score"])

    page = tmp_path / "r.html"
    q = tmp_path / "q.txt"
    q.write_text("a <script>alert(1)</script> dress\n\nsecond query\n")
    r = runner.invoke(
        app, ["query", "--queries", str(q), "--index-dir", str(indexed), "--k", "2", "--html", str(page), "--json"]
    )
    assert r.exit_code == 0, r.output
    assert len([line for line in r.stdout.splitlines() if line.startswith("{")]) == 2
    text = page.read_text()
    assert "<script>alert" not in text and "&lt;script&gt;" in text
    assert text.count("data:image/jpeg;base64,") == 4


def test_query_by_an_image_file(indexed, gallery):
    photo = sorted(gallery.rglob("*.png"))[0]
    r = runner.invoke(app, ["query", "--image", str(photo), "--index-dir", str(indexed), "--k", "3"])
    assert r.exit_code == 0, r.output
    rows = [line.split() for line in r.output.splitlines() if not line.startswith("#")]
    assert [row[0] for row in rows] == ["1", "2", "3"] and rows[0][2] == photo.relative_to(gallery).as_posix()
    assert f"# {photo}" in r.output
    obj = json.loads(runner.invoke(app, ["query", "--image", str(photo), "--index-dir", str(indexed), "--json"]).stdout)
    assert obj["query"] == str(photo) and obj["model"] == "tiny-random" and len(obj["results"]) == 10
    assert obj["results"][0]["path"] == photo.relative_to(gallery).as_posix() and obj["results"][0]["score"] > 0.99


def test_query_mixes_of_texts_image_files_and_gallery_ids(indexed, gallery, monkeypatch):
    photo = sorted(gallery.rglob("*.jpg"))[1]
    monkeypatch.chdir(gallery)  # a file name in a mix is a path from the working directory
    rel = photo.relative_to(gallery).as_posix()
    mix = f'"2:a red dress" + {rel} - "hat" + 0.5:#3'
    r = runner.invoke(app, ["query", mix, "--index-dir", str(indexed), "--k", "4", "--json"])
    assert r.exit_code == 0, r.output
    obj = json.loads(r.stdout)
    assert [t["kind"] for t in obj["terms"]] == ["text", "file", "text", "id"]
    assert [t["weight"] for t in obj["terms"]] == [2.0, 1.0, -1.0, 0.5] and obj["query"] == mix
    engine = Engine(indexed)
    expected = engine.query_mix(mix, k=4, images=read_mix_files(parse_mix(mix)))
    assert [h["id"] for h in obj["results"]] == [h.id for h in expected.hits]
    table = runner.invoke(app, ["query", mix, "--index-dir", str(indexed), "--k", "4"])
    assert table.exit_code == 0 and "#   mix: +2 x text a red dress  +1 x file " + rel in table.output
    assert len([line for line in table.output.splitlines() if not line.startswith("#")]) == 4


def test_image_and_mix_errors_are_messages_not_tracebacks(indexed, tmp_path):
    (tmp_path / "fake.jpg").write_bytes(b"this is not a JPEG")
    idx = ["--index-dir", str(indexed)]
    cases = [
        (["query", "--image", str(tmp_path / "gone.png"), *idx], "cannot use --image"),
        (["query", "--image", str(tmp_path / "gone.png"), *idx], "unreadable file"),
        (["query", "--image", str(tmp_path / "fake.jpg"), *idx], "not an image"),
        (["query", "a dress", "--image", str(tmp_path / "fake.jpg"), *idx], "not both"),
        (["query", f'"a dress" + {tmp_path / "fake.jpg"}', *idx], "cannot be used: not an image"),
        (["query", '"a dress" + #424242', *idx], "no image with id 424242"),
        (["query", '"a dress" hat', *idx], "position 10"),
        (["query", '"a * dress" + #1', "--gair", *idx], "--gair takes sentences"),
        (["query", '"a * dress" + #1', *idx], "--token NAME"),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_info(indexed):
    r = runner.invoke(app, ["info", "--index-dir", str(indexed)])
    assert r.exit_code == 0 and '"model": "tiny-random"' in r.output and "images: 24" in r.output


def test_reindex(indexed):
    r = runner.invoke(app, ["reindex", "--index-dir", str(indexed), "--index-type", "ivf"])
    assert r.exit_code == 0, r.output
    assert '"index_type": "ivf"' in r.output


def test_a_second_writer_is_told_who_holds_the_index(indexed, gallery):
    import os

    from indexes.locking import WriterLock

    with WriterLock(indexed, purpose="indexing /photos"):
        for argv in (
            ["index", str(gallery), "--index-dir", str(indexed), *FAST],
            ["compact", "--index-dir", str(indexed)],
        ):
            r = runner.invoke(app, argv)
            assert r.exit_code == 2 and "Traceback" not in r.output, r.output
            assert f"being written by pid {os.getpid()}" in r.output and "--wait" in r.output
    r = runner.invoke(app, ["compact", "--index-dir", str(indexed), "--full", "--wait"])
    assert r.exit_code == 0 and "nothing to merge" in r.output  # one segment already


def test_compact_merges_the_segments_of_two_runs(indexed, gallery):
    from indexes.store import read_manifest
    from tests.tiny import write_gallery

    write_gallery(gallery / "more", 3, seed=5)
    r = runner.invoke(app, ["index", str(gallery), "--index-dir", str(indexed), *FAST])
    assert r.exit_code == 0 and "(2 segments: flat x2)" in r.output, r.output
    r = runner.invoke(app, ["compact", "--index-dir", str(indexed), "--full"])
    assert r.exit_code == 0 and "in 1 segment(s)" in r.output, r.output
    assert len(read_manifest(indexed)["segments"]) == 1
    r = runner.invoke(app, ["migrate", "--index-dir", str(indexed)])  # format 2 already: left as it is
    assert r.exit_code == 0 and "index format 2" in r.output, r.output


def test_errors_are_messages_not_tracebacks(indexed, tmp_path):
    cases = [
        (["query", "x", "--index-dir", str(tmp_path / "nothing")], "no index in"),
        (["query", "x", "--index-dir", str(indexed), "--model", "ViT-B-32/openai"], "built with --model tiny-random"),
        (["query", "--index-dir", str(indexed)], "give a query"),
        (["info", "--index-dir", str(tmp_path / "nothing")], "no index in"),
        (
            ["index", str(REPO / "README.md")],
            "Invalid value for 'gallery_dir'",
        ),  # typer's check; the box may wrap long paths
        (
            ["index", str(tmp_path), "--index-dir", str(tmp_path / "j"), "--model", "Nope-1/openai", "--no-progress"],
            "unknown open_clip architecture",
        ),
    ]
    for args, message in cases:
        r = runner.invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert message in r.output, (args, r.output)
        assert "Traceback" not in r.output


def test_python_cli_and_console_script_are_one_app():
    out = subprocess.run([sys.executable, "cli.py", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "index" in out.stdout and "query" in out.stdout
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"personal-retrieval": "cli:app"}


@pytest.mark.slow  # ~13 s; its parts (index, query, learn, GAIR) have fast tests in test_cli, test_tokens, test_gair
def test_demo_runs_end_to_end_and_reruns_incrementally(tmp_path):
    args = [
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--no-progress",
        "--token-steps",
        "2",
        "--sample-steps",
        "2",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "indexed 591 new or changed images" in r.output and r.output.count("# a person wearing") == 4
    page = (tmp_path / "demo" / "results.html").read_text()
    assert page.count("data:image/jpeg;base64,") == 4 * 5
    # step 5: a token for concept 1 (a sweater, 4 evaluation captions), ranks three ways, the GAIR report
    assert "custom token 'concept-1' for concept 1 (parent 'sweater'), learned from its few-shot images in" in r.output
    rows = [line.split() for line in r.output.splitlines() if line.strip().startswith("words only:")]
    assert len(rows) == 4 and all(1 <= int(row[2]) <= 591 and 1 <= int(row[4]) <= 591 for row in rows)
    assert r.output.count("(answer: train/image/") == 4 + 4
    gair = (tmp_path / "demo" / "gair.html").read_text()
    assert gair.count("class=chosen") == 4 and gair.count("w = 0.5") == 4 and "concept image 1" in gair
    assert (tmp_path / "demo" / "tokens" / "concept-1.safetensors").is_file()
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and "indexed 0 new or changed images" in r.output and "kept 591 unchanged" in r.output
    assert "(reused from the last run)" in r.output


def test_demo_starts_afresh_when_its_models_changed(tmp_path):
    from benchmarks.demo import DEMO_STAMP, start_afresh_if_stale
    from benchmarks.world import world_config

    out, world = tmp_path / "demo", world_config("pervl")
    # a demo folder from before the stamp: a toy-world split, an index, a token, pages; and a file of the user's
    for d in ("world", "index", "tokens", "concept-1"):
        (out / d).mkdir(parents=True)
    (out / "world" / "toyworld_config.json").write_text("{}")
    (out / "results.html").write_text("old")
    (out / "notes.txt").write_text("mine")
    assert start_afresh_if_stale(out, world, "tiny-random")
    assert sorted(p.name for p in out.iterdir()) == [DEMO_STAMP, "notes.txt"]  # only the demo's own entries went
    # the same models again: nothing is cleared
    (out / "index").mkdir()
    assert not start_afresh_if_stale(out, world, "tiny-random") and (out / "index").is_dir()
    # another model, or another world: cleared
    assert start_afresh_if_stale(out, world, "toyworld") and not (out / "index").exists()
    (out / "index").mkdir()
    assert start_afresh_if_stale(out, world_config("pervl-v2-views"), "toyworld") and not (out / "index").exists()
    # a folder that never held a demo is left alone
    other = tmp_path / "photos"
    (other / "index").mkdir(parents=True)
    assert not start_afresh_if_stale(other, world, "tiny-random") and (other / "index").is_dir()
