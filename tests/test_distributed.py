"""Embedding and token learning on Ray (retrieval.distributed): the results equal a local run's, through crashes,
killed actors and URL galleries. One in-process Ray of 2 CPUs for the module; the real two-node cluster on this
machine in the slow test at the end."""

import functools
import io
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from indexes.shards import ShardInput
from indexes.store import IndexStore
from retrieval import indexer
from retrieval.gallery import GalleryFile, resolve_gallery, scan_gallery
from retrieval.indexer import IndexingConfig, embed, embed_shard, index_gallery, plan_shards
from tests.badfiles import write_bad_files
from tests.tiny import write_gallery

ray = pytest.importorskip("ray")

from retrieval.distributed import (  # noqa: E402 - after the skip: the module needs ray to run
    RayEmbedder,
    TokenJob,
    import_ray,
    learn_tokens_on_ray,
    plan_slots,
)

TINY = IndexingConfig(model="tiny-random", device="cpu", precision="fp32", batch_size=4, workers=0, shard_size=4)
FP16 = 2e-3  # embeddings are stored in float16: the Ray actors' (1 thread) and the local run's may differ by a ulp


@pytest.fixture(scope="module")
def local_ray():
    """One in-process Ray with 2 CPUs for the module (~5 s to start)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def mixed_gallery(tmp_path_factory):
    """20 good images in sub-folders and every kind of bad file (tests/badfiles.py)."""
    root = tmp_path_factory.mktemp("mixed") / "gallery"
    root.mkdir()
    write_gallery(root, 20)
    write_bad_files(root / "odd")
    return root


@pytest.fixture(scope="module")
def local_index(mixed_gallery, tmp_path_factory, tiny_encoder):
    """The gallery indexed in this process, the reference every Ray run must equal."""
    idx = tmp_path_factory.mktemp("local") / "idx"
    index_gallery(mixed_gallery, idx, TINY, progress=False, encoder=tiny_encoder)
    return IndexStore(idx)


def assert_same_index(store: IndexStore, ref: IndexStore) -> None:
    pd.testing.assert_frame_equal(store.metadata, ref.metadata)  # ids, paths, sizes, mtimes, widths, heights
    pd.testing.assert_frame_equal(store.skipped, ref.skipped)  # the same files skipped for the same reasons
    np.testing.assert_allclose(store.embeddings.astype(np.float32), ref.embeddings.astype(np.float32), atol=FP16)
    assert store.manifest["gallery_root"] == ref.manifest["gallery_root"]


def crash(number: int, shard, *, at: int, marker: str, how: str) -> None:
    """RayEmbedder's on_shard_start hook (runs in the actor): the first time shard AT starts, `exit` kills the actor
    process mid-shard (os._exit), `raise` raises out of the whole run."""
    if number != at or os.path.exists(marker):
        return
    Path(marker).write_text(str(os.getpid()))
    if how == "exit":
        os._exit(1)
    raise RuntimeError(f"simulated crash at shard {number}")


# ----- embedding
@pytest.fixture(scope="class")  # outside the class: a class-scoped fixture as a method is deprecated (pytest 9)
def embedder(local_ray, mixed_gallery, tmp_path_factory):
    """TestKeptActors' kept embedder, its actors started by a first run (an actor joins the pool once started: a
    test on a pool still starting could find all the work done by the first actor up)."""
    with RayEmbedder(keep_actors=True) as e:
        index_gallery(mixed_gallery, tmp_path_factory.mktemp("warm") / "idx", TINY, progress=False, embedder=e)
        assert e.wait_ready(timeout=600) == 2  # on a loaded machine the 2nd can still be importing torch
        yield e


class TestKeptActors:
    """The embedding tests that share one embedder whose 2 actors (1 CPU each) are kept between them (actors take
    seconds to start: torch imports in each); released at the end of the class, so later tests get the CPUs."""

    @pytest.fixture
    def hooked(self, embedder):
        """The shared embedder, its on_shard_start hook reset after the test."""
        yield embedder
        embedder.on_shard_start = None

    def test_ray_index_equals_local_index(self, hooked, mixed_gallery, local_index, tmp_path):
        s = index_gallery(mixed_gallery, tmp_path / "idx", TINY, progress=False, embedder=hooked)
        ref = local_index
        assert (s.count, len(s.skipped)) == (ref.count, len(ref.skipped)) and len(ref.skipped) >= 5
        assert_same_index(IndexStore(tmp_path / "idx"), ref)
        assert hooked.stats.actors == 2 and set(hooked.stats.done_by.values()) == {0, 1}  # both actors worked
        assert hooked.stats.retried == []
        assert not (tmp_path / "idx" / "work").exists()

    def test_resume_after_a_crash_reuses_finished_shards(self, hooked, mixed_gallery, local_index, tmp_path):
        idx = tmp_path / "idx"
        hooked.on_shard_start = functools.partial(crash, at=3, marker=str(tmp_path / "crashed"), how="raise")
        with pytest.raises(Exception, match="simulated crash at shard 3"):  # an error in the work is not retried
            index_gallery(mixed_gallery, idx, TINY, progress=False, embedder=hooked)
        finished = sorted(p.name for p in (idx / "work").glob("shard-*"))
        assert len(finished) >= 2 and "shard-000003" not in finished  # shard 3 starts after two others are written
        hooked.on_shard_start = None
        s = index_gallery(mixed_gallery, idx, TINY, progress=False, embedder=hooked)
        assert s.reused >= 2 * TINY.shard_size and s.indexed + s.reused == local_index.count
        assert_same_index(IndexStore(idx), local_index)

    def test_an_actor_killed_mid_shard_is_replaced(self, hooked, mixed_gallery, local_index, tmp_path):
        marker = tmp_path / "killed"
        hooked.on_shard_start = functools.partial(crash, at=2, marker=str(marker), how="exit")
        index_gallery(mixed_gallery, tmp_path / "idx", TINY, progress=False, embedder=hooked)
        assert marker.exists()  # the actor did die, in shard 2
        retried = hooked.stats.retried  # shard 2, and the shard queued behind it on that actor (depth 2), if any
        assert 2 in retried and len(retried) <= 2 and set(retried) <= set(hooked.stats.done_by), retried
        assert_same_index(IndexStore(tmp_path / "idx"), local_index)

    def test_url_gallery_on_ray_equals_local_folder(self, hooked, mixed_gallery, tiny_encoder, tmp_path):
        """A file:// URL takes the fsspec path (listing and reading) inside the actors; same rows as the folder."""
        url = f"file://{mixed_gallery}"
        files = scan_gallery(url)
        assert [f.path for f in files] == [f.path for f in scan_gallery(mixed_gallery)]
        todo = pd.DataFrame([(f.path, f.bytes, f.mtime_ns) for f in files], columns=["path", "bytes", "mtime_ns"])
        plan = plan_shards(todo, [], TINY, resolve_gallery(url))
        ray_out = hooked(plan, TINY, tmp_path / "ray-work", False)
        local_plan = plan_shards(todo, [], TINY, str(mixed_gallery))
        local_out = embed(local_plan, tiny_encoder, TINY, tmp_path / "local-work")
        for r, loc in zip(ray_out, local_out, strict=True):
            pd.testing.assert_frame_equal(r.metadata, loc.metadata)
            pd.testing.assert_frame_equal(r.skipped, loc.skipped)
            np.testing.assert_allclose(r.embeddings.astype(np.float32), loc.embeddings.astype(np.float32), atol=FP16)
        assert len(list((tmp_path / "ray-work").glob("shard-*"))) == len(plan.to_embed)  # written by the driver


