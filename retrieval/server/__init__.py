"""The web app and HTTP API over one engine (`cli.py serve`): search by words, tokens, images and mixes; learn
tokens as background jobs; see GAIR's generated images and choose w by looking (Perera et al., Sec. 4.4).

| module | what | tests |
| --- | --- | --- |
| `app` | the FastAPI app (`create_app`), its safety checks, token jobs, GAIR runs, `serve` | tests/test_server.py, tests/test_server_browser.py |
| `static/` | the page: index.html, app.js, app.css (no build step, no CDN) | tests/test_server_browser.py |
"""

from retrieval.server.app import ServerConfig, check_bind, create_app, serve

__all__ = ["ServerConfig", "check_bind", "create_app", "serve"]
