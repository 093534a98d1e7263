"""The web app: a JSON API and a page over ONE engine (`retrieval.engine.Engine`), loaded once and kept warm.

    app = create_app(Engine("my.index", tokens_dir="my_tokens"))   # an ASGI app (FastAPI)
    serve("my.index", "my_tokens", host="127.0.0.1", port=8000)      # what `cli.py serve` runs

The endpoints are listed at /docs (rendered here from the OpenAPI schema at /openapi.json: no CDN, no inline
script). Every route is a thin caller of the engine, as the CLI is (STYLE.md 14).

Safe by default:
 - it binds 127.0.0.1; any other address needs an API key, and then every /api request carries `X-API-Key`;
   on loopback the Host header must be a loopback name (a DNS-rebinding page cannot read the API), and a request
   that changes something (POST, DELETE) from a page of another origin is refused;
 - images are served by gallery id from the index, never by a path the client sends; uploads are limited in bytes
   (per file and per request) and pixels, and decoded by the indexer's safe decoder (retrieval.io.images);
 - every response carries a Content-Security-Policy without inline scripts; JSON escapes <, > and & so that no
   string is ever HTML; the page writes every string with textContent;
 - errors are JSON {"error": message} with a 4xx status (500 with no detail for a bug: the trace goes to the log).

Workarounds for what the layers below do not offer yet (each says so where it is used):
 - the token trainer has no progress or cancel hook: a job's steps, loss and ETA are read from its tqdm bar
   (`_trainer_bar`), and cancelling raises an exception in the job's thread (`_raise_in_thread`);
 - GAIR's outcome keeps q(w*) but not g_* and g_A: `POST /api/gair` recomputes both (two text encodings, no image)
   so that `choose` can search any other w without generating again.
"""

from __future__ import annotations

import ctypes
import hmac
import html
import io
import ipaddress
import json
import logging
import math
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from tqdm import tqdm

from indexes.store import IndexStoreError
from retrieval.composed import STAR, composed_feature, context_features, mix
from retrieval.engine import Engine
from retrieval.gair import DEFAULT_WEIGHTS, GairConfig, parse_weights
from retrieval.io.images import IMAGE_EXTENSIONS, BadImage, load_image
from retrieval.search import Hit, search_vectors
from retrieval.server.mix import FILE, GALLERY_ID, Term, combine, parse_mix
from tokens.methods import METHOD_DEFAULTS, METHODS, token_train_config
from tokens.store import TokenExistsError, TokenNotFoundError
from tokens.token_file import check_name

STATIC_DIR = Path(__file__).parent / "static"
CONCEPTS_DIR = ".server-concepts"  # under the token store: the photos a token was learned from in the page
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger("retrieval.server")

# No inline script or style anywhere; images from this origin, and the blob: URLs the page makes for images
# fetched with an API key.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-resource-policy": "same-origin",
}


@dataclass(frozen=True)
class ServerConfig:
    api_key: str | None = None  # when set, every /api request needs the header X-API-Key
    allowed_hosts: tuple[str, ...] | None = None  # Host header names accepted (None: any); loopback binds set them
    max_upload_bytes: int = 16 * 2**20  # one uploaded file
    max_request_bytes: int = 64 * 2**20  # one request body (all its files)
    max_upload_pixels: int = 40_000_000  # one uploaded image (a 40-megapixel photo); the indexer's default is larger
    max_uploads: int = 24  # files in one request
    max_k: int = 500  # results per query
    thumb_size: int = 256  # longest side of a thumbnail, px
    thumb_cache: int = 2048  # thumbnails kept in memory
    gair_runs_kept: int = 8  # GAIR outcomes kept for `choose` and their images (oldest dropped)
    max_gair_weights: int = 21  # weights in one GAIR request
    max_gair_steps: int = 200  # sampler steps in one GAIR request
    max_token_steps: int = 100_000  # optimiser steps of one token job
    jobs_kept: int = 32  # finished jobs listed