def test_cli_index_on_ray_equals_local_index_and_frees_its_actors(local_ray, mixed_gallery, local_index, tmp_path):
    """`cli.py index --engine ray` (Engine.index -> RayEmbedder, actors released after the call) on the module's
    Ray: the local run's index, and every CPU free again after."""
    from typer.testing import CliRunner

    from cli import app

    total = ray.cluster_resources()["CPU"]
    wait_for_free_cpus(total)  # the kept actors of the tests above are being killed
    args = ["index", str(mixed_gallery), "--index-dir", str(tmp_path / "idx"), "--model", "tiny-random"]
    # one shard: one actor starts (a released pool is never larger than the work); the same rows as 4-image shards
    args += ["--device", "cpu", "--precision", "fp32", "--batch-size", "4", "--workers", "0", "--shard-size", "64"]
    r = CliRunner().invoke(app, [*args, "--engine", "ray", "--no-progress"])
    assert r.exit_code == 0, r.output
    assert f"index holds {local_index.count} images" in r.output
    assert_same_index(IndexStore(tmp_path / "idx"), local_index)
    assert wait_for_free_cpus(total) == total


def test_cli_engine_errors_are_messages(mixed_gallery, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cli import app

    base = ["index", str(mixed_gallery), "--index-dir", str(tmp_path / "idx"), "--model", "tiny-random"]
    r = CliRunner().invoke(app, [*base, "--address", "127.0.0.1:6390"])
    assert r.exit_code == 2 and "--address 127.0.0.1:6390 is for --engine ray" in r.output, r.output
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    r = CliRunner().invoke(app, [*base, "--engine", "ray"])
    assert r.exit_code == 2 and "pip install '.[ray]'" in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "idx").exists()


