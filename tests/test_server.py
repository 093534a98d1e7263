"""The web app's API in-process (FastAPI's TestClient) on a tiny world: a 14-image gallery indexed with the
tiny-random CLIP, tokens learned through the tiny-random diffusion model in 2-3 steps. Every endpoint, and every
bad input: unknown ids, traversal attempts, oversized and non-image uploads, bad mixes, bad API keys, hostile names."""

import io
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from retrieval import Engine
from retrieval.composed import mix
from retrieval.mix import combine
from retrieval.models.diffusion import load_diffusion
from retrieval.server import ServerConfig, check_bind, create_app
from retrieval.server.app import STATIC_DIR, bind_config
from tests.tiny import write_gallery

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HOSTILE = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(engine, root): the gallery with a hostile file name and a BMP, its index, and tokens `tok` and `evil`."""
    root = tmp_path_factory.mktemp("server")
    gallery = root / "gallery"
    write_gallery(gallery, 12)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(gallery / f"{HOSTILE}.png")
    Image.new("RGB", (40, 30), (30, 30, 200)).save(gallery / "d0" / "blue.bmp")
    engine = Engine(root / "index", tokens_dir=root / "tokens", backbone=load_diffusion("tiny-random", device="cpu"))
    engine.index(gallery, progress=False, workers=0)
    concept = root / "concept"
    concept.mkdir()
    for p in sorted(gallery.rglob("*.png"))[:3]:
        shutil.copyfile(p, concept / p.name.replace("<", "_").replace(">", "_"))
    engine.learn_token("tok", concept, "dress", progress=False, method="ti", steps=2)
    engine.learn_token("evil", concept, f"{HOSTILE} dress", progress=False, method="ti", steps=2)
    return engine, root


@pytest.fixture(scope="module")
def client(world):
    return TestClient(create_app(world[0]))


def ids_paths(engine) -> dict[str, int]:
    meta = engine.store.metadata
    return dict(zip(meta["path"], meta["id"].astype(int)))


def brute_force(engine, q: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    ids = engine.store.metadata["id"].to_numpy()
    scores = engine.store.vectors_for_ids(ids) @ q
    order = [int(ids[i]) for i in np.argsort(-scores, kind="stable") if ids[i] != exclude]
    return order[:k]


def png(size=(32, 32), colour=(10, 200, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def assert_error(r, status: int, words: str = "") -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    assert "Traceback" not in r.text and words.lower() in message.lower(), message
    return message


# ----- the page, the docs, the headers
def test_page_docs_and_security_headers(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert (
        "script-src 'self'" in csp and "unsafe-inline" not in csp and r.headers["x-content-type-options"] == "nosniff"
    )
    page = r.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "no inline script"
    assert not re.search(r"\son[a-z]+\s*=", page), "no inline event handlers"
    assert "http://" not in page and "https://" not in page, "nothing from a CDN"
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write", js.text), (
        "strings reach the page as text"
    )
    assert client.get("/static/app.css").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "content-security-policy" in docs.headers
    schema = client.get("/openapi.json").json()
    for path in schema["paths"]:
        assert path in docs.text
    for needed in (
        "/api/info",
        "/api/search",
        "/api/search/image",
        "/api/similar/{image_id}",
        "/api/images/{image_id}",
        "/api/thumbs/{image_id}",
        "/api/tokens",
        "/api/tokens/{name}",
        "/api/jobs/{job_id}",
        "/api/gair",
        "/api/gair/{run_id}/choose",
    ):
        assert needed in schema["paths"], needed
    assert_error(client.get("/api/nothing-here"), 404, "no such endpoint")
    assert client.get("/api/info").headers["content-security-policy"] == csp  # on JSON too


def test_info(client, world):
    info = client.get("/api/info").json()
    assert info["count"] == world[0].store.count == 14 and info["model"] == "tiny-random"
    assert set(info["tokens"]) >= {"tok", "evil"} and info["api_key_required"] is False


# ----- search
def test_search_words_tokens_and_bad_queries(client, world):
    engine = world[0]
    r = client.get("/api/search", params={"q": "a red dress", "k": 5}).json()
    expected = brute_force(engine, engine.clip.encode_texts(["a red dress"])[0], 5)
    assert [h["id"] for h in r["results"]] == expected and [h["rank"] for h in r["results"]] == [1, 2, 3, 4, 5]
    assert r["results"][0]["thumb"] == f"/api/thumbs/{expected[0]}"
    composed = client.get(
        "/api/search", params={"q": "a person wearing a * on the grass", "token": "tok", "k": 3}
    ).json()
    assert composed["composed"] == "a person wearing a <tok> dress on the grass" and len(composed["results"]) == 3
    assert_error(client.get("/api/search", params={"q": "a red dress", "token": "tok"}), 400, "does not use it")
    assert_error(client.get("/api/search", params={"q": "a *", "token": "nope"}), 404, "no token named 'nope'")
    assert_error(client.get("/api/search", params={"q": "a *"}), 400, "no token was given")
    assert_error(client.get("/api/search", params={"q": "a", "k": 0}), 400, "k=0")
    assert_error(client.get("/api/search", params={"q": "a", "k": 10**6}), 400, "1 to 500")
    assert_error(client.get("/api/search", params={"q": "a", "k": "many"}), 400, "k")
    assert_error(client.get("/api/search", params={"q": "  "}), 400, "expected a query")
    assert_error(client.get("/api/search"), 400, "q")


def test_mixes_of_text_gallery_images_and_uploads(client, world):
    engine = world[0]
    ids = sorted(ids_paths(engine).values())
    q = combine(
        np.array([2.0, -1.0]),
        np.stack([engine.clip.encode_texts(["a red dress"])[0], engine.store.vectors_for_ids(np.array([ids[3]]))[0]]),
    )
    r = client.get("/api/search", params={"q": f'"2:a red dress" - #{ids[3]}', "k": 4}).json()
    assert [h["id"] for h in r["results"]] == brute_force(engine, q, 4)
    assert [t["kind"] for t in r["terms"]] == ["text", "id"]
    upload = png()
    up = engine.clip.encode_pil([Image.open(io.BytesIO(upload)).convert("RGB")])[0]
    q2 = combine(np.array([1.0, 1.0]), np.stack([engine.clip.encode_texts(["a hat"])[0], up]))
    r2 = client.post(
        "/api/search",
        data={"q": '"a hat" + green.png', "k": "4"},
        files=[("images", ("green.png", upload, "image/png"))],
    )
    assert r2.status_code == 200 and [h["id"] for h in r2.json()["results"]] == brute_force(engine, q2, 4)
    composed = client.get("/api/search", params={"q": f'"a person wearing a *" + #{ids[0]}', "token": "tok"})
    assert composed.status_code == 200
    assert_error(client.get("/api/search", params={"q": '"a" + "b" hat'}), 400, "position 10")
    assert_error(client.get("/api/search", params={"q": '"a" + #99999'}), 404, "no image with id 99999")
    assert_error(client.get("/api/search", params={"q": '"a" + photo.jpg'}), 400, "no upload has that name")
    assert_error(client.get("/api/search", params={"q": '"a" - "a"'}), 400, "cancel out")
    assert_error(
        client.get("/api/search", params={"q": '"red" + #1', "token": "tok"}), 400, "no term of the mix uses it"
    )
    assert_error(
        client.post("/api/search", data={"q": '"a hat"'}, files=[("images", ("x.png", upload, "image/png"))]),
        400,
        "does not name it",
    )


def test_search_by_uploaded_image_and_more_like_this(client, world):
    engine = world[0]
    upload = png(colour=(200, 30, 30))
    r = client.post("/api/search/image", files={"image": ("red.png", upload, "image/png")}, data={"k": "3"}).json()
    q = engine.clip.encode_pil([Image.open(io.BytesIO(upload)).convert("RGB")])[0]
    assert [h["id"] for h in r["results"]] == brute_force(engine, q, 3)
    some = sorted(ids_paths(engine).values())[5]
    like = client.get(f"/api/similar/{some}", params={"k": 4}).json()
    assert some not in [h["id"] for h in like["results"]] and len(like["results"]) == 4
    assert [h["id"] for h in like["results"]] == brute_force(
        engine, engine.store.vectors_for_ids(np.array([some]))[0], 4, exclude=some
    )
    assert [h["rank"] for h in like["results"]] == [1, 2, 3, 4]
    assert_error(client.get("/api/similar/424242"), 404, "no image with id 424242")
    assert_error(client.get("/api/similar/abc"), 400, "integer")


def test_uploads_are_limited_and_decoded_safely(world):
    engine = world[0]
    small = TestClient(
        create_app(engine, ServerConfig(max_upload_bytes=2000, max_upload_pixels=64 * 64, max_request_bytes=50_000))
    )
    big_bytes = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big_bytes).save(buf, format="PNG")
    assert_error(
        small.post("/api/search/image", files={"image": ("big.png", buf.getvalue(), "image/png")}), 413, "larger than"
    )
    assert_error(
        small.post("/api/search/image", files={"image": ("wide.png", png((100, 100)), "image/png")}),
        415,
        "too many pixels",
    )
    assert_error(
        small.post("/api/search/image", files={"image": ("x.png", b"<html>not an image</html>", "image/png")}),
        415,
        "not an image",
    )
    assert_error(
        small.post("/api/search/image", files={"image": ("x.jpg", png()[:40], "image/jpeg")}), 415, "truncated"
    )
    assert_error(small.post("/api/search/image", files={"image": ("empty.png", b"", "image/png")}), 415, "empty file")
    many = [("images", (f"p{i}.png", b"x" * 1500, "image/png")) for i in range(40)]
    assert_error(small.post("/api/search", data={"q": '"a"'}, files=many), 413, "request body is larger")
    assert_error(small.post("/api/search/image"), 400, "image")


# ----- images by id only
def test_images_and_thumbnails_by_id_only(client, world):
    engine, root = world
    paths = ids_paths(engine)
    some = paths["d0/img0000.jpg"]
    full = client.get(f"/api/images/{some}")
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg"
    assert full.content == (root / "gallery" / "d0" / "img0000.jpg").read_bytes()
    bmp = client.get(f"/api/images/{paths['d0/blue.bmp']}")
    assert bmp.headers["content-type"] == "image/png" and Image.open(io.BytesIO(bmp.content)).size == (40, 30)
    thumb = client.get(f"/api/thumbs/{some}")
    assert thumb.headers["content-type"] == "image/jpeg" and max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert client.get(f"/api/meta/{some}").json()["path"] == "d0/img0000.jpg"
    assert_error(client.get("/api/images/999999"), 404, "no image with id")
    assert_error(client.get("/api/thumbs/-1"), 404, "no image with id")
    for attempt in (
        "/api/images/..%2F..%2F..%2Fetc%2Fpasswd",
        "/api/images/%2e%2e",
        "/api/thumbs/..%5C..%5Cwin.ini",
        "/api/images/0x1",
        "/api/images/%2Fetc%2Fpasswd",
        "/api/images?path=/etc/passwd",
        "/api/thumbs/1;cat%20%2Fetc%2Fpasswd",
    ):
        r = client.get(attempt)
        assert 400 <= r.status_code < 500 and r.headers["content-type"].startswith("application/json"), attempt
        assert "root:" not in r.text
    gone = client.get("/api/images/../../../../etc/passwd")  # the client may normalise the dots away: never a file
    assert gone.status_code == 404 and "root:" not in gone.text


def test_a_file_gone_from_the_gallery_is_a_clear_404(world, tmp_path):
    engine, root = world
    moved = root / "gallery" / "d1" / "img0001.png"
    some = ids_paths(engine)["d1/img0001.png"]
    client = TestClient(create_app(engine))
    shutil.move(moved, tmp_path / "away.png")
    try:
        assert_error(client.get(f"/api/images/{some}"), 404, "re-index")
    finally:
        shutil.move(tmp_path / "away.png", moved)


# ----- hostile names reach the page as text only
def test_hostile_names_are_escaped_json_never_html(client, world):
    engine = world[0]
    hostile = ids_paths(engine)[f"{HOSTILE}.png"]
    r = client.get("/api/search", params={"q": f"#{hostile}", "k": 14})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert b"<img" not in r.content and b"\\u003cimg" in r.content
    assert f"{HOSTILE}.png" in [h["path"] for h in r.json()["results"]]
    assert client.get(f"/api/meta/{hostile}").json()["path"] == f"{HOSTILE}.png"
    evil = client.get("/api/tokens/evil")
    assert evil.json()["parent"] == f"{HOSTILE} dress" and b"<img" not in evil.content
    for bad in (HOSTILE, "tok%00", "a" * 100):
        r = client.get(f"/api/tokens/{bad}")
        assert_error(r, 400, "is not allowed") and b"<img" not in r.content
    assert 400 <= client.get("/api/tokens/..%2Ftok").status_code < 500
    r = client.post("/api/tokens", data={"name": HOSTILE, "parent": "dress"})
    assert_error(r, 400, "is not allowed") and b"<img" not in r.content
    assert_error(client.get("/api/search", params={"q": "a *", "token": HOSTILE}), 400, "is not allowed")
    assert HOSTILE not in client.get("/").text


# ----- tokens
def test_tokens_list_detail_and_concept_images(client):
    listed = {t["name"]: t for t in client.get("/api/tokens").json()["tokens"]}
    assert listed["tok"]["method"] == "ti" and listed["tok"]["parent"] == "dress" and listed["tok"]["usable"]
    tok = client.get("/api/tokens/tok").json()
    assert tok["placeholder"] == "<tok>" and tok["concept_images_found"] and len(tok["images"]) == 3
    assert "concept_feature" not in tok and tok["has_concept_feature"]
    im = client.get(tok["images"][0])
    assert im.status_code == 200 and im.headers["content-type"] == "image/jpeg"
    assert_error(client.get("/api/tokens/tok/images/3"), 404, "3 concept image")
    assert_error(client.get("/api/tokens/missing"), 404, "no token named 'missing'")


def wait_for(client, job_id: str, until, timeout: float = 20.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        job = client.get(f"/api/jobs/{job_id}").json()
        if until(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} never got there: {job}")


def test_learn_a_token_from_uploads_and_gallery_ids_as_a_job(client, world):
    engine = world[0]
    ids = sorted(ids_paths(engine).values())
    files = [("images", (f"shot{i}.png", png(colour=(20 * i, 90, 90)), "image/png")) for i in range(2)]
    r = client.post(
        "/api/tokens",
        data={"name": "mine", "parent": "dress", "method": "ti", "steps": "3", "ids": str(ids[2])},
        files=files,
    )
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["state"] in ("running", "done") and job["total"] == 3 and job["token"] == "mine"
    done = wait_for(client, job["id"], lambda j: j["state"] != "running")
    assert done["state"] == "done", done
    assert done["step"] == 3 and done["result"]["token"] == "mine" and done["loss"]["L"] > 0
    assert engine.tokens.exists("mine")
    assert len(client.get("/api/tokens/mine").json()["images"]) == 3  # 2 uploads + 1 gallery image, kept for the panel
    assert done["id"] in [j["id"] for j in client.get("/api/jobs").json()["jobs"]]
    # bad requests, refused before any job starts
    assert_error(
        client.post("/api/tokens", data={"name": "mine", "parent": "dress", "ids": "1,2,3"}), 409, "already exists"
    )
    assert_error(client.post("/api/tokens", data={"name": "new", "parent": "dress", "ids": "1"}), 400, "at least 3")
    assert_error(
        client.post("/api/tokens", data={"name": "new", "parent": "dress", "method": "magic", "ids": "1,2,3"}),
        400,
        "method",
    )
    assert_error(client.post("/api/tokens", data={"name": "new", "parent": " ", "ids": "1,2,3"}), 400, "parent")
    assert_error(client.post("/api/tokens", data={"name": "new", "parent": "dress", "ids": "1,two"}), 400, "ids=")
    assert_error(
        client.post("/api/tokens", data={"name": "new", "parent": "dress", "ids": "1,2,777777"}), 404, "777777"
    )
    assert_error(
        client.post("/api/tokens", data={"name": "new", "parent": "dress", "steps": "-4", "ids": "1,2,3"}), 400, "steps"
    )
    assert_error(
        client.post(
            "/api/tokens",
            data={"name": "new", "parent": "dress", "ids": "1,2"},
            files=[("images", ("a.png", b"GIF89a-not-really", "image/png"))],
        ),
        415,
        "cannot be used",
    )
    assert_error(client.get("/api/jobs/nope"), 404, "no job")
    assert not engine.tokens.exists("new")


def test_a_running_job_reports_progress_and_can_be_cancelled(client, world):
    engine = world[0]
    ids = sorted(ids_paths(engine).values())[:3]
    r = client.post(
        "/api/tokens",
        data={"name": "long", "parent": "dress", "method": "ti", "steps": "100000", "ids": ",".join(map(str, ids))},
    )
    assert r.status_code == 202, r.text
    job = wait_for(client, r.json()["id"], lambda j: j["step"] >= 2)
    assert job["phase"] == "training" and job["total"] == 100000 and job["eta_s"] > 0 and "L" in job["loss"]
    busy = client.post(
        "/api/tokens", data={"name": "other", "parent": "dress", "method": "ti", "ids": ",".join(map(str, ids))}
    )
    assert_error(busy, 409, "still running")
    asked = client.delete(f"/api/jobs/{job['id']}")  # sets the job's Event: its on_step hook answers False
    assert asked.status_code == 202 and asked.json()["cancel_requested"]
    assert asked.json()["state"] == "done" or asked.json()["phase"].startswith("cancelling")
    gone = wait_for(client, job["id"], lambda j: j["state"] != "running", timeout=10)
    assert gone["state"] == "cancelled" and not engine.tokens.exists("long") and gone["result"] is None
    assert job["step"] <= gone["step"] < 100000  # stopped at the step after the cancel, not run to the end
    assert not list(engine.tokens.root.glob("long*"))  # no token file written
    assert not (engine.tokens.root / ".server-concepts" / "long").exists()
    assert_error(client.delete(f"/api/jobs/{job['id']}"), 409, "only a running job")


# ----- GAIR
def test_gair_images_per_w_and_choosing_another_w(client, world, monkeypatch):
    engine = world[0]
    body = {"q": "a person wearing a * on the grass", "token": "tok", "weights": [0.0, 1.0], "steps": 2, "k": 5}
    run = client.post("/api/gair", json=body).json()
    assert run["weights"] == [0.0, 1.0] and len(run["images"]) == 2 and len(run["context_images"]) == 1
    assert run["w"] == run["weights"][run["best"]] and run["chosen"] == run["w"] and len(run["scores"]) == 2
    for url in run["images"] + run["context_images"]:
        im = client.get(url)
        assert im.headers["content-type"] == "image/png" and Image.open(io.BytesIO(im.content)).size == (32, 32)
    # choosing w* again answers GAIR's own results; another w answers q(w) = w g_* + (1 - w) g_A
    same = client.post(f"/api/gair/{run['run']}/choose", json={"w": run["w"]}).json()
    assert [h["id"] for h in same["results"]] == [h["id"] for h in run["results"]]
    from retrieval.composed import composed_feature, context_features

    plan = engine.plan(body["q"], ["tok"])
    g_star, g_ctx = composed_feature(engine.clip, plan), context_features(engine.clip, plan, run["attributes"]).mean(0)
    with monkeypatch.context() as m:  # choose mixes the g_* and g_A GAIR's outcome kept: no text is encoded again
        m.setattr(engine.clip, "text_features", lambda *a, **k: pytest.fail("choose encoded a text again"))
        other = client.post(f"/api/gair/{run['run']}/choose", json={"w": 0.3}).json()
    assert other["w"] == 0.3 and other["w_star"] == run["w"] and other["nearest_image"] == 0
    assert [h["id"] for h in other["results"]] == brute_force(engine, mix(g_star, g_ctx, 0.3), 5)
    assert client.get(f"/api/gair/{run['run']}").json()["chosen"] == 0.3
    # bad requests
    assert_error(client.post(f"/api/gair/{run['run']}/choose", json={"w": 1.5}), 400, "w")
    assert_error(client.post("/api/gair/nope/choose", json={"w": 0.5}), 404, "no gair run")
    assert_error(client.get(f"/api/gair/{run['run']}/7.png"), 404, "2 images")
    assert_error(client.post("/api/gair", json={**body, "weights": [x / 40 for x in range(41)]}), 400, "at most 21")
    assert_error(client.post("/api/gair", json={**body, "weights": "0,2"}), 400, "[0, 1]")
    assert_error(client.post("/api/gair", json={**body, "q": "a person on the grass"}), 400, "does not use it")
    assert_error(client.post("/api/gair", json={**body, "steps": 10**6}), 400, "steps")
    assert_error(client.post("/api/gair", json={"q": "a *"}), 400, "token")
    assert_error(
        client.post("/api/gair", content=b"{not json", headers={"content-type": "application/json"}), 400, "json"
    )


def poll(client, url: str, until, timeout: float = 20.0) -> dict:
    end = time.time() + timeout
    while time.time() < end:
        got = client.get(url).json()
        if until(got):
            return got
        time.sleep(0.05)
    raise AssertionError(f"{url} never got there: {got}")


def test_gair_in_the_background_reports_images_done_then_the_result(client, world, monkeypatch):
    engine = world[0]
    body = {"q": "a person wearing a * on the grass", "token": "tok", "weights": [0.0, 1.0], "steps": 2, "k": 5}
    sync = client.post("/api/gair", json=body).json()  # the same run in the request (its context image now cached)
    gate, held = threading.Event(), threading.Event()
    sample = engine.backbone.sample

    def gated(*args, **kwargs):  # the sampler waits until the test has seen the run half done
        held.set()
        assert gate.wait(20)
        return sample(*args, **kwargs)

    monkeypatch.setattr(engine.backbone, "sample", gated)
    r = client.post("/api/gair", json={**body, "async": True})
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["state"] == "running" and started["images_total"] == 3 and "results" not in started
    url = f"/api/gair/{started['run']}"
    try:
        assert held.wait(20)
        mid = client.get(url).json()
        assert mid["state"] == "running" and (mid["images_done"], mid["images_total"]) == (1, 3)  # x_c from the cache
        assert_error(client.get(f"{url}/0.png"), 409, "1 / 3 images")
        assert_error(client.post(f"{url}/choose", json={"w": 0.5}), 409, "still generating")
        assert_error(client.post("/api/gair", json={**body, "async": True}), 409, "still generating")
    finally:
        gate.set()
    done = poll(client, url, lambda g: g["state"] != "running")
    assert done["state"] == "done" and done["images_done"] == done["images_total"] == 3
    assert done["w"] == sync["w"] and done["chosen"] == sync["w"] and done["composed"] == sync["composed"]
    assert done["scores"] == pytest.approx(sync["scores"], abs=1e-5)
    assert [h["id"] for h in done["results"]] == [h["id"] for h in sync["results"]]
    assert client.get(done["images"][1]).headers["content-type"] == "image/png"
    chosen = client.post(f"{url}/choose", json={"w": done["w"]}).json()
    assert [h["id"] for h in chosen["results"]] == [h["id"] for h in done["results"]]


# ----- safe by default
def test_binding_beyond_loopback_needs_an_api_key_and_the_key_is_checked(world):
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, None)
    with pytest.raises(ValueError, match="api_key"):
        check_bind("0.0.0.0", None)
    check_bind("0.0.0.0", "k")
    assert bind_config("127.0.0.1", None, 8000).allowed_hosts == ("127.0.0.1", "localhost", "::1")
    assert bind_config("0.0.0.0", "k", 8000).allowed_hosts is None
    client = TestClient(create_app(world[0], ServerConfig(api_key="s3cret")))
    assert_error(client.get("/api/info"), 401, "X-API-Key")
    assert_error(client.get("/api/info", headers={"X-API-Key": "wrong"}), 401, "wrong")
    assert_error(client.get("/api/thumbs/1"), 401, "X-API-Key")
    assert client.get("/api/info", headers={"X-API-Key": "s3cret"}).status_code == 200
    assert (
        client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    )  # the page asks for the key


def test_host_and_origin_checks(world):
    client = TestClient(create_app(world[0], bind_config("127.0.0.1", None, 8000)), base_url="http://127.0.0.1:8000")
    assert client.get("/api/info").status_code == 200
    assert_error(client.get("/api/info", headers={"host": "evil.example:8000"}), 400, "not served here")
    assert_error(
        client.post("/api/gair/x/choose", json={"w": 0.5}, headers={"origin": "http://evil.example"}),
        403,
        "another origin",
    )
    assert_error(
        client.post("/api/gair/x/choose", json={"w": 0.5}, headers={"origin": "http://127.0.0.1:8000"}),
        404,
        "no gair run",
    )


def test_a_bug_is_a_500_without_a_trace(world, monkeypatch):
    engine = world[0]
    client = TestClient(create_app(engine))
    monkeypatch.setattr(engine, "query_many", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("secret internals")))
    r = client.get("/api/search", params={"q": "a red dress"})
    assert r.status_code == 500 and r.json() == {"error": "internal server error (the server's log has the details)"}
    assert "secret" not in r.text and "content-security-policy" in r.headers


def test_cli_serve_refuses_a_public_bind_without_a_key(tmp_path):
    from cli import app

    result = CliRunner().invoke(app, ["serve", "--index-dir", str(tmp_path / "none"), "--host", "0.0.0.0"])
    assert result.exit_code == 2 and "--api-key" in result.output and "Traceback" not in result.output


def test_static_files_ship_with_the_package():
    assert {p.name for p in STATIC_DIR.iterdir()} >= {"index.html", "app.js", "app.css"}
    assert Path(STATIC_DIR, "index.html").read_text().count("/static/app.js") == 1