# ----- errors: always JSON {"error": message}
class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class BodyTooLarge(HTTPException):
    """Raised while the body is read (FastAPI re-raises HTTPExceptions from body parsing as they are)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than {limit // 2**20} MiB: send fewer or smaller files")


def _json_safe(x: Any) -> Any:
    """Non-finite floats -> None (JSON has no NaN); numpy scalars -> Python numbers; containers recursively."""
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    if isinstance(x, np.integer):
        return int(x)
    return x


class SafeJSONResponse(JSONResponse):
    """JSON in which <, > and & are escaped (\\u003c...): no string of it is ever HTML, whatever reads it."""

    def render(self, content: Any) -> bytes:
        text = json.dumps(_json_safe(content), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").encode("utf-8")


def error(status: int, message: str) -> SafeJSONResponse:
    return SafeJSONResponse({"error": message}, status_code=status)


# The library's errors are the user's to fix (as the CLI treats them): their message, with this status.
ERROR_STATUS: dict[type[Exception], int] = {
    TokenNotFoundError: 404,
    TokenExistsError: 409,
    IndexStoreError: 409,
    BadImage: 415,
    ValueError: 400,  # QueryError, MixError, TokenFileError and the engine's argument errors
    KeyError: 400,
}


def library_error(request: Request, exc: Exception) -> SafeJSONResponse:
    if isinstance(exc, ApiError):
        return error(exc.status, exc.message)
    status = next(ERROR_STATUS[t] for t in type(exc).__mro__ if t in ERROR_STATUS)
    message = getattr(exc, "reason", None) or (str(exc).strip("'\"") if isinstance(exc, KeyError) else str(exc))
    return error(status, message)


class Guard:
    """ASGI middleware in front of everything: security headers on every response; Host, Origin, API key and body
    size checks; a bug becomes a 500 with no detail (its trace goes to the log)."""

    def __init__(self, app, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def send_secured(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for k, v in SECURITY_HEADERS.items():
                    headers[k] = v
                if scope["path"].startswith("/api/") and "cache-control" not in headers:
                    headers["cache-control"] = "no-store"
            await send(message)

        refused = self.refusal(scope)
        if refused is not None:
            return await refused(scope, receive, send_secured)
        limit, seen = self.config.max_request_bytes, 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        try:
            await self.app(scope, counted_receive, send_secured)
        except BodyTooLarge as e:
            if started:
                raise
            await error(413, e.detail)(scope, receive, send_secured)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await error(500, "internal server error (the server's log has the details)")(scope, receive, send_secured)

    def refusal(self, scope) -> Response | None:
        """The response refusing this request before it reaches a route, or None."""
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
        if self.config.allowed_hosts is not None and name not in self.config.allowed_hosts:
            return error(
                400, f"Host {host!r} is not served here (this server answers {', '.join(self.config.allowed_hosts)})"
            )
        origin = headers.get("origin")
        if scope["method"] not in ("GET", "HEAD", "OPTIONS") and origin is not None and origin != "null":
            if origin.split("://", 1)[-1] != host:
                return error(403, f"a page of another origin ({origin}) may not change anything here")
        if scope["path"].startswith("/api/") and self.config.api_key:
            given = headers.get("x-api-key", "")
            if not hmac.compare_digest(given.encode(), self.config.api_key.encode()):
                return error(
                    401,
                    "this server needs an API key: send it in the X-API-Key header"
                    + (" (the one sent is wrong)" if given else ""),
                )
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.config.max_request_bytes:
            return error(
                413,
                f"the request body is larger than {self.config.max_request_bytes // 2**20} MiB: "
                "send fewer or smaller files",
            )
        return None


# ----- the gallery: images by id, never by a client's path
class Gallery:
    """The id -> file map of the index the engine holds, and a cache of thumbnails."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.config = engine, config
        self._store, self._files, self._root = None, {}, None
        self._thumbs: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def _current(self):
        store = self.engine.store
        if store is not self._store:  # the engine reopened its index (a new generation)
            with self._lock:
                self._files = dict(zip(store.metadata["id"].astype(int).tolist(), store.metadata["path"].tolist()))
                self._root = Path(store.manifest["gallery_root"]).resolve()
                self._store = store
        return store

    def check(self, image_id: int) -> None:
        self._current()
        if image_id not in self._files:
            raise ApiError(404, f"no image with id {image_id} in the index (ids come from search results)")

    def file(self, image_id: int) -> Path:
        """The gallery file of IMAGE_ID (inside the gallery root: a path from the index never leads outside it)."""
        self.check(image_id)
        path = (self._root / self._files[image_id]).resolve()
        if not path.is_relative_to(self._root) or not path.is_file():
            raise ApiError(404, f"image {image_id} is in the index but its file is gone from the gallery: re-index")
        return path

    def relative_path(self, image_id: int) -> str:
        self.check(image_id)
        return self._files[image_id]

    def vector(self, image_id: int) -> np.ndarray:
        self.check(image_id)
        return self.engine.store.vectors_for_ids(np.array([image_id]))[0]  # (dim,)

    def image(self, image_id: int) -> Image.Image:
        try:
            return load_image(self.file(image_id))
        except BadImage as e:
            raise ApiError(409, f"image {image_id} can no longer be decoded ({e.reason}): re-index") from None

    def thumbnail(self, image_id: int) -> bytes:
        key = (str(self._current().gen_dir), image_id)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = thumbnail_bytes(self.file(image_id), self.config.thumb_size)
        with self._lock:
            self._thumbs[key] = data
            while len(self._thumbs) > self.config.thumb_cache:
                self._thumbs.popitem(last=False)
        return data


def thumbnail_bytes(path: Path, size: int) -> bytes:
    """A JPEG of the image at PATH, its longest side SIZE px (decoded at a reduced scale when it can be)."""
    try:
        im = load_image(path, min_size=size)
    except BadImage as e:
        raise ApiError(409, f"{path.name}: {e.reason}") from None
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


FULL_IMAGE_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
}  # served as they are; BMP and TIFF are re-encoded as PNG