def wait_for_free_cpus(n: float, seconds: float = 15) -> float:
    """The free CPUs of the Ray cluster, once N are free (or after SECONDS)."""
    deadline = time.monotonic() + seconds
    while ray.available_resources().get("CPU", 0) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return ray.available_resources().get("CPU", 0)


def test_memory_gallery_is_refused_on_ray(local_ray, tmp_path):
    shard = ShardInput(
        files=pd.DataFrame(columns=["path", "bytes", "mtime_ns"]), model="tiny-random", gallery_root="memory://g"
    )
    plan = indexer.ShardPlan(reused=[], to_embed=[(0, shard)])
    with pytest.raises(ValueError, match="memory.*Ray workers cannot read it"):
        RayEmbedder()(plan, TINY, tmp_path, False)


def test_plan_slots():
    assert plan_slots({"CPU": 16.0, "GPU": 8.0}, use_gpu=True) == plan_slots({"CPU": 16, "GPU": 8}, True, 8)
    s = plan_slots({"CPU": 16.0, "GPU": 8.0}, use_gpu=True)
    assert (s.actors, s.cpus, s.gpus) == (8, 2, 1)
    s = plan_slots({"CPU": 64.0, "GPU": 2.0}, use_gpu=True)
    assert (s.actors, s.cpus, s.gpus) == (2, 5, 1)  # at most 5 CPUs each: the encoder and 4 decoders
    s = plan_slots({"CPU": 2.0}, use_gpu=False)
    assert (s.actors, s.cpus, s.gpus) == (2, 1, 0)
    assert plan_slots({"CPU": 0.5}, use_gpu=False).actors == 1  # at least one


def test_without_ray_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(ImportError, match=r"pip install '\.\[ray\]'"):
        import_ray()
    with pytest.raises(ImportError, match="Ray is not installed"):
        RayEmbedder()


