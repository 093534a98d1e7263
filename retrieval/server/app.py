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

Background work, one at a time of each kind, each through the library's own hooks:
 - a token job (`POST /api/tokens`) runs `Engine.learn_token` in a thread; its `on_step` hook reports steps done /
   total, the loss terms and the time (hence the ETA), and cancels: `DELETE /api/jobs/{id}` sets the job's Event, the
   hook answers False at the next optimiser step, the trainer raises TrainingCancelled and no token file is written;
 - a GAIR run (`POST /api/gair`, or with `"async": true` in a thread, answered 202) reports images done / total
   through `Engine.query_many(on_image=...)`; its outcome keeps g_* and g_A, so `choose` searches any other w with
   no encoding and no image generated again.
"""

from __future__ import annotations

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

from indexes.store import IndexStoreError
from retrieval.composed import mix
from retrieval.engine import Engine
from retrieval.gair import DEFAULT_WEIGHTS, GairConfig, parse_weights
from retrieval.gallery import is_url, load_gallery_image
from retrieval.io.images import IMAGE_EXTENSIONS, BadImage, load_image
from retrieval.mix import FILE, GALLERY_ID, TEXT, parse_mix
from retrieval.search import Hit, search_vectors
from tokens.methods import METHOD_DEFAULTS, METHODS, token_train_config
from tokens.store import TokenExistsError, TokenNotFoundError
from tokens.token_file import check_name
from tokens.trainer import StepReport, TrainingCancelled

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
                root = store.manifest["gallery_root"]
                self._root = root if is_url(root) else Path(root).resolve()  # a URL gallery: read through fsspec
                self._store = store
        return store

    def check(self, image_id: int) -> None:
        self._current()
        if image_id not in self._files:
            raise ApiError(404, f"no image with id {image_id} in the index (ids come from search results)")

    @property
    def at_url(self) -> bool:
        """Whether the gallery is at an fsspec URL (s3://...): its files are read through fsspec, not served."""
        self._current()
        return isinstance(self._root, str)

    def file(self, image_id: int) -> Path:
        """The gallery file of IMAGE_ID (inside the gallery root: a path from the index never leads outside it);
        for a local gallery only (`image` reads either kind)."""
        self.check(image_id)
        if self.at_url:
            raise ApiError(409, f"image {image_id} is at {self._root}, not in a local folder")
        path = (self._root / self._files[image_id]).resolve()
        if not path.is_relative_to(self._root) or not path.is_file():
            raise ApiError(404, f"image {image_id} is in the index but its file is gone from the gallery: re-index")
        return path

    def relative_path(self, image_id: int) -> str:
        self.check(image_id)
        return self._files[image_id]

    def image(self, image_id: int, min_size: int | None = None) -> Image.Image:
        """The decoded image of IMAGE_ID, from the local folder or the URL the gallery is at (MIN_SIZE: a JPEG may
        be decoded at a reduced scale whose sides stay >= MIN_SIZE)."""
        try:
            if self.at_url:
                self.check(image_id)
                return load_gallery_image(self._root, self._files[image_id], min_size=min_size)[0]
            return load_image(self.file(image_id), min_size=min_size)
        except BadImage as e:
            raise ApiError(409, f"image {image_id} can no longer be decoded ({e.reason}): re-index") from None

    def thumbnail(self, image_id: int) -> bytes:
        key = (self._current().version, image_id)
        with self._lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = thumbnail_jpeg(self.image(image_id, min_size=self.config.thumb_size), self.config.thumb_size)
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
    return thumbnail_jpeg(im, size)


def thumbnail_jpeg(im: Image.Image, size: int) -> bytes:
    """A JPEG of IM, its longest side SIZE px."""
    im = im.copy()
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
PREPARING = "preparing: reading the photos, sampling negatives"


@dataclass
class Job:
    id: str
    name: str
    parent: str
    method: str
    total: int  # optimiser steps asked
    folder: Path  # the concept photos it learns from
    state: str = "queued"  # queued | running | done | failed | cancelled
    phase: str = "queued"  # what a running job is doing before its first step (then: training, saving)
    created: float = field(default_factory=time.time)
    finished: float | None = None
    report: StepReport | None = None  # the trainer's latest, from its on_step hook
    final_step: int | None = None  # steps behind the saved token (from its training summary)
    final_loss: dict | None = None
    error: str = ""
    result: dict | None = None
    thread: threading.Thread | None = None
    cancel: threading.Event = field(default_factory=threading.Event)  # set by DELETE; the hook answers False

    def on_step(self, report: StepReport) -> bool:
        """The trainer's hook (called in the job's thread after every optimiser step): keep its report; False once a
        cancel was asked, which stops training at this step with no token saved."""
        self.report = report  # one reference swapped: a reader sees one whole report
        return not self.cancel.is_set()

    def to_json(self) -> dict:
        running, r = self.state == "running", self.report
        if running and self.cancel.is_set():
            phase = "cancelling (at the next optimiser step)"
        elif running and r is not None:
            phase = "training" if r.step < r.steps else "saving"
        else:
            phase = self.phase if running else self.state
        step = self.final_step if self.final_step is not None else (r.step if r else 0)
        loss = self.final_loss or ({"L": r.loss, "l_SD": r.l_sd, "l_CE": r.l_ce} if r else {})
        eta = r.seconds / r.step * (r.steps - r.step) if running and r is not None and r.step else None
        end = self.finished or time.time()
        return {
            "id": self.id,
            "kind": "learn-token",
            "token": self.name,
            "parent": self.parent,
            "method": self.method,
            "state": self.state,
            "phase": phase,
            "step": step,
            "total": r.steps if r is not None else self.total,
            "loss": loss,
            "train_s": round(r.seconds, 2) if r is not None else None,
            "elapsed_s": round(end - self.created, 2),
            "eta_s": round(eta, 1) if eta is not None else None,
            "cancel_requested": self.cancel.is_set(),
            "error": self.error,
            "result": self.result,
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
            job.state, job.phase = "running", "loading the models"
            job.thread.start()
        return job

    def _run(self, job: Job, options: dict) -> None:
        try:
            # 1. the diffusion model, loaded once (a GAIR request may want it too)
            with self.models_lock:
                self.engine.backbone  # noqa: B018
            if job.cancel.is_set():  # cancelled before training began: nothing to stop
                raise TrainingCancelled(0, job.total)
            # 2. read, prepare, train (the hook reports and cancels), save
            job.phase = PREPARING
            result = self.engine.learn_token(
                job.name, job.folder, job.parent, progress=False, on_step=job.on_step, method=job.method, **options
            )
            info, t = result.token.info, result.token.info.training
            with self.lock:
                job.result = {
                    "token": info.name,
                    "path": str(result.path),
                    "training": t,
                    "skipped": [[str(p), r] for p, r in result.skipped],
                }
                job.final_step = int(t.get("steps", 0))
                job.final_loss = {"L": t.get("last_loss"), "l_SD": t.get("last_l_sd"), "l_CE": t.get("last_l_ce")}
                job.state, job.finished = "done", time.time()
        except TrainingCancelled:  # no token was saved
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

    def cancel(self, job_id: str) -> Job:
        """Ask a running job to stop: its on_step hook answers False at the next optimiser step."""
        with self.lock:
            job = self.get(job_id)
            if job.state != "running":
                raise ApiError(409, f"job {job_id} is {job.state}: only a running job can be cancelled")
            job.cancel.set()
        return job


# ----- GAIR runs kept for `choose`
@dataclass
class GairRun:
    id: str
    query: str
    token: str
    k: int
    images_total: int  # Q (|W| + n_context) images Algorithm 1 makes (context images from the cache count too)
    state: str = "running"  # running | done | failed
    images_done: int = 0
    error: str = ""
    weights: tuple[float, ...] = ()
    best: int = 0  # index of w* in weights
    g_star: np.ndarray | None = None  # (dim,) g([t, *, c]): GairOutcome.composed_feature
    g_ctx: np.ndarray | None = None  # (dim,) mean_i g([t, a_i, c]): GairOutcome.context_feature
    images: list[bytes] = field(default_factory=list)  # PNG of I(w), one per weight
    context_images: list[bytes] = field(default_factory=list)  # PNG of x_c
    summary: dict = field(default_factory=dict)  # the JSON answered when done, w*'s results included
    chosen: float | None = None

    def on_image(self, done: int, total: int) -> None:
        """GAIR's hook (`Engine.query_many(on_image=...)`), called as the sampler's batches arrive."""
        self.images_done, self.images_total = done, total

    def to_json(self) -> dict:
        progress = {"run": self.id, "state": self.state, "images_done": self.images_done}
        progress["images_total"] = self.images_total
        if self.state != "done":
            return {**progress, "query": self.query, "token": self.token, "error": self.error}
        return {**self.summary, **progress, "chosen": self.chosen if self.chosen is not None else self.summary["w"]}


class GairRequest(BaseModel):
    model_config = {"populate_by_name": True}

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
    background: bool = Field(
        False,
        alias="async",
        description="Answer 202 with the run id at once; GET /api/gair/{run} reports images done / total, then the result",
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
    gair_lock, backbone_lock, runs_lock = threading.Lock(), threading.Lock(), threading.Lock()
    gallery, jobs = Gallery(engine, config), Jobs(engine, config, backbone_lock)
    runs: OrderedDict[str, GairRun] = OrderedDict()  # changed under runs_lock
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

    def search_vector(q: np.ndarray, k: int) -> list[dict]:
        return [hit_json(h) for h in search_vectors(engine.store, q[None].astype(np.float32), k)[0]]

    def answer(q: str, k: int, tokens: list[str], uploads: dict[str, Image.Image]) -> dict:
        """A sentence (with tokens: a composed query), or a mix of texts, gallery images and uploaded images
        (`Engine.query_mix`)."""
        check_k(k)
        tokens = tokens_of(tokens)
        terms = parse_mix(q)
        plain = len(terms) == 1 and terms[0].kind == TEXT and terms[0].weight == 1.0
        if plain and not uploads:
            r = engine.query_many([terms[0].value], tokens, k=k)[0]
            out = r.to_json()
            out["results"] = [hit_json(h) for h in r.hits]
            return {**out, "query": q, "terms": [terms[0].to_json()]}
        for t in terms:  # what only the request can get wrong: an unknown id is a 404, a file name needs its upload
            if t.kind == GALLERY_ID:
                gallery.check(int(t.value))
            elif t.kind == FILE and t.value not in uploads:
                have = ", ".join(repr(n) for n in uploads) or "none"
                raise ApiError(
                    400,
                    f"the query names the file {t.value!r}, but no upload has that name (uploaded: "
                    f"{have}); send it with POST /api/search, or name a gallery image as #ID",
                )
        r = engine.query_mix(q, k=k, images=uploads, tokens=tokens)
        return {**r.to_json(), "results": [hit_json(h) for h in r.hits]}

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
            "index": store.describe(),
            "version": store.version,
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
        r = engine.query_image(decode_upload(image, config), k, name=image.filename or "upload")
        return {**r.to_json(), "results": [hit_json(h) for h in r.hits]}

    @app.get(
        "/api/similar/{image_id}", summary="More like this: the images closest to a gallery image (itself left out)"
    )
    def similar(image_id: int, k: int = 10):
        check_k(k)
        gallery.check(image_id)
        r = engine.query_image(image_id, k)
        return {**r.to_json(), "id": image_id, "results": [hit_json(h) for h in r.hits]}

    @app.get("/api/images/{image_id}", summary="The full gallery image of an id", response_class=Response)
    def full_image(image_id: int):
        if gallery.at_url:  # read through fsspec and sent as PNG
            return Response(png_bytes(gallery.image(image_id)), media_type="image/png")
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
    def gair_work(run: GairRun, body: GairRequest, gair_config: GairConfig) -> None:
        """Algorithm 1 for RUN (in the request's thread, or a background one), RUN filled in as it goes."""
        # 2. the diffusion model, loaded once (not by two requests at the same time)
        with backbone_lock:
            engine.backbone  # noqa: B018
        # 3. Algorithm 1, images done / total told to RUN (one run at a time: the heaviest thing the server does)
        with gair_lock:
            result = engine.query_many(
                [body.q],
                [body.token],
                k=run.k,
                gair=True,
                attributes=body.attributes,
                gair_config=gair_config,
                on_image=run.on_image,
            )[0]
        outcome = result.gair
        # 4. what `choose` and the image routes serve: g_* and g_A as the outcome keeps them, the images as PNG
        run.weights, run.best = tuple(outcome.weights), outcome.best
        run.g_star, run.g_ctx = outcome.composed_feature, outcome.context_feature
        run.images = [png_bytes(im) for im in outcome.images]
        run.context_images = [png_bytes(im) for im in outcome.context_images]
        run.summary = {
            "run": run.id,
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
            "images": [f"/api/gair/{run.id}/{i}.png" for i in range(len(outcome.images))],
            "context_images": [f"/api/gair/{run.id}/context/{j}.png" for j in range(len(outcome.context_images))],
            "results": [hit_json(h) for h in result.hits],
        }
        run.state = "done"  # last: whoever reads "done" finds the rest filled in

    def gair_background(run: GairRun, body: GairRequest, gair_config: GairConfig) -> None:
        try:
            gair_work(run, body, gair_config)
        except tuple(ERROR_STATUS) as e:  # the user's to fix, as the synchronous form answers it (4xx)
            run.error, run.state = getattr(e, "reason", None) or str(e), "failed"
        except Exception as e:  # noqa: BLE001 - a bug: the page gets its type, the log its trace
            log.exception("GAIR run %s failed", run.id)
            run.error, run.state = f"internal error ({type(e).__name__})", "failed"

    def keep(run: GairRun) -> None:
        """Keep RUN, dropping the oldest finished runs beyond gair_runs_kept (call under runs_lock)."""
        runs[run.id] = run
        finished = [i for i, r in runs.items() if r.state != "running"]
        for i in finished[: max(0, len(runs) - config.gair_runs_kept)]:
            del runs[i]

    @app.post(
        "/api/gair",
        summary="GAIR (Perera et al., Algorithm 1): one generated image per w, w*, the results "
        '(with "async": true a background run, answered 202)',
    )
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
        run = GairRun(secrets.token_hex(6), body.q, body.token, k, images_total=len(weights) + gair_config.n_context)
        if not body.background:  # steps 2-4 here, the answer when done
            gair_work(run, body, gair_config)
            with runs_lock:
                keep(run)
            return run.to_json()
        with runs_lock:  # one background run at a time; GET /api/gair/{run} reports it
            busy = next((r for r in runs.values() if r.state == "running"), None)
            if busy is not None:
                raise ApiError(
                    409,
                    f"GAIR run {busy.id} is still generating ({busy.images_done} / {busy.images_total} images): "
                    "wait for it",
                )
            keep(run)
        threading.Thread(
            target=gair_background, args=(run, body, gair_config), name=f"gair-{run.id}", daemon=True
        ).start()
        return SafeJSONResponse(run.to_json(), status_code=202)

    def get_run(run_id: str, done: bool = True) -> GairRun:
        """A kept run; with DONE, one whose images and features are there (else 409, saying why)."""
        run = runs.get(run_id)
        if run is None:
            raise ApiError(
                404, f"no GAIR run {run_id!r}: the server keeps the last {config.gair_runs_kept}; run GAIR again"
            )
        if done and run.state == "running":
            raise ApiError(
                409,
                f"GAIR run {run_id} is still generating ({run.images_done} / {run.images_total} images): "
                f"wait until GET /api/gair/{run_id} says done",
            )
        if done and run.state == "failed":
            raise ApiError(409, f"GAIR run {run_id} failed ({run.error}): run GAIR again")
        return run

    @app.get(
        "/api/gair/{run_id}",
        summary="A GAIR run: images done / total while it generates, its record and results when done",
    )
    def gair_get(run_id: str):
        return get_run(run_id, done=False).to_json()

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
            "results": search_vector(mix(run.g_star, run.g_ctx, run.chosen), run.k),  # g_*, g_A kept: no encoding
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