def decode_upload(upload: UploadFile, config: ServerConfig) -> Image.Image:
    """An uploaded file -> RGB image, within the byte and pixel limits, by the indexer's safe decoder."""
    name = upload.filename or "upload"
    data = upload.file.read(config.max_upload_bytes + 1)
    if len(data) > config.max_upload_bytes:
        raise ApiError(413, f"upload {name!r} is larger than {config.max_upload_bytes // 2**20} MiB")
    with tempfile.NamedTemporaryFile(suffix=".upload") as f:
        f.write(data)
        f.flush()
        try:
            return load_image(f.name, max_pixels=config.max_upload_pixels)
        except BadImage as e:
            raise ApiError(415, f"upload {name!r} cannot be used: {e.reason}") from None


def hit_json(h: Hit) -> dict:
    return {
        "rank": h.rank,
        "score": round(h.score, 6),
        "path": h.path,
        "id": h.id,
        "thumb": f"/api/thumbs/{h.id}",
        "image": f"/api/images/{h.id}",
    }


# ----- token jobs: one at a time, in a thread
class JobCancelled(Exception):
    """Raised in a job's thread by `DELETE /api/jobs/{id}`."""


def _raise_in_thread(thread: threading.Thread, exc_type: type[BaseException]) -> bool:
    """Raise EXC_TYPE in THREAD at its next Python bytecode (CPython's PyThreadState_SetAsyncExc). The trainer has no
    cancel hook, so this is how a job stops: between two torch calls, its `with` blocks and `finally`s unwinding."""
    if thread.ident is None or not thread.is_alive():
        return False
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc_type))
    if hit > 1:  # never expected: undo
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), None)
    return hit == 1


def _trainer_bar(method: str) -> dict | None:
    """The live tqdm bar of `tokens.trainer.train_tokens` (desc "<method> x1"), as its format_dict, or None.
    The trainer takes no progress callback: its bar is the one place its step and loss terms are visible."""
    with tqdm.get_lock():
        bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        if str(getattr(bar, "desc", "")).startswith(f"{method} x"):
            return dict(bar.format_dict)
    return None


def _losses(postfix: str | None) -> dict:
    """'L=1.137, l_CE=0.0000, l_SD=1.1373' (the trainer's bar postfix) -> {"L": 1.137, ...}."""
    out = {}
    for part in (postfix or "").split(","):
        key, _, value = part.strip().partition("=")
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


@dataclass
class Job:
    id: str
    name: str
    parent: str
    method: str
    total: int  # optimiser steps asked
    folder: Path  # the concept photos it learns from
    state: str = "queued"  # queued | running | done | failed | cancelled
    created: float = field(default_factory=time.time)
    finished: float | None = None
    step: int = 0
    loss: dict = field(default_factory=dict)
    train_seconds: float = 0.0  # time inside the training loop (from the trainer's bar)
    seen_bar: bool = False
    error: str = ""
    result: dict | None = None
    thread: threading.Thread | None = None
    cancel_requested: bool = False

    def observe(self) -> None:
        """Update step, loss and time from the trainer's bar while it runs."""
        if self.state != "running":
            return
        bar = _trainer_bar(self.method)
        if bar is not None:
            self.seen_bar = True
            self.step, self.total = int(bar.get("n") or 0), int(bar.get("total") or self.total)
            self.loss = _losses(bar.get("postfix")) or self.loss
            self.train_seconds = float(bar.get("elapsed") or 0.0)

    def to_json(self) -> dict:
        self.observe()
        running = self.state == "running"
        phase = (
            "training"
            if running and self.seen_bar and self.step < self.total
            else "saving"
            if running and self.seen_bar
            else "preparing: reading the photos, loading models, sampling negatives"
            if running
            else self.state
        )
        eta = (self.train_seconds / self.step * (self.total - self.step)) if running and self.step else None
        end = self.finished or time.time()
        return {
            "id": self.id,
            "kind": "learn-token",
            "token": self.name,
            "parent": self.parent,
            "method": self.method,
            "state": self.state,
            "phase": phase,
            "step": self.step,
            "total": self.total,
            "loss": self.loss,
            "elapsed_s": round(end - self.created, 2),
            "eta_s": round(eta, 1) if eta is not None else None,
            "error": self.error,
            "result": self.result,
            "progress_from": "the trainer's progress bar (tokens/ offers no progress callback)",
        }