# ----- URL galleries (retrieval.gallery), no Ray
def copy_to_memory(folder: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            fs.pipe(f"{url[len('memory://') :]}/{p.relative_to(folder).as_posix()}", p.read_bytes())


def test_memory_gallery_decodes_like_the_folder(mixed_gallery, tiny_encoder):
    url = "memory://gallery-decode"
    copy_to_memory(mixed_gallery, url)
    files = scan_gallery(url)
    disk = scan_gallery(mixed_gallery)
    assert [(f.path, f.bytes) for f in files] == [(f.path, f.bytes) for f in disk] and len(files) > 20
    assert all(f.mtime_ns > 1_600_000_000 * 10**9 for f in files)  # memory's "created" time, in ns

    def rows(root, listing: list[GalleryFile]):
        frame = pd.DataFrame([(f.path, f.bytes, 0) for f in listing], columns=["path", "bytes", "mtime_ns"])
        return embed_shard(ShardInput(frame, "tiny-random", root), tiny_encoder, TINY)

    got, want = rows(url, files), rows(str(mixed_gallery), disk)
    pd.testing.assert_frame_equal(got.metadata, want.metadata)
    pd.testing.assert_frame_equal(got.skipped, want.skipped)  # the same bad files, for the same reasons
    np.testing.assert_array_equal(got.embeddings, want.embeddings)  # same bytes, same process: bitwise


def test_resolve_gallery_and_missing_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_gallery("photos") == str(tmp_path.resolve() / "photos")
    assert resolve_gallery("s3://bucket/photos/") == "s3://bucket/photos"
    assert resolve_gallery(resolve_gallery("memory://g/")) == "memory://g"  # idempotent
    with pytest.raises(FileNotFoundError, match="memory://nothing-here does not exist"):
        scan_gallery("memory://nothing-here")


def test_memory_gallery_indexes(mixed_gallery, local_index, tiny_encoder, tmp_path):
    url = "memory://gallery-index"
    copy_to_memory(mixed_gallery, url)
    s = index_gallery(url, tmp_path / "idx", TINY, progress=False, encoder=tiny_encoder)
    store = IndexStore(tmp_path / "idx")
    assert s.count == local_index.count and store.manifest["gallery_root"] == url
    cols = ["id", "path", "bytes", "width", "height"]
    pd.testing.assert_frame_equal(store.metadata[cols], local_index.metadata[cols])
    np.testing.assert_array_equal(store.embeddings, local_index.embeddings)
    assert store.skipped["reason"].tolist() == local_index.skipped["reason"].tolist()
    again = index_gallery(url, tmp_path / "idx", TINY, progress=False, encoder=tiny_encoder)
    assert (again.indexed, again.unchanged) == (0, s.count)  # the URL's mtimes are stable: nothing re-embedded

    # what a user looks at: the HTML report and the server's thumbnails and full images, read through fsspec
    from fastapi.testclient import TestClient
    from PIL import Image

    from retrieval import Engine
    from retrieval.server.app import create_app

    engine = Engine(tmp_path / "idx", model="tiny-random", device="cpu")
    result = engine.query("a photo", k=3)
    page = engine.report([result], tmp_path / "r.html").read_text()
    assert page.count("data:image/jpeg;base64") == 3 and "unreadable" not in page
    client = TestClient(create_app(engine))
    first = int(store.metadata["id"].iloc[0])
    thumb = client.get(f"/api/thumbs/{first}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    full = client.get(f"/api/images/{first}")
    assert full.status_code == 200 and full.headers["content-type"] == "image/png"
    want = Image.open(mixed_gallery / store.metadata["path"].iloc[0]).convert("RGB").size
    assert Image.open(io.BytesIO(full.content)).size == want


# ----- token learning
def test_tokens_on_ray_equal_local_tokens(local_ray, tiny, tmp_path):
    import torch

    from tokens.learn import ConceptImages, learn_tokens
    from tokens.methods import token_train_config

    # method ours: both losses (l_SD through the diffusion model, l_CE against negatives); no seeds given, so the
    # concepts get config.seed + their place in the job, wherever the batches are cut
    RED, BLUE, GREY = (
        noisy_images(rgb, n, seed)
        for rgb, n, seed in [((200, 30, 30), 4, 1), ((30, 40, 200), 5, 2), ((120, 120, 120), 4, 3)]
    )
    base = dict(steps=4, n_vectors=2, lr=2e-2, batch_size=2, lambda_ce=1.0, n_negatives=2, negative_steps=2)
    concepts = [
        ConceptImages("red", "dress", RED, negatives=GREY),
        ConceptImages("blue", "coat", BLUE, negatives=GREY),
        ConceptImages("grey", "dress", GREY[:3] + RED[:1]),  # negatives sampled from the diffusion model
    ]
    jobs = [TokenJob(token_train_config("ours", seed=s, **base), concepts) for s in (0, 7)]
    local = [
        learn_tokens(tiny.clip, tiny, job.config, concepts, tmp_path / "neg-local", progress=False) for job in jobs
    ]
    # one actor (loading the tiny diffusion model takes seconds per worker process); 2 batches per job
    on_ray = learn_tokens_on_ray(
        "tiny-random",
        "tiny-random",
        jobs,
        tmp_path / "neg-ray",
        batch_size=2,
        device="cpu",
        num_actors=1,
        progress=False,
    )
    assert [[t.info.name for t in job] for job in on_ray] == [["red", "blue", "grey"]] * 2
    for want_job, got_job in zip(local, on_ray, strict=True):
        for want, got in zip(want_job, got_job, strict=True):
            torch.testing.assert_close(got.vectors, want.vectors, atol=1e-5, rtol=1e-5)
        assert [t.info.training["concepts_in_batch"] for t in got_job] == [2, 2, 1]  # in batches, not one loop of 3
    assert not torch.allclose(on_ray[0][0].vectors, on_ray[1][0].vectors)  # the seed matters: the check can fail


def write_concepts(root: Path) -> Path:
    """A folder of three concept folders (and a stray file and an empty folder, which are not concepts)."""
    for name, rgb, n in [
        ("red-mug", (200, 30, 30), 3),
        ("blue-mug", (30, 40, 200), 4),
        ("grey-mug", (120, 120, 120), 3),
    ]:
        (root / name).mkdir(parents=True)
        for i, im in enumerate(noisy_images(rgb, n, seed=len(name))):
            im.save(root / name / f"{i}.png")
    (root / "notes.txt").write_text("not a concept")
    (root / "empty").mkdir()
    return root


def test_learn_token_on_a_folder_of_concept_folders(local_ray, tmp_path):
    """`cli.py learn-token my --images concepts/`: one token per sub-folder, named my-<sub-folder>; --engine ray
    learns the same tokens on the cluster (concept batches over the workers)."""
    import torch
    from typer.testing import CliRunner

    from cli import app
    from tokens.store import TokenStore

    concepts = write_concepts(tmp_path / "concepts")
    negatives = tmp_path / "neg"
    negatives.mkdir()
    for i, im in enumerate(noisy_images((90, 160, 90), 3, seed=9)):
        im.save(negatives / f"{i}.png")
    base = ["learn-token", "my", "--images", str(concepts), "--parent", "mug", "--method", "pt", "--steps", "3"]
    base += ["--vectors", "2", "--negatives", str(negatives), "--model", "tiny-random", "--device", "cpu"]
    base += ["--no-progress", "--seed", "5"]
    runner = CliRunner()
    learned = {}
    for engine in ("local", "ray"):
        store = tmp_path / f"tokens-{engine}"
        r = runner.invoke(app, [*base, "--tokens-dir", str(store), "--engine", engine])
        assert r.exit_code == 0, r.output
        assert r.output.count("learned token 'my-") == 3, r.output
        learned[engine] = {n: TokenStore(store).load(n) for n in ("my-blue-mug", "my-grey-mug", "my-red-mug")}
        assert sorted(p.stem for p in store.glob("*.safetensors")) == sorted(learned[engine])
    for name, want in learned["local"].items():
        got = learned["ray"][name]
        torch.testing.assert_close(got.vectors, want.vectors, atol=1e-5, rtol=1e-5)
        assert got.info.concept_images == str(concepts / name[len("my-") :])
    # concept i is seeded --seed + i in folder order (blue, grey, red): the seeds differ, so the tokens do
    seeds = [learned["local"][n].info.training.get("seed") for n in ("my-blue-mug", "my-grey-mug", "my-red-mug")]
    assert seeds == [5, 6, 7], seeds
    # every name is checked before anything trains: one taken name stops the batch and nothing is written
    store = tmp_path / "tokens-local"
    (store / "my-red-mug.safetensors").unlink()
    r = runner.invoke(app, [*base, "--tokens-dir", str(store)])
    assert r.exit_code == 2 and "already exists" in r.output and "Traceback" not in r.output, r.output
    assert not (store / "my-red-mug.safetensors").exists()
    # one concept's folder is not spread over a cluster
    r = runner.invoke(app, [*base[:3], str(concepts / "red-mug"), *base[4:], "--engine", "ray"])
    assert r.exit_code == 2 and "one concept's folder" in r.output, r.output


def test_pervl_takes_engine_ray():
    from benchmarks.pervl import parse_args

    cfg = parse_args(["--world", "synthetic", "--quick", "--engine", "ray", "--address", "127.0.0.1:6390"])
    assert (cfg.engine, cfg.address) == ("ray", "127.0.0.1:6390")
    assert parse_args(["--world", "synthetic"]).engine == "local"


def noisy_images(rgb, n: int, seed: int, size: int = 32) -> list:
    """N noisy images around one colour: a concept's few shots."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(np.clip(np.array(rgb) + rng.integers(-25, 25, (size, size, 3)), 0, 255).astype(np.uint8))
        for _ in range(n)
    ]


# ----- the real two-node cluster on this machine
RAY_CLI = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]  # `ray`, of this interpreter


def start_node(*args: str, env: dict) -> subprocess.Popen:
    """`ray start --block ARGS` in a session of its own: SIGTERM to it stops that node's processes, and only them
    (`ray stop` would stop every Ray on the machine)."""
    return subprocess.Popen(
        RAY_CLI + ["start", "--block", *args],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop_node(node: subprocess.Popen) -> None:
    node.terminate()
    try:
        node.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(node.pid, signal.SIGKILL)  # its own session: the node's processes, by their group id
        node.wait(timeout=30)


@pytest.mark.slow
def test_two_node_cluster_survives_a_killed_worker(mixed_gallery, local_index, tmp_path):
    """Head + worker node (`ray start`, 1 CPU each) on 127.0.0.1:6390; the worker node's actor is SIGKILLed
    mid-shard; the index still equals the local run's. The driver is a process of its own (`two_node_driver`):
    Ray keeps the auth settings of its first connection for the life of a process."""
    # a token of this test's own, so that a stale ~/.ray/auth_token cannot refuse the connection
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    address = "127.0.0.1:6390"
    nodes = []
    try:
        nodes.append(start_node("--head", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--port", "6390",
                                "--include-dashboard=false", "--disable-usage-stats", env=env))  # fmt: skip
        up = lambda: subprocess.run(RAY_CLI + ["status", "--address", address], env=env, capture_output=True)  # noqa: E731
        assert wait_for(lambda: up().returncode == 0), "the head node did not start"
        nodes.append(start_node("--address", address, "--node-ip-address", "127.0.0.1", "--num-cpus", "1", env=env))
        driver = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from tests.test_distributed import two_node_driver as d; d(*sys.argv[1:])",
            ]
            + [address, str(mixed_gallery), str(tmp_path / "idx"), str(tmp_path / "pids")],
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            capture_output=True,
            text=True,
            timeout=400,
        )
        assert driver.returncode == 0, driver.stderr[-3000:]
        report = json.loads(driver.stdout.strip().splitlines()[-1])
        assert report["nodes"] == 2 and report["killed"] > 0
        assert report["retried"], "the killed actor's shard was not run again"
        assert_same_index(IndexStore(tmp_path / "idx"), local_index)
    finally:
        for node in reversed(nodes):
            stop_node(node)
        forget_cluster(address)


def two_node_driver(address: str, gallery: str, index_dir: str, pids: str) -> None:
    """The slow test's driver: index GALLERY on the cluster at ADDRESS, SIGKILL the worker node's actor once it has
    started a shard; print {"nodes", "killed", "retried"} as JSON."""
    ray.init(address=address, logging_level="WARNING")
    assert wait_for(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2), "the worker node did not join"
    head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
    Path(pids).mkdir()
    embedder = RayEmbedder(on_shard_start=functools.partial(record_and_wait, folder=pids))
    errors = []

    def index() -> None:
        try:
            index_gallery(gallery, index_dir, TINY, progress=False, embedder=embedder)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    run = threading.Thread(target=index)
    run.start()
    # the actor on the worker node: its pid and node id (ray.get_runtime_context) as its first shard starts
    victims: list[int] = []
    wait_for(lambda: victims.extend(on_worker_node(Path(pids), head)) or victims or not run.is_alive(), seconds=120)
    assert victims, f"no actor started a shard on the worker node ({errors})"
    os.kill(victims[0], signal.SIGKILL)
    run.join()
    if errors:
        raise errors[0]
    nodes = len([n for n in ray.nodes() if n["Alive"]])
    ray.shutdown()
    print(json.dumps({"nodes": nodes, "killed": victims[0], "retried": embedder.stats.retried}))


def forget_cluster(address: str) -> None:
    """Remove the address file `ray start --head` left (`ray stop` would): a later `ray.init("auto")` on this
    machine must not look for the stopped cluster. Only when it names this test's cluster."""
    current = Path(tempfile.gettempdir(), "ray", "ray_current_cluster")
    if current.is_file() and current.read_text().strip().endswith(":" + address.rsplit(":", 1)[1]):
        current.unlink()


def wait_for(condition, seconds: float = 60) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def on_worker_node(folder: Path, head: str) -> list[int]:
    """The pids that record_and_wait noted for a node other than the head."""
    found = []
    for f in folder.glob("*.pid"):
        pid, node = f.read_text().split()
        if node != head:
            found.append(int(pid))
    return found


def record_and_wait(number: int, shard, *, folder: str) -> None:
    """on_shard_start of the slow test: note this actor's pid and node (ray.get_runtime_context) and give each shard
    0.3 s, so that the kill lands mid-run."""
    import ray as ray_in_actor

    node = ray_in_actor.get_runtime_context().get_node_id()
    tmp = Path(folder, f"{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()} {node}")
    os.replace(tmp, tmp.with_suffix(".pid"))  # whole, for the test's thread that reads it
    time.sleep(0.3)
