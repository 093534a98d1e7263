"""What the benchmark and the engine say about the paper (Perera et al.), checked against the code they describe:
the paper's DeepFashion2 command in `benchmarks/pervl.py`'s docstring, the GAIR weight grid (ours: the paper gives
none), and the section cited for GAIR's default attribute list A (Sec. 5, where the paper names it).
The cache key and auto caption fixes of the same issue are tested in test_gair.py and test_tokens.py."""

import inspect
import re
import shlex

import pytest

import retrieval.composed
from benchmarks import pervl
from benchmarks.pervl import BenchConfig, parse_args
from retrieval.composed import PAPER_ATTRIBUTES
from retrieval.engine import Engine
from retrieval.gair import DEFAULT_WEIGHTS


def paper_command() -> list[str]:
    """The arguments of the docstring's command marked "the paper's setting" (its continued lines joined)."""
    doc = pervl.__doc__
    lines = doc.splitlines()
    end = next(i for i, line in enumerate(lines) if "# the paper's setting" in line)
    start = max(i for i in range(end + 1) if lines[i].strip().startswith("python benchmarks/pervl.py"))
    text = " ".join(line.split("#")[0].rstrip().rstrip("\\") for line in lines[start : end + 1])
    return shlex.split(text)[2:]  # without "python benchmarks/pervl.py"


def test_the_docstrings_paper_command_uses_every_shot_and_the_parent_dress():
    """The paper trains on all images of each concept (PerVL's lists hold 10 to 21: --shots 21) with 'dress'."""
    cfg = parse_args(paper_command())
    assert (cfg.shots, cfg.parent) == (21, "dress")
    assert cfg.model == "ViT-L-14-quickgelu/openai" and cfg.diffusion == "sd14"


def test_the_gair_weight_grid_is_called_ours_not_the_papers(capsys):
    doc = " ".join(pervl.__doc__.split())
    defaults = re.search(r"Defaults for real data are the papers' \((.*?)\)", doc)
    assert defaults is not None and "GAIR" not in defaults.group(1) and "0.0..1.0" not in defaults.group(1)
    assert "the default grid 0.0..1.0 by 0.1" in doc and "is ours, not the paper's" in doc
    assert BenchConfig().gair_weights == DEFAULT_WEIGHTS  # the real-data default is the grid the docstring names
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "default 0:1:0.1: our grid, the paper gives no values" in help_text


def test_the_engines_default_attributes_cite_the_section_that_lists_them():
    """A is named in Sec. 5 (DeepFashion2): the engine cites it as PAPER_ATTRIBUTES' own comment does."""
    source = inspect.getsource(retrieval.composed)
    comment = source[: source.index("PAPER_ATTRIBUTES: tuple")].rsplit("\n\n", 1)[-1]
    assert "Sec. 5" in comment and '"red", "old", "worn", "bright", "dark", "pink"' in source
    doc = " ".join(Engine.attributes_for.__doc__.split())
    assert "Sec. 5" in doc and "list (Sec. 4.4)" not in doc
    assert Engine.attributes_for(None, retrieval.composed.ComposedQuery("x", ("x",), ()), None) == PAPER_ATTRIBUTES