class Jobs:
    """Token-learning jobs, one running at a time."""

    def __init__(self, engine: Engine, config: ServerConfig, models_lock: threading.Lock):
        self.engine, self.config, self.models_lock = engine, config, models_lock
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.RLock()  # held by a request from its busy check to its job's start

    def running(self) -> Job | None:
        return next((j for j in self.jobs.values() if j.state in ("queued", "running")), None)

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise ApiError(404, f"no job {job_id!r} (jobs: {', '.join(self.jobs) or 'none'})")
        return self.jobs[job_id]

    def start(self, job: Job, options: dict) -> Job:
        with self.lock:
            busy = self.running()
            if busy is not None:
                raise ApiError(409, f"job {busy.id} (token {busy.name!r}) is still running: wait for it or cancel it")
            self.jobs[job.id] = job
            finished = [k for k, j in self.jobs.items() if j.finished is not None]
            for k in finished[: max(0, len(self.jobs) - self.config.jobs_kept)]:
                del self.jobs[k]
            job.thread = threading.Thread(target=self._run, args=(job, options), name=f"job-{job.id}", daemon=True)
            job.state = "running"
            job.thread.start()
        return job

    def _run(self, job: Job, options: dict) -> None:
        try:
            try:
                with self.models_lock:  # the diffusion model, loaded once (a GAIR request may want it too)
                    self.engine.backbone  # noqa: B018
                result = self.engine.learn_token(
                    job.name, job.folder, job.parent, progress=True, method=job.method, **options
                )
                info = result.token.info
                with self.lock:
                    job.result = {
                        "token": info.name,
                        "path": str(result.path),
                        "training": info.training,
                        "skipped": [[str(p), r] for p, r in result.skipped],
                    }
                    t = info.training
                    job.step = int(t.get("steps", job.step))
                    job.loss = {"L": t.get("last_loss"), "l_SD": t.get("last_l_sd"), "l_CE": t.get("last_l_ce")}
                    job.state, job.finished = "done", time.time()
            except JobCancelled:
                with self.lock:
                    job.state, job.finished = "cancelled", time.time()
                shutil.rmtree(job.folder, ignore_errors=True)
            except (ValueError, KeyError, TypeError, FileNotFoundError, NotADirectoryError, IndexStoreError) as e:
                with self.lock:
                    job.state, job.error, job.finished = "failed", str(e), time.time()
                shutil.rmtree(job.folder, ignore_errors=True)
            except Exception as e:  # noqa: BLE001 - a bug: the page gets its type, the log its trace
                log.exception("token job %s failed", job.id)
                with self.lock:
                    job.state, job.error, job.finished = "failed", f"internal error ({type(e).__name__})", time.time()
        except JobCancelled:  # the cancel arrived after the job had finished: it stays finished
            pass

    def cancel(self, job_id: str) -> Job:
        with self.lock:
            job = self.get(job_id)
            if job.state != "running":
                raise ApiError(409, f"job {job_id} is {job.state}: only a running job can be cancelled")
            job.cancel_requested = True
            _raise_in_thread(job.thread, JobCancelled)
        return job


# ----- GAIR runs kept for `choose`
@dataclass
class GairRun:
    id: str
    query: str
    token: str
    k: int
    weights: tuple[float, ...]
    best: int  # index of w* in weights
    g_star: np.ndarray  # (dim,) g([t, *, c])
    g_ctx: np.ndarray  # (dim,) mean_i g([t, a_i, c])
    images: list[bytes]  # PNG of I(w), one per weight
    context_images: list[bytes]  # PNG of x_c
    summary: dict  # the JSON answered (without results)
    chosen: float | None = None


class GairRequest(BaseModel):
    q: str = Field(..., description="The query with * where the token goes, e.g. 'a person wearing a * on the grass'")
    token: str = Field(..., description="The custom token's name")
    weights: list[float] | str = Field(
        "0:1:0.1", description="The w of Algorithm 1: a list, '0,0.5,1' or start:stop:step"
    )
    steps: int | None = Field(None, description="Sampler steps (default: the diffusion model's)")
    k: int = Field(10, description="Results")
    seed: int = Field(0, description="Noise seed: every w uses the same noise")
    attributes: list[str] | None = Field(
        None, description="Context words A (default: the token's own, else the paper's)"
    )


class ChooseRequest(BaseModel):
    w: float = Field(..., ge=0.0, le=1.0, description="The weight to search with: q(w) = w g_* + (1 - w) g_A")


