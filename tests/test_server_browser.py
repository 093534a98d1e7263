"""The page in a real browser: a uvicorn server (in a thread, on a free loopback port) over a tiny world, driven by
Debian's Chromium through Playwright. Type a query, see thumbnails, open one, "more like this", pick a token, run
GAIR (2 weights, 1 step), see one image per w, choose another w, see the results re-rendered with it, learn a token
with the progress bar, reproduce a search from its link; no console error (CSP), no dialog (XSS). A screenshot is
saved in tmp_path, and in $SCREENSHOT_DIR/server-screenshot.png when that is set.

Skipped only where /usr/bin/chromium is absent (`.ci/run` installs it: apt-get install chromium)."""

import contextlib
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from retrieval import Engine
from retrieval.models.diffusion import load_diffusion
from retrieval.server import ServerConfig, create_app
from retrieval.server.app import bind_config
from tests.tiny import write_gallery

CHROMIUM = Path("/usr/bin/chromium")
HOSTILE = "<img src=x onerror=alert(1)>"
pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium)"
    ),
    pytest.mark.usefixtures("one_torch_thread"),
]
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """An engine over a 12-image gallery (one hostile file name) with a token `tok`."""
    root = tmp_path_factory.mktemp("browser")
    gallery = root / "gallery"
    write_gallery(gallery, 11)
    Image.new("RGB", (48, 48), (220, 40, 40)).save(gallery / f"{HOSTILE}.png")
    engine = Engine(root / "index", tokens_dir=root / "tokens", backbone=load_diffusion("tiny-random", device="cpu"))
    engine.index(gallery, progress=False, workers=0)
    concept = root / "concept"
    concept.mkdir()
    for p in sorted(gallery.glob("d*/*.png"))[:3]:
        shutil.copyfile(p, concept / p.name)
    engine.learn_token("tok", concept, "dress", progress=False, method="ti", steps=2)
    return engine


@contextlib.contextmanager
def running(engine, config: ServerConfig | None = None):
    """The base URL of a uvicorn server (in a thread, on a free loopback port) over ENGINE, stopped afterwards."""
    import uvicorn

    port = free_port()
    app = create_app(engine, config or bind_config("127.0.0.1", None, port))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    end = time.time() + 30
    while not server.started:
        assert time.time() < end and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def server(engine):
    with running(engine) as url:
        yield url


def wait_js(page, expression: str, timeout: float = 20.0) -> None:
    """Poll EXPRESSION with page.evaluate (which the page's CSP does not cover: wait_for_function's polling uses
    eval, which it does) until it is true."""
    end = time.time() + timeout
    while not page.evaluate(expression):
        assert time.time() < end, f"never true: {expression}"
        time.sleep(0.05)


def launch(p):
    return p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)


