"""The engine as the API: the README's notebook example runs as written; parts load once and lazily; errors come
before any model loads; generate plans its prompt as queries are planned; the CLI says library errors as flags."""

import re
import shutil
from pathlib import Path

import pytest

from benchmarks.world import world_config, write_split
from cli import flags
from retrieval import Engine, QueryError
from tests.tiny import make_token

README = Path(__file__).resolve().parents[1] / "README.md"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def readme_example() -> str:
    """The Python block under the README's "The engine" heading."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## The engine") :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A world split as a gallery (photos/) and one concept's few-shot images (photos_of_my_dress/)."""
    root = tmp_path_factory.mktemp("notebook")
    paths = write_split(root / "world", world_config("tiny", shots=(3, 4)), split="test")
    shutil.copytree(paths.images, root / "photos")
    import pandas as pd

    scenes = pd.read_csv(paths.scenes)
    first = scenes[scenes["role"] == "few-shot"]
    shots = first[first["pair_id"] == first["pair_id"].iloc[0]]["image_name"]
    (root / "photos_of_my_dress").mkdir()
    for name in shots:
        shutil.copyfile(paths.images / name, root / "photos_of_my_dress" / Path(name).name)
    return root


def test_the_readme_notebook_example_runs_as_written(photos, monkeypatch, capsys):
    code = readme_example()
    assert "from retrieval import Engine" in code and "engine.query(" in code
    monkeypatch.chdir(photos)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    engine, result = namespace["engine"], namespace["result"]
    assert engine.store.count == len(list((photos / "photos").rglob("*.jpg")))
    assert engine.tokens.exists("my-dress")
    assert result.gair is not None and 0.0 <= result.gair.w <= 1.0 and len(result.gair.images) == 11
    assert len(result.hits) == min(10, engine.store.count)
    assert str(result.gair.w) in capsys.readouterr().out


def test_models_load_once_on_first_use(tmp_path, gallery):
    engine = Engine(tmp_path / "idx", tokens_dir=tmp_path / "tok", model="tiny-random", device="cpu")
    assert engine._clip is None and engine._backbone is None  # nothing loaded by opening
    engine.index(gallery, progress=False, workers=0)
    clip = engine.clip
    assert engine.clip is clip and engine._backbone is None  # indexing and search never load the diffusion model
    hits = engine.query("a red dress", k=3).hits
    assert engine.clip is clip and len(hits) == 3


def test_errors_come_before_any_model_loads(tmp_path, gallery):
    built = Engine(tmp_path / "idx", model="tiny-random", device="cpu")
    built.index(gallery, progress=False, workers=0)
    with pytest.raises(Exception, match="built with"):
        Engine(tmp_path / "idx", model="ViT-B-32/openai")  # another model than the index's: refused at once
    engine = Engine(tmp_path / "idx", tokens_dir=tmp_path / "tok")
    assert engine.model == "tiny-random"  # the index's model by default
    with pytest.raises(QueryError, match="no token was given"):
        engine.check_queries(["a person wearing a * on a beach"])
    with pytest.raises(TypeError, match="unknown option"):
        engine.index(gallery, batch=3)
    assert engine._clip is None


def test_generate_adds_the_parent_word_and_uses_the_models_own_sampler(tiny, tmp_path):

    engine = Engine(tokens_dir=tmp_path / "tok", backbone=tiny)
    engine.tokens.save(make_token(tiny.clip, "my-dress", parent="dress"))
    seen = {}
    real = tiny.generate

    def spy(prompts, vectors=None, **kw):
        seen.update(prompts=prompts, **kw)
        return real(prompts, vectors, **kw)

    tiny.generate = spy
    try:
        out = engine.generate("a photo of a * on a beach", ["my-dress"], n=2, out=tmp_path / "grid.png")
    finally:
        tiny.generate = real
    assert out.prompt == "a photo of a <my-dress> dress on a beach" == seen["prompts"][0]
    assert seen["steps"] == tiny.sampling["steps"] and seen["guidance_scale"] == tiny.sampling["guidance_scale"]
    assert len(out.images) == 2 and out.out.is_file()


@pytest.mark.parametrize(
    "message, said",
    [
        ("pass `model=tiny-random`", "pass --model tiny-random"),
        ("use `overwrite=True` to replace it", "use --overwrite to replace it"),
        ("pass `concept_images=DIR`", "pass --concept-images DIR"),
        ("add `tokens=['my-dress']` to use it", "add --token my-dress to use it"),
        ("leave out `n_vectors`", "leave out --vectors"),
        ("plain text stays", "plain text stays"),
    ],
)
def test_the_cli_says_python_arguments_as_its_flags(message, said):
    assert flags(message) == said


def test_a_long_lived_engine_switches_to_a_newer_commit_between_queries(tmp_path, gallery):
    from tests.tiny import write_gallery

    reader = Engine(tmp_path / "idx", model="tiny-random", device="cpu")
    reader.index(gallery, progress=False, workers=0)
    before = reader.store
    assert len(reader.query("a red dress", k=100).hits) == before.count == 24
    write_gallery(gallery / "more", 3, seed=7)
    Engine(tmp_path / "idx", model="tiny-random", device="cpu").index(
        gallery, progress=False, workers=0
    )  # another writer
    assert reader.store is not before and reader.store.count == 27
    assert len(reader.query("a red dress", k=100).hits) == 27
    assert reader.store is reader.store  # unchanged manifest: the same open store