# ----- the app
def create_app(engine: Engine, config: ServerConfig = ServerConfig()) -> FastAPI:
    """The FastAPI app answering for ENGINE (which it shares between requests: load it once, before)."""
    app = FastAPI(
        title="personal-retrieval",
        version="1",
        docs_url=None,
        redoc_url=None,
        default_response_class=SafeJSONResponse,
        description="Search a gallery by text, image and custom tokens; learn tokens; see GAIR's queries.",
    )
    gair_lock, backbone_lock = threading.Lock(), threading.Lock()
    gallery, jobs = Gallery(engine, config), Jobs(engine, config, backbone_lock)
    runs: OrderedDict[str, GairRun] = OrderedDict()  # changed under gair_lock
    app.state.engine, app.state.jobs, app.state.runs = engine, jobs, runs

    # 1. errors as JSON
    for exc_type in (ApiError, *ERROR_STATUS):
        app.add_exception_handler(exc_type, library_error)

    @app.exception_handler(StarletteHTTPException)
    def http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if exc.status_code != 404 or exc.detail != "Not Found" else "no such endpoint (see /docs)"
        return error(exc.status_code, str(message))

    @app.exception_handler(RequestValidationError)
    def invalid(request: Request, exc: RequestValidationError):
        parts = [
            f"{'.'.join(str(x) for x in e.get('loc', ()) if x not in ('body', 'query', 'path'))}: {e.get('msg')}"
            for e in exc.errors()
        ]
        return error(400, "bad request: " + "; ".join(parts))

    app.add_middleware(Guard, config=config)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def check_k(k: int) -> int:
        if not 1 <= k <= config.max_k:
            raise ApiError(400, f"k={k}: ask for 1 to {config.max_k} results")
        return k

    def tokens_of(names: list[str]) -> list[str]:
        for n in names:
            check_name(n)
        return names

    def search_vector(q: np.ndarray, k: int, exclude: int | None = None) -> list[dict]:
        hits = search_vectors(engine.store, q[None].astype(np.float32), k + (exclude is not None))[0]
        kept = [h for h in hits if h.id != exclude][:k]
        return [{**hit_json(h), "rank": r + 1} for r, h in enumerate(kept)]

    def answer(q: str, k: int, tokens: list[str], uploads: dict[str, Image.Image]) -> dict:
        """A sentence (with tokens: a composed query), or a mix of text, gallery images and uploaded images."""
        check_k(k)
        tokens = tokens_of(tokens)
        terms = parse_mix(q)
        plain = len(terms) == 1 and terms[0].kind == "text" and terms[0].weight == 1.0
        if plain and not uploads:
            r = engine.query_many([terms[0].value], tokens, k=k)[0]
            out = r.to_json()
            out["results"] = [hit_json(h) for h in r.hits]
            return {**out, "query": q, "terms": [terms[0].to_json()]}
        named = {t.value for t in terms if t.kind == FILE}
        unused = sorted(set(uploads) - named)
        if unused:
            raise ApiError(
                400,
                f"uploaded {unused[0]!r} but the query does not name it: write {unused[0]} in the query "
                '(e.g. "a red dress" + photo.jpg)',
            )
        vectors = [term_vector(t, tokens, uploads) for t in terms]
        used = {n for t in terms if t.kind == "text" for n in token_names_in(t.value, tokens)}
        if set(tokens) - used:
            raise ApiError(
                400,
                f"token {sorted(set(tokens) - used)[0]!r} is given but no term of the mix uses it: "
                'write * in a quoted term, e.g. "a person wearing a *" + #12',
            )
        qv = combine(np.array([t.weight for t in terms]), np.stack(vectors))
        return {
            "query": q,
            "model": engine.model,
            "tokens": tokens,
            "terms": [t.to_json() for t in terms],
            "results": search_vector(qv, k),
        }

    def token_names_in(text: str, tokens: list[str]) -> list[str]:
        named = [n for n in tokens if f"<{n}>" in text]
        return named or (list(tokens) if STAR in text else [])

    def term_vector(term: Term, tokens: list[str], uploads: dict[str, Image.Image]) -> np.ndarray:
        if term.kind == GALLERY_ID:
            return gallery.vector(int(term.value))
        if term.kind == FILE:
            if term.value not in uploads:
                have = ", ".join(repr(n) for n in uploads) or "none"
                raise ApiError(
                    400,
                    f"the query names the file {term.value!r}, but no upload has that name (uploaded: "
                    f"{have}); send it with POST /api/search, or name a gallery image as #ID",
                )
            return engine.clip.encode_pil([uploads[term.value]])[0]
        used = token_names_in(term.value, tokens)
        if used or STAR in term.value:
            return composed_feature(engine.clip, engine.plan(term.value, used))
        return engine.clip.encode_texts([term.value])[0]

    # 2. the page and the docs
    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return HTMLResponse(docs_html(app.openapi()))

    # 3. the API
    @app.get("/api/info", summary="The index, the models and the server's limits")
    def info():
        store = engine.store
        return {
            "model": engine.model,
            "diffusion": engine.diffusion,
            "count": store.count,
            "dim": store.manifest["dim"],
            "index": store.manifest["index"]["params"].get("index_type"),
            "generation": store.manifest.get("generation"),
            "tokens": engine.tokens.names(),
            "methods": list(METHODS),
            "gair_weights": list(DEFAULT_WEIGHTS),
            "api_key_required": bool(config.api_key),
            "limits": {
                "max_k": config.max_k,
                "max_upload_bytes": config.max_upload_bytes,
                "max_request_bytes": config.max_request_bytes,
                "max_upload_pixels": config.max_upload_pixels,
                "max_uploads": config.max_uploads,
                "max_gair_weights": config.max_gair_weights,
                "max_gair_steps": config.max_gair_steps,
                "max_token_steps": config.max_token_steps,
            },
        }

    @app.get("/api/search", summary="Search by words, custom tokens (* or <name>) or a mix of texts and gallery images")
    def search_get(q: str, k: int = 10, token: Annotated[list[str], Query()] = []):  # noqa: B006 - FastAPI reads it
        return answer(q, k, token, {})

    @app.post("/api/search", summary='Search: as GET, plus uploaded images named in the mix ("a dress" + photo.jpg)')
    def search_post(
        q: Annotated[str, Form()],
        k: Annotated[int, Form()] = 10,
        token: Annotated[list[str], Form()] = [],  # noqa: B006
        images: Annotated[list[UploadFile], File()] = [],
    ):  # noqa: B006
        return answer(q, k, token, read_uploads(images))

    def read_uploads(images: list[UploadFile]) -> dict[str, Image.Image]:
        if len(images) > config.max_uploads:
            raise ApiError(413, f"{len(images)} files: send at most {config.max_uploads}")
        out = {}
        for u in images:
            name = u.filename or ""
            if name in out:
                raise ApiError(400, f"two uploads are named {name!r}: rename one")
            out[name] = decode_upload(u, config)
        return out

    @app.post("/api/search/image", summary="Search by an uploaded image")
    def search_image(image: Annotated[UploadFile, File()], k: Annotated[int, Form()] = 10):
        check_k(k)
        im = decode_upload(image, config)
        return {
            "query": image.filename or "upload",
            "model": engine.model,
            "results": search_vector(engine.clip.encode_pil([im])[0], k),
        }

    @app.get(
        "/api/similar/{image_id}", summary="More like this: the images closest to a gallery image (itself left out)"
    )
    def similar(image_id: int, k: int = 10):
        check_k(k)
        return {
            "query": f"#{image_id}",
            "model": engine.model,
            "id": image_id,
            "results": search_vector(gallery.vector(image_id), k, exclude=image_id),
        }

    @app.get("/api/images/{image_id}", summary="The full gallery image of an id", response_class=Response)
    def full_image(image_id: int):
        path = gallery.file(image_id)
        media = FULL_IMAGE_TYPES.get(path.suffix.lower())
        if media is not None:
            return FileResponse(path, media_type=media, headers={"cache-control": "private, max-age=300"})
        return Response(png_bytes(gallery.image(image_id)), media_type="image/png")

    @app.get("/api/thumbs/{image_id}", summary="A JPEG thumbnail of a gallery image", response_class=Response)
    def thumb(image_id: int):
        return Response(
            gallery.thumbnail(image_id), media_type="image/jpeg", headers={"cache-control": "private, max-age=300"}
        )

    @app.get("/api/meta/{image_id}", summary="A gallery image's path and links")
    def meta(image_id: int):
        gallery.check(image_id)
        return {
            "id": image_id,
            "path": gallery.relative_path(image_id),
            "thumb": f"/api/thumbs/{image_id}",
            "image": f"/api/images/{image_id}",
        }

    # custom tokens
    @app.get("/api/tokens", summary="The tokens of the token store")
    def tokens_list():
        out = []
        for e in engine.tokens.entries():
            i = e.info
            out.append(
                {"name": e.name, "readable": i is not None, "problem": e.problem}
                if i is None
                else {
                    "name": i.name,
                    "readable": True,
                    "method": i.method,
                    "parent": i.parent,
                    "n_vectors": i.n_vectors,
                    "model": i.model,
                    "usable": i.model == engine.model,
                    "created": i.created,
                }
            )
        return {"tokens": out}

    def concept_files(info) -> list[Path]:
        folder = Path(info.concept_images) if info.concept_images else None
        if folder is None or not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)

    @app.get("/api/tokens/{name}", summary="A token's metadata and its concept images")
    def token_info(name: str):
        info = engine.tokens.info(check_name(name))
        meta = {k: v for k, v in asdict(info).items() if k != "concept_feature"}
        files = concept_files(info)
        return {
            **meta,
            "placeholder": info.placeholder,
            "usable": info.model == engine.model,
            "has_concept_feature": bool(info.concept_feature),
            "concept_images_found": bool(files),
            "images": [f"/api/tokens/{name}/images/{i}" for i in range(min(len(files), 16))],
        }

    @app.get(
        "/api/tokens/{name}/images/{index}", summary="Thumbnail of a token's concept image", response_class=Response
    )
    def token_image(name: str, index: int):
        files = concept_files(engine.tokens.info(check_name(name)))
        if not 0 <= index < min(len(files), 16):
            raise ApiError(404, f"token {name!r} has {len(files)} concept image(s) to show")
        return Response(thumbnail_bytes(files[index], config.thumb_size), media_type="image/jpeg")

    @app.post(
        "/api/tokens",
        status_code=202,
        summary="Learn a token from uploaded photos and/or gallery ids (a background job)",
    )
    def learn(
        name: Annotated[str, Form()],
        parent: Annotated[str, Form()],
        method: Annotated[str, Form()] = "ours",
        steps: Annotated[int | None, Form()] = None,
        ids: Annotated[str, Form()] = "",
        n_negatives: Annotated[int | None, Form()] = None,
        negative_steps: Annotated[int | None, Form()] = None,
        images: Annotated[list[UploadFile], File()] = [],
    ):  # noqa: B006
        # 1. check the request before anything is written
        check_name(name)
        engine.tokens.check_free(name)
        if method not in METHODS:
            raise ApiError(400, f"method={method!r}: choose one of {', '.join(METHODS)}")
        parent = " ".join(parent.split())
        if not parent:
            raise ApiError(400, "parent is empty: give the concept's parent word, e.g. dress")
        if steps is not None and not 0 <= steps <= config.max_token_steps:
            raise ApiError(400, f"steps={steps}: give 0 to {config.max_token_steps}")
        overrides = {
            k: v for k, v in (("n_negatives", n_negatives), ("negative_steps", negative_steps)) if v is not None
        }
        if any(v < 1 or v > 1000 for v in overrides.values()):
            raise ApiError(400, "n_negatives and negative_steps must be 1 to 1000")
        try:
            gallery_ids = [int(x) for x in ids.replace(",", " ").split()]
        except ValueError:
            raise ApiError(400, f"ids={ids!r}: give gallery ids separated by commas, e.g. 3,17,42") from None
        for i in gallery_ids:
            gallery.check(i)
        need = token_train_config(method).min_images
        if len(images) + len(gallery_ids) < need:
            raise ApiError(
                400,
                f"{len(images) + len(gallery_ids)} photo(s) given: a token needs at least {need} "
                "(upload photos of the concept, or select gallery results)",
            )
        photos = list(read_uploads(images).values()) + [gallery.image(i) for i in gallery_ids]
        with jobs.lock:  # no other request writes a concepts folder or starts a job meanwhile
            if jobs.running() is not None:
                raise ApiError(409, "a token job is still running: wait for it or cancel it")
            # 2. the photos, re-encoded, in the store's concepts folder (the token remembers it: its panel shows them)
            folder = engine.tokens.root / CONCEPTS_DIR / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            for i, im in enumerate(photos):
                im.save(folder / f"{i:03d}.png")
            # 3. the job
            total = steps if steps is not None else METHOD_DEFAULTS[method]["steps"]
            job = Job(secrets.token_hex(4), name, parent, method, total, folder)
            jobs.start(job, {"steps": steps, **({"overrides": overrides} if overrides else {})})
        return job.to_json()

    @app.get("/api/jobs", summary="Token jobs, the latest last")
    def jobs_list():
        return {"jobs": [j.to_json() for j in jobs.jobs.values()]}

    @app.get("/api/jobs/{job_id}", summary="A job's state: steps done / total, loss, ETA")
    def job_get(job_id: str):
        return jobs.get(job_id).to_json()

    @app.delete("/api/jobs/{job_id}", status_code=202, summary="Cancel a running job")
    def job_cancel(job_id: str):
        return jobs.cancel(job_id).to_json()

    # GAIR
    @app.post("/api/gair", summary="GAIR (Perera et al., Algorithm 1): one generated image per w, w*, the results")
    def gair(body: GairRequest):
        # 1. check the request
        k = check_k(body.k)
        check_name(body.token)
        weights = (
            parse_weights(body.weights) if isinstance(body.weights, str) else tuple(float(w) for w in body.weights)
        )
        if len(weights) > config.max_gair_weights:
            raise ApiError(400, f"{len(weights)} weights: give at most {config.max_gair_weights}")
        if body.steps is not None and not 1 <= body.steps <= config.max_gair_steps:
            raise ApiError(400, f"steps={body.steps}: give 1 to {config.max_gair_steps}")
        gair_config = GairConfig(weights=weights, steps=body.steps, seed=body.seed)
        engine.check_queries([body.q], [body.token], gair=True)
        with backbone_lock:
            engine.backbone  # noqa: B018 - loaded once, not by two requests at the same time
        # 2. Algorithm 1 (one run at a time: it is the heaviest thing the server does)
        with gair_lock:
            result = engine.query_many(
                [body.q], [body.token], k=k, gair=True, attributes=body.attributes, gair_config=gair_config
            )[0]
        outcome = result.gair
        # 3. g_* and g_A, for choosing another w without generating again
        plan = engine.plan(body.q, [body.token])
        g_star = composed_feature(engine.clip, plan)
        g_ctx = context_features(engine.clip, plan, result.attributes).mean(0)
        run_id = secrets.token_hex(6)
        summary = {
            "run": run_id,
            "query": body.q,
            "composed": result.composed,
            "token": body.token,
            "attributes": list(result.attributes),
            "weights": list(outcome.weights),
            "best": outcome.best,
            "w": outcome.w,
            "scores": [round(float(s), 6) for s in outcome.scores],
            "concept_similarity": [round(float(s), 6) for s in outcome.concept_similarity],
            "context_similarity": [round(float(s), 6) for s in outcome.context_similarity],
            "images": [f"/api/gair/{run_id}/{i}.png" for i in range(len(outcome.images))],
            "context_images": [f"/api/gair/{run_id}/context/{j}.png" for j in range(len(outcome.context_images))],
        }
        kept = GairRun(
            run_id,
            body.q,
            body.token,
            k,
            tuple(outcome.weights),
            outcome.best,
            g_star,
            g_ctx,
            [png_bytes(im) for im in outcome.images],
            [png_bytes(im) for im in outcome.context_images],
            summary,
        )
        with gair_lock:
            runs[run_id] = kept
            while len(runs) > config.gair_runs_kept:
                runs.popitem(last=False)
        return {**summary, "chosen": outcome.w, "results": [hit_json(h) for h in result.hits]}

    def get_run(run_id: str) -> GairRun:
        if run_id not in runs:
            raise ApiError(
                404, f"no GAIR run {run_id!r}: the server keeps the last {config.gair_runs_kept}; run GAIR again"
            )
        return runs[run_id]

    @app.get("/api/gair/{run_id}", summary="A GAIR run's record")
    def gair_get(run_id: str):
        run = get_run(run_id)
        return {**run.summary, "chosen": run.chosen if run.chosen is not None else run.summary["w"]}

    @app.get(
        "/api/gair/{run_id}/{index}.png", summary="The image generated for the index-th w", response_class=Response
    )
    def gair_image(run_id: str, index: int):
        run = get_run(run_id)
        if not 0 <= index < len(run.images):
            raise ApiError(404, f"GAIR run {run_id} has {len(run.images)} images (0 to {len(run.images) - 1})")
        return Response(run.images[index], media_type="image/png")

    @app.get("/api/gair/{run_id}/context/{index}.png", summary="A context image x_c", response_class=Response)
    def gair_context(run_id: str, index: int):
        run = get_run(run_id)
        if not 0 <= index < len(run.context_images):
            raise ApiError(404, f"GAIR run {run_id} has {len(run.context_images)} context images")
        return Response(run.context_images[index], media_type="image/png")

    @app.post("/api/gair/{run_id}/choose", summary="Search again with the w you choose: q(w) = w g_* + (1 - w) g_A")
    def gair_choose(run_id: str, body: ChooseRequest):
        run = get_run(run_id)
        run.chosen = float(body.w)
        nearest = int(np.argmin([abs(w - body.w) for w in run.weights]))
        return {
            "run": run_id,
            "w": run.chosen,
            "w_star": run.weights[run.best],
            "nearest_image": nearest,
            "results": search_vector(mix(run.g_star, run.g_ctx, run.chosen), run.k),
        }

    return app


