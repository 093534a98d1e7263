"""The code's shape, checked by tools: the import layers (import-linter's contracts in pyproject.toml; README,
"Layers"), nothing below the CLI imports `cli`, no test file imports another, and ruff's lint and format checks.
Each takes under a second; the tools come with the `test` extra (pip install -e ".[test]")."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("retrieval", "tokens", "indexes", "benchmarks")  # everything below cli.py


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept():
    """`lint-imports` (its console script, run through this Python so PATH does not matter)."""
    out = run_tool("-c", "from importlinter.cli import lint_imports_command; lint_imports_command()", "--no-cache")
    kept = out.returncode == 0 and "0 broken" in out.stdout
    assert kept, out.stdout + out.stderr


def imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in a module, at any depth: `import a.b` gives a.b,
    `from a import b` gives a.b, importlib.import_module("a") / __import__("a") with a literal name gives a."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


def test_imported_modules_finds_every_form():
    source = (
        "import cli\nfrom cli import app\ndef f():\n    import cli.x\nimportlib.import_module('cli')\nfrom . import x"
    )
    assert imported_modules(ast.parse(source)) == [(1, "cli"), (2, "cli.app"), (4, "cli.x"), (5, "cli")]


def test_nothing_below_the_cli_imports_it():
    """cli.py is the top layer; import-linter takes packages only, so this test checks the single-file module."""
    offenders = []
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, module in imported_modules(tree):
                if module == "cli" or module.startswith("cli."):
                    offenders.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not offenders, (
        "the CLI is the top layer; move what these need out of cli.py into the library:\n" + "\n".join(offenders)
    )


def test_no_test_file_imports_another():
    """Shared test code lives in helper modules (tests/tiny.py, tests/badfiles.py) and fixtures in conftest.py,
    so a test file can be run, moved or deleted on its own."""
    offenders = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        for line, module in imported_modules(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            parts = module.split(".")
            if parts[0] == "tests" and len(parts) > 1 and parts[1].startswith("test_"):
                offenders.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not offenders, "move what these share into a helper module under tests/:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("check",), id="lint"),
        pytest.param(("format", "--check", "--diff"), id="format"),
    ],
)
def test_ruff(args):
    """`ruff check .` and `ruff format --check .` (the settings are in pyproject.toml, [tool.ruff]); to fix:
    `ruff check --fix .` and `ruff format .`."""
    out = run_tool("-m", "ruff", *args, "--no-cache", ".")
    passed = out.returncode == 0
    assert passed, out.stdout[:8000] + out.stderr[-2000:]
