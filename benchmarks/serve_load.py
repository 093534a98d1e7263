"""A bounded load test of `cli.py serve` on loopback: N concurrent clients for T seconds of text queries, then T
seconds of image queries ("more like this" by gallery id), then T seconds of text queries while `cli.py index`
commits new images into the very index folder the server serves; requests/s, p50 / p99 latency and errors per phase,
and whether the server answered with the new count without a restart (`Engine.store` switches commits between
requests).

    python -m benchmarks.serve_load --index-dir demo/index --tokens-dir demo/tokens --clients 8 --seconds 30
    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --clients 8 --seconds 15   # a server already running

Without --url it copies the index folder and its gallery to a scratch folder (the indexing phase writes there, never
into --index-dir), starts the server on the copy in a child process (its own interpreter: the clients' event loop and
the server's threads do not share a GIL), on a free port, waits until it answers, and stops it at the end. With --url
the indexing phase is left out (this script does not own that server's folder). Each client is an asyncio task with
its own HTTP connection that sends its next request when the last one is answered (a closed loop): the latencies are
those of a server kept busy by N users, not of an open-loop arrival rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image, ImageOps

TEXT_QUERIES = (
    "a person wearing a red dress",
    "a person wearing a blue striped shirt on a beach",
    "a black dress in front of a brick wall",
    "a person in a white skirt on the grass",
    "a green jacket",
    "a person wearing a pink dress in a park",
    "a yellow shirt with dots",
    "a person in a grey coat on a street",
    "an orange dress at night",
    "a purple skirt",
)
ROOT = Path(__file__).resolve().parents[1]  # the repository: cli.py is here


@dataclass
class Phase:
    name: str
    clients: int
    seconds: float  # wall time of the phase
    requests: int
    errors: int  # non-2xx answers and failed connections
    rps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    def format(self) -> str:
        return (
            f"{self.name:<10} {self.clients:>3} clients {self.seconds:5.1f} s  {self.requests:>6} requests  "
            f"{self.rps:7.1f} req/s  p50 {self.p50_ms:7.1f} ms  p99 {self.p99_ms:7.1f} ms  "
            f"max {self.max_ms:7.1f} ms  errors {self.errors}"
        )


@dataclass
class LiveIndex:
    """What the server saw while `cli.py index` committed into its folder."""

    count_before: int  # /api/info count when the index run started
    count_after: int  # after it finished
    added: int  # new images in the gallery copy
    index_seconds: float  # wall time of the `cli.py index` process (imports and model load included)
    index_rc: int  # its exit status
    seen_after_s: float | None  # seconds from its start to the first answer with the new count (None: never)
    during_load: bool  # that answer came while the clients were still sending

    @property
    def switched(self) -> bool:
        return self.count_after == self.count_before + self.added

    def format(self) -> str:
        seen = f"{self.seen_after_s:.1f} s after it started" if self.seen_after_s is not None else "never"
        return (
            f"           `cli.py index` (+{self.added} images) ran {self.index_seconds:.1f} s, exit {self.index_rc}; "
            f"/api/info count {self.count_before} -> {self.count_after} (new count seen {seen}"
            f"{', during the load' if self.during_load else ', after the load'}; "
            f"{'switched without a restart' if self.switched else 'NOT switched'})"
        )


async def run_phase(name: str, base: str, paths: list[str], clients: int, seconds: float, headers: dict) -> Phase:
    """CLIENTS closed-loop clients sending GETs of PATHS (in a random order each) for SECONDS."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(seed: int) -> None:
        nonlocal errors
        rng = random.Random(seed)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60.0) as http:
            while time.perf_counter() < deadline:
                path = rng.choice(paths)
                t0 = time.perf_counter()
                try:
                    r = await http.get(path)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - t0)
                errors += not ok

    start = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000.0 if latencies else np.zeros(1)
    return Phase(
        name,
        clients,
        round(wall, 2),
        len(latencies),
        errors,
        round(len(latencies) / wall, 1),
        round(float(np.percentile(ms, 50)), 2),
        round(float(np.percentile(ms, 99)), 2),
        round(float(ms.mean()), 2),
        round(float(ms.max()), 2),
    )


