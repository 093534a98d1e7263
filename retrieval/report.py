"""Self-contained HTML pages of results: thumbnails inlined as base64 JPEG, every string escaped."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Sequence

from retrieval.gallery import is_url, load_gallery_image
from retrieval.io.atomic import write_atomic
from retrieval.io.images import BadImage, load_image

THUMB_PX = 160
PAGE_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h1{font-size:1.3em} h2{font-size:1.05em;margin-top:1.6em}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;background:#fff;border:1px solid #ddd;border-radius:4px;padding:6px;width:170px}
figure.chosen{border:3px solid #d33}
figure img{width:160px;height:160px;object-fit:contain;background:#eee;display:block}
figcaption{font-size:.8em;word-break:break-all;margin-top:4px}
.missing{width:160px;height:160px;display:flex;align-items:center;justify-content:center;background:#eee;color:#888}
"""


def image_data_uri(image_or_path, size: int = THUMB_PX) -> str | None:
    """A PIL image or an image file -> 'data:image/jpeg;base64,...' thumbnail; None if unreadable (or None)."""
    if image_or_path is None:
        return None
    try:
        im = load_image(image_or_path) if isinstance(image_or_path, (str, Path)) else image_or_path.convert("RGB")
    except BadImage:
        return None
    im = im.copy()
    im.thumbnail((size, size))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def figure(image_or_path, caption_lines: Sequence[str], chosen: bool = False) -> str:
    uri = image_data_uri(image_or_path)
    img = f'<img src="{uri}" alt="">' if uri else '<div class="missing">unreadable</div>'
    cap = "<br>".join(html.escape(str(line)) for line in caption_lines)
    return f"<figure{' class=chosen' if chosen else ''}>{img}<figcaption>{cap}</figcaption></figure>"


def gallery_file(root: str | Path, rel: str):
    """What `figure` shows for the gallery file REL: its path in a local gallery; in a gallery at an fsspec URL, its
    image read from there (None when it cannot be read)."""
    if not is_url(root):
        return Path(root) / rel
    try:
        return load_gallery_image(root, rel, min_size=THUMB_PX)[0]
    except BadImage:
        return None


def page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """sections: (heading, already-escaped HTML body)."""
    body = "".join(f"<h2>{html.escape(h)}</h2>{b}" for h, b in sections)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{PAGE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n"
    )


def results_html(results, gallery_root: str | Path) -> str:
    """Page for a list of retrieval.search.QueryResult: per query, the hits with rank, score and path."""
    sections = []
    for r in results:
        figs = "".join(
            figure(gallery_file(gallery_root, h.path), [f"#{h.rank}  score {h.score:.4f}", h.path]) for h in r.hits
        )
        sections.append((f"{r.query}  ({r.model})", f'<div class="grid">{figs}</div>'))
    return page("Search results", sections)


def write_html(path: str | Path, text: str) -> Path:
    path = Path(path)
    write_atomic(path, lambda p: p.write_text(text, encoding="utf-8"))
    return path


def composed_html(results, gallery_root: str | Path, concept_images: Sequence = (), n_concept: int = 4) -> str:
    """Page for retrieval.gair.PersonalResult answers, like Perera et al.'s Figure 6: the query as written and as
    encoded, a few concept images, with GAIR the image generated for each weight w (w* marked) and the context
    image(s), then the top-k results with rank and score."""
    sections = []
    for r in results:
        head = [f"query: {r.query}", f"encoded as: {r.composed}", f"model: {r.model}"]
        if r.truncated:
            head.append("warning: longer than the text encoder's context, truncated")
        if r.gair is not None:
            head.append(f"GAIR: w* = {r.gair.w:g}; attributes: {', '.join(r.attributes)}")
        sections.append((r.query, "<p>" + "<br>".join(html.escape(line) for line in head) + "</p>"))
        if concept_images:
            figs = "".join(
                figure(im, [f"concept image {i + 1}"]) for i, im in enumerate(list(concept_images)[:n_concept])
            )
            sections.append(("Concept images", f'<div class="grid">{figs}</div>'))
        g = r.gair
        if g is not None:
            figs = "".join(
                figure(
                    im,
                    [
                        f"w = {w:g}" + ("  (chosen)" if i == g.best else ""),
                        f"score {s:.4f}",
                        f"cos concept {c:.4f}",
                        f"cos context {x:.4f}",
                    ],
                    chosen=i == g.best,
                )
                for i, (w, im, s, c, x) in enumerate(
                    zip(g.weights, g.images, g.scores, g.concept_similarity, g.context_similarity)
                )
            )
            sections.append(("Generated for each weight w (the query visualised)", f'<div class="grid">{figs}</div>'))
            figs = "".join(figure(im, [f"context image {i + 1}"]) for i, im in enumerate(g.context_images))
            sections.append(("Context images (attributes instead of the token)", f'<div class="grid">{figs}</div>'))
        figs = "".join(
            figure(gallery_file(gallery_root, h.path), [f"#{h.rank}  score {h.score:.4f}", h.path]) for h in r.hits
        )
        sections.append((f"Top {len(r.hits)} results", f'<div class="grid">{figs}</div>'))
    return page("Composed query", sections)