def test_the_page_end_to_end(server, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    problems: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(20_000)
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("response", lambda r: problems.append(f"{r.status} for {r.url}") if r.status >= 400 else None)
        page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
        try:
            # 1. the page loads with what the index holds
            page.goto(server + "/")
            expect(page.locator("#info")).to_contain_text("12 images")
            # 2. a query: thumbnails with rank and score; the hostile file name shows as text
            page.fill("#q", "a red dress")
            page.click("#search-btn")
            cards = page.locator("#results .card")
            expect(cards).to_have_count(12)
            expect(cards.first.locator(".rank")).to_have_text("#1")
            expect(cards.first.locator(".score")).to_have_text(re.compile(r"^-?\d\.\d{4}$"))
            wait_js(page, "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
            expect(page.locator("#results .path", has_text=f"{HOSTILE}.png")).to_have_count(1)
            assert page.locator("img[src='x']").count() == 0
            # 3. open a result, then "more like this"
            cards.nth(1).click()
            expect(page.locator("#detail")).to_be_visible()
            first_id = page.locator("#detail-id").inner_text()
            page.click("#more-like")
            expect(page.locator("#results-title")).to_have_text(f"More like #{first_id}")
            expect(cards).to_have_count(11)  # every image but itself
            assert first_id not in [c.get_attribute("data-id") for c in cards.all()]
            # 4. pick a token: its panel with its concept images and metadata
            page.select_option("#token", "tok")
            expect(page.locator("#token-panel")).to_be_visible()
            expect(page.locator("#token-title")).to_have_text("<tok>")
            expect(page.locator("#token-images img")).to_have_count(3)
            expect(page.locator("#token-meta")).to_contain_text("dress")
            # 5. GAIR: one image per w, w* framed, the context image; choose the other w
            page.fill("#q", "a person wearing a * on the grass")
            page.fill("#gair-weights", "0,1")
            page.fill("#gair-steps", "1")
            page.click("#gair-run")
            figures = page.locator("#gair-images figure")
            expect(figures).to_have_count(2)
            expect(page.locator("#gair-images figure.best")).to_have_count(1)
            expect(page.locator("#gair-context img")).to_have_count(1)
            wait_js(
                page, "[...document.querySelectorAll('#gair-out img')].every(i => i.complete && i.naturalWidth > 0)"
            )
            title = page.locator("#results-title").inner_text()
            assert "w* = " in title
            best = figures.evaluate_all("fs => fs.findIndex(f => f.classList.contains('best'))")
            other = figures.nth(1 - best)
            other_w = other.get_attribute("data-w")
            other.click()
            expect(page.locator("#results-title")).to_contain_text(f"with w = {other_w}")
            expect(other).to_have_class(re.compile(r"\bchosen\b"))
            expect(page.locator("#gair-chosen")).to_contain_text(f"searching with w = {other_w}")
            expect(cards).to_have_count(12)
            page.screenshot(path=str(tmp_path / "gair.png"))
            # 6. learn a token from three selected results: the progress bar runs to the end
            for i in range(3):
                cards.nth(i).locator(".pick").check()
            expect(page.locator("#learn-selected")).to_have_text("3")
            page.fill("#learn-name", "fromui")
            page.fill("#learn-parent", "dress")
            page.select_option("#learn-method", "ti")
            page.fill("#learn-steps", "3")
            page.click("#learn-start")
            expect(page.locator("#learn-status")).to_contain_text("learned", timeout=30_000)
            assert page.eval_on_selector("#learn-progress", "p => p.value === p.max")
            expect(page.locator("#token")).to_have_value("fromui")
            # 7. history, and a link that reproduces a search
            links = page.locator("#history a")
            assert links.count() >= 2 and "?q=a+red+dress" in (links.last.get_attribute("href") or "")
            page.goto(server + "/?q=a+red+dress&k=4")
            expect(cards).to_have_count(4)
            page.goto(server + "/?q=a+red+dress&k=12")
            expect(cards).to_have_count(12)
            page.select_option("#token", "tok")
            page.fill("#q", "a person wearing a * on the grass")
            page.fill("#gair-steps", "1")
            page.click("#gair-run")  # the page's default weights: 0, 0.25, 0.5, 0.75, 1
            expect(page.locator("#gair-images figure")).to_have_count(5)
            cards.nth(0).click()
            expect(page.locator("#detail")).to_be_visible()
            wait_js(
                page, "[...document.querySelectorAll('img')].every(i => !i.src || (i.complete && i.naturalWidth > 0))"
            )
            shot = tmp_path / "server-screenshot.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("SCREENSHOT_DIR"):
                out = Path(os.environ["SCREENSHOT_DIR"])
                out.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, out / "server-screenshot.png")
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    assert not problems, problems


def test_with_an_api_key_the_page_asks_for_it_and_sends_it(engine):
    from playwright.sync_api import expect, sync_playwright

    with running(engine, ServerConfig(api_key="s3cret")) as url, sync_playwright() as p:
        browser = launch(p)
        try:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.goto(url + "/")
            expect(page.locator("#key-form")).to_be_visible()
            expect(page.locator("#error")).to_contain_text("X-API-Key")
            page.fill("#api-key", "s3cret")
            page.click("#key-form button")
            expect(page.locator("#info")).to_contain_text("12 images")
            page.fill("#q", "a red dress")
            page.click("#search-btn")
            expect(page.locator("#results .card")).to_have_count(12)
            # thumbnails come through fetch() with the header, shown as blob: URLs
            wait_js(
                page,
                "[...document.querySelectorAll('#results img')].every(i => i.src.startsWith('blob:') && i.naturalWidth > 0)",
            )
        finally:
            browser.close()