async def gallery_ids(base: str, headers: dict, k: int = 50) -> list[int]:
    """Ids to ask "more like this" of: the union of a few text queries' results."""
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60.0) as http:
        ids: set[int] = set()
        for q in TEXT_QUERIES[:4]:
            r = await http.get("/api/search", params={"q": q, "k": k})
            r.raise_for_status()
            ids.update(h["id"] for h in r.json()["results"])
    return sorted(ids)


async def served_count(base: str, headers: dict) -> int:
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=60.0) as http:
        r = await http.get("/api/info")
        r.raise_for_status()
        return int(r.json()["count"])


async def while_indexing(
    base: str,
    paths: list[str],
    clients: int,
    seconds: float,
    headers: dict,
    index_run: list[str],
    added: int,
    log: Path,
) -> tuple[Phase, LiveIndex]:
    """Text queries for SECONDS while INDEX_RUN (a `cli.py index` command on the served folder) runs; a watcher asks
    /api/info every 0.25 s for the moment the new count is served. Waits for the index run to finish (10 min at most)."""
    # 1. the count served now, then the index run, started with the clients
    before = await served_count(base, headers)
    with open(log, "wb") as out:
        child = subprocess.Popen(index_run, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    started, seen_after, ended_after = time.perf_counter(), None, None

    async def watch() -> None:
        nonlocal seen_after, ended_after
        while True:
            done = child.poll() is not None  # looked at before the count, so that the count read next is final
            if done and ended_after is None:
                ended_after = time.perf_counter() - started
            try:
                if seen_after is None and await served_count(base, headers) != before:
                    seen_after = time.perf_counter() - started
            except httpx.HTTPError:
                pass
            if done:
                return
            await asyncio.sleep(0.25)

    watcher = asyncio.create_task(watch())
    # 2. the load, as in the other phases
    phase = await run_phase("text+index", base, paths, clients, seconds, headers)
    # 3. the index run's end (the watcher's last look lands too), and the count served after it
    try:
        await asyncio.wait_for(watcher, timeout=600)
    except asyncio.TimeoutError:
        child.kill()
    after = await served_count(base, headers)
    index_seconds = ended_after if ended_after is not None else time.perf_counter() - started
    seen = round(seen_after, 2) if seen_after is not None else None
    during = seen is not None and seen <= phase.seconds
    return phase, LiveIndex(before, after, added, round(index_seconds, 2), child.wait(), seen, during)


async def load_test(
    base: str, clients: int, seconds: float, k: int, api_key: str | None, live: dict | None
) -> tuple[list[Phase], LiveIndex | None]:
    """The phases; LIVE (the `cli.py index` command, the images it adds, its log) adds the indexing phase."""
    headers = {"X-API-Key": api_key} if api_key else {}
    texts = [f"/api/search?{httpx.QueryParams({'q': q, 'k': k})}" for q in TEXT_QUERIES]
    ids = await gallery_ids(base, headers)
    images = [f"/api/similar/{i}?k={k}" for i in ids]
    # 1. warm-up (a few of each, not counted), 2. text queries, 3. image queries, 4. text queries while indexing
    await run_phase("warmup", base, texts + images, min(clients, 2), 1.0, headers)
    phases = [
        await run_phase("text", base, texts, clients, seconds, headers),
        await run_phase("image", base, images, clients, seconds, headers),
    ]
    if live is None:
        return phases, None
    phase, record = await while_indexing(base, texts, clients, seconds, headers, **live)
    return [*phases, phase], record


def scratch_copy(index_dir: Path, work: Path, new_images: int) -> tuple[Path, Path]:
    """(index, gallery): copies of INDEX_DIR and of the gallery it indexed (file times kept, so a re-index sees them
    unchanged), the gallery with NEW_IMAGES more (mirrored copies of its first images: new files, new pixels)."""
    root = Path(json.loads((index_dir / "manifest.json").read_text())["gallery_root"])
    index, gallery = work / "index", work / "gallery"
    shutil.copytree(index_dir, index)
    shutil.copytree(root, gallery)
    sources = sorted(p for p in gallery.rglob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(sources) < 1:
        raise SystemExit(f"no images in {root}, the gallery of {index_dir}")
    (gallery / "added").mkdir()
    for i in range(new_images):
        with Image.open(sources[i % len(sources)]) as im:
            ImageOps.mirror(im.convert("RGB")).rotate(90 * (i // len(sources) + 1)).save(
                gallery / "added" / f"{i:05d}.png"
            )
    return index, gallery


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, tokens_dir: Path, port: int, device: str) -> subprocess.Popen:
    """`serve` in a child interpreter (this module with --serve-only), its output to this process's stderr."""
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.serve_load",
        "--serve-only",
        "--index-dir",
        str(index_dir),
        "--tokens-dir",
        str(tokens_dir),
        "--port",
        str(port),
        "--device",
        device,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=sys.stderr)


def wait_until_up(base: str, child: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if child.poll() is not None:
            raise RuntimeError(
                f"the server exited with code {child.returncode} before answering (see its output above)"
            )
        try:
            if httpx.get(base + "/api/info", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"the server at {base} did not answer within {timeout:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index-dir", type=Path, default=Path("demo/index"))
    parser.add_argument("--tokens-dir", type=Path, default=Path("demo/tokens"))
    parser.add_argument("--url", help="load an already running server instead of starting one (no indexing phase)")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase (text, image, index)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--new-images", type=int, default=100, help="images the indexing phase adds (0: no such phase)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_only:  # the child
        from retrieval.server import serve

        serve(args.index_dir, args.tokens_dir, host="127.0.0.1", port=args.port, device=args.device, access_log=False)
        return 0
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600 or not 0 <= args.new_images <= 100_000:
        parser.error(
            "--clients 1..256, --seconds up to 600, --new-images up to 100000: the test is meant to stay bounded"
        )
    child, live, base = None, None, args.url
    work = tempfile.TemporaryDirectory(prefix="serve_load-")
    try:
        # 1. the server: the one given, or our own on a scratch copy of the index (the indexing phase writes into it)
        if base is None:
            if not (args.index_dir / "manifest.json").is_file():
                parser.error(
                    f"no index in {args.index_dir}: run `python cli.py demo --no-tokens` first, or pass --index-dir"
                )
            index_dir, gallery = scratch_copy(args.index_dir, Path(work.name), args.new_images)
            model = json.loads((index_dir / "manifest.json").read_text())["model"]
            if args.new_images:
                run = [sys.executable, "cli.py", "index", str(gallery), "--index-dir", str(index_dir), "--model", model]
                run += ["--device", args.device, "--no-progress"]
                live = {"index_run": run, "added": args.new_images, "log": Path(work.name) / "index.log"}
            port = args.port or free_port()
            base = f"http://127.0.0.1:{port}"
            child = start_server(index_dir, args.tokens_dir, port, args.device)
            wait_until_up(base, child)
        # 2. the phases
        info = httpx.get(base + "/api/info", headers={"X-API-Key": args.api_key} if args.api_key else {}).json()
        phases, record = asyncio.run(load_test(base, args.clients, args.seconds, args.k, args.api_key, live))
        if record is not None and record.index_rc != 0:
            print(live["log"].read_text(errors="replace")[-3000:], file=sys.stderr)
    finally:
        if child is not None:
            child.terminate()
            child.wait(15)
        work.cleanup()
    # 3. the table
    print(
        f"# serve load test: {base}, {info['count']} images, model {info['model']}, index {info['index']}, k={args.k}, "
        f"{os.cpu_count()} CPU(s); server, clients{' and the index run' if live else ''} on this machine"
    )
    for p in phases:
        print(p.format())
        if p.name == "text+index" and record is not None:
            print(record.format())
    if args.json is not None:
        out = {"phases": [asdict(p) for p in phases], "live_index": asdict(record) if record else None}
        args.json.write_text(json.dumps(out, indent=2))
    failed = any(p.errors for p in phases) or (record is not None and (record.index_rc != 0 or not record.switched))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