# ----- /docs: the OpenAPI schema as a page (FastAPI's Swagger UI loads from a CDN and runs inline script)
def docs_html(schema: dict) -> str:
    e = html.escape
    rows = []
    for path, ops in schema.get("paths", {}).items():
        for method, op in ops.items():
            params = [
                f"{p['name']} ({p['in']}{', required' if p.get('required') else ''})" for p in op.get("parameters", [])
            ]
            body = op.get("requestBody", {}).get("content", {})
            for media, spec in body.items():
                ref = spec.get("schema", {}).get("$ref", "")
                props = (
                    schema.get("components", {})
                    .get("schemas", {})
                    .get(ref.rsplit("/", 1)[-1], {})
                    .get("properties", {})
                )
                params.append(f"body {media}: {', '.join(props) or 'see openapi.json'}")
            rows.append(
                f"<tr><td class=method>{e(method.upper())}</td><td><code>{e(path)}</code></td>"
                f"<td>{e(op.get('summary', ''))}</td><td>{e('; '.join(params))}</td></tr>"
            )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>personal-retrieval API</title>"
        '<link rel=icon href="data:,"><link rel=stylesheet href=/static/app.css></head><body class=docs><h1>personal-retrieval API</h1>'
        f"<p>{e(schema.get('info', {}).get('description', ''))} The machine-readable schema: "
        '<a href=/openapi.json>/openapi.json</a>. Errors are JSON <code>{"error": message}</code>. '
        "With an API key, send it as the <code>X-API-Key</code> header.</p>"
        "<table><tr><th>method</th><th>path</th><th>what</th><th>parameters</th></tr>"
        + "".join(rows)
        + "</table><p><a href=/>back to the search page</a></p></body></html>"
    )


