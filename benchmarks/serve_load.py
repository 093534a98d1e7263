"""A bounded load test of `cli.py serve` on loopback: N concurrent clients for T seconds of text queries, then T
seconds of image queries ("more like this" by gallery id); requests/s, p50 / p99 latency and errors per phase.

    python -m benchmarks.serve_load --index-dir demo/index --tokens-dir demo/tokens --clients 8 --seconds 15
    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --clients 8 --seconds 15   # a server already running

Without --url it starts the server itself, in a child process (its own interpreter: the clients' event loop and the
server's threads do not share a GIL), on a free port, waits until it answers, and stops it at the end. Each client is
an asyncio task with its own HTTP connection that sends its next request when the last one is answered (a closed
loop): the latencies are those of a server kept busy by N users, not of an open-loop arrival rate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np

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
            f"{self.name:<6} {self.clients:>3} clients {self.seconds:5.1f} s  {self.requests:>6} requests  "
            f"{self.rps:7.1f} req/s  p50 {self.p50_ms:7.1f} ms  p99 {self.p99_ms:7.1f} ms  "
            f"max {self.max_ms:7.1f} ms  errors {self.errors}"
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


async def load_test(base: str, clients: int, seconds: float, k: int, api_key: str | None) -> list[Phase]:
    headers = {"X-API-Key": api_key} if api_key else {}
    texts = [f"/api/search?{httpx.QueryParams({'q': q, 'k': k})}" for q in TEXT_QUERIES]
    ids = await gallery_ids(base, headers)
    images = [f"/api/similar/{i}?k={k}" for i in ids]
    # 1. warm-up (a few of each, not counted), 2. text queries, 3. image queries
    await run_phase("warmup", base, texts + images, min(clients, 2), 1.0, headers)
    return [
        await run_phase("text", base, texts, clients, seconds, headers),
        await run_phase("image", base, images, clients, seconds, headers),
    ]


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
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=sys.stderr)


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
    parser.add_argument("--url", help="load an already running server instead of starting one")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=15.0, help="per phase (text, image)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    parser.add_argument("--serve-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_only:  # the child
        from retrieval.server import serve

        serve(args.index_dir, args.tokens_dir, host="127.0.0.1", port=args.port, device=args.device, access_log=False)
        return 0
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        parser.error("--clients 1..256 and --seconds up to 600: the test is meant to stay bounded")
    child = None
    base = args.url
    if base is None:
        if not (args.index_dir / "manifest.json").is_file():
            parser.error(
                f"no index in {args.index_dir}: run `python cli.py demo --no-tokens` first, or pass --index-dir"
            )
        port = args.port or free_port()
        base = f"http://127.0.0.1:{port}"
        child = start_server(args.index_dir, args.tokens_dir, port, args.device)
    try:
        if child is not None:
            wait_until_up(base, child)
        info = httpx.get(base + "/api/info", headers={"X-API-Key": args.api_key} if args.api_key else {}).json()
        phases = asyncio.run(load_test(base, args.clients, args.seconds, args.k, args.api_key))
    finally:
        if child is not None:
            child.terminate()
            child.wait(15)
    print(
        f"# serve load test: {base}, {info['count']} images, model {info['model']}, index {info['index']}, k={args.k}, "
        f"{os.cpu_count()} CPU(s); server and clients on this machine"
    )
    for p in phases:
        print(p.format())
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(p) for p in phases], indent=2))
    return 1 if any(p.errors for p in phases) else 0


if __name__ == "__main__":
    sys.exit(main())