# ----- running it
def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to serve beyond this machine without an API key."""
    if not is_loopback(host) and not api_key:
        raise ValueError(
            f"`host={host}` is not a loopback address: anyone who can reach it could search the gallery "
            "and learn tokens; pass `api_key=KEY` (every /api request then needs the X-API-Key header), "
            "or bind `host=127.0.0.1`"
        )


def bind_config(host: str, api_key: str | None, port: int) -> ServerConfig:
    """The config for a bind: on loopback without a key the Host header must name the loopback too (DNS rebinding)."""
    check_bind(host, api_key)
    allowed = None if api_key or not is_loopback(host) else tuple(LOOPBACK_NAMES)
    return ServerConfig(api_key=api_key or None, allowed_hosts=allowed)


def warm(engine: Engine) -> None:
    """Load the CLIP and the index, and answer one query, before the first request comes."""
    engine.query("a photo", k=1)


def serve(
    index_dir: str | Path,
    tokens_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    model: str | None = None,
    diffusion: str = "auto",
    device: str = "auto",
    access_log: bool = True,
) -> None:
    """Open the engine once and serve the page and the API on HOST:PORT until interrupted (ACCESS_LOG: one line per
    request on stdout; benchmarks turn it off)."""
    import uvicorn

    config = bind_config(host, api_key, port)  # 1. refuse an unsafe bind before any model loads
    engine = Engine(index_dir, tokens_dir, model=model, diffusion=diffusion, device=device)  # 2. the engine, once
    warm(engine)
    app = create_app(engine, config)
    shown = f"[{host}]" if ":" in host else host
    print(
        f"serving {engine.store.count} images of {index_dir} on http://{shown}:{port}/  (API: http://{shown}:{port}/docs)",
        flush=True,
    )
    uvicorn.run(
        app, host=host, port=port, log_level="info", access_log=access_log, server_header=False
    )  # 3. until Ctrl-C
