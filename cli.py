"""personal-retrieval: search your image gallery by text with CLIP + FAISS.

Each command parses its arguments and calls one library function; `--help` on any command explains it.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_enable=False)

DEFAULT_INDEX_DIR = Path("index")


class IndexTypeOpt(str, Enum):
    auto = "auto"
    flat = "flat"
    hnsw = "hnsw"
    ivf = "ivf"
    ivfpq = "ivfpq"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    fp16 = "fp16"
    bf16 = "bf16"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _user_errors():
    """The errors that are the user's to fix: shown as one message, never a stack trace."""
    from indexes.store import IndexStoreError
    from retrieval.models import ModelLoadError

    return (ModelLoadError, IndexStoreError, FileNotFoundError, NotADirectoryError, ValueError, KeyError)


MODEL_HELP = (
    "CLIP model SPEC: NAME/PRETRAINED (e.g. ViT-L-14-quickgelu/openai, the text tower of Stable Diffusion 1.x), "
    "NAME/path/to/weights, hf-hub:ORG/REPO, a local model folder, or tiny-random (download-free smoke test, "
    "meaningless results)."
)


@app.command()
def index(
    gallery_dir: Path = typer.Argument(..., exists=True, file_okay=False, help="Folder of images, searched recursively."),
    index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="Where the index is kept (created if missing)."),
    model: str = typer.Option("ViT-L-14-quickgelu/openai", help=MODEL_HELP),
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N."),
    precision: Precision = typer.Option(Precision.auto, help="auto: bf16/fp16 on GPU, fp32 on CPU."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    workers: int = typer.Option(-1, min=-1, help="Decoding processes (-1: one per spare core, at most 4; 0: none)."),
    index_type: IndexTypeOpt = typer.Option(
        IndexTypeOpt.auto, help="auto: exact search for small galleries, IVF (or IVF-PQ past the memory budget) "
        "tuned to the recall target for large ones."
    ),
    recall_target: float = typer.Option(0.95, min=0.5, max=1.0, help="recall@10 that approximate indexes are tuned to."),
    shard_size: int = typer.Option(4096, min=1, help="Images per shard: after a crash, a rerun resumes at a shard boundary."),
    max_pixels: int = typer.Option(89_478_485, min=1, help="Images with more pixels are skipped (decompression bombs)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Index (or update the index of) an image gallery.

    Only new or changed images are embedded; deleted ones are dropped; ids of unchanged images stay.
    Interrupted runs resume from their finished shards. Unusable files are skipped and listed.
    """
    from indexes.vector_index import IndexConfig, IndexType
    from retrieval.indexer import IndexingConfig, index_gallery

    try:
        config = IndexingConfig(
            model=model, device=device, precision=precision.value, batch_size=batch_size, workers=workers,
            shard_size=shard_size, max_pixels=max_pixels,
            index=IndexConfig(index_type=IndexType(index_type.value), recall_target=recall_target),
        )
        summary = index_gallery(gallery_dir, index_dir, config, progress=progress)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(summary.format())


@app.command()
def reindex(
    index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="An existing index folder."),
    index_type: IndexTypeOpt = typer.Option(IndexTypeOpt.auto, help="The new index type."),
    recall_target: float = typer.Option(0.95, min=0.5, max=1.0, help="recall@10 target for approximate types."),
):
    """Rebuild the FAISS index with another type from the stored embeddings (no image is re-embedded)."""
    from indexes.store import rebuild_index
    from indexes.vector_index import IndexConfig, IndexType

    try:
        manifest = rebuild_index(index_dir, IndexConfig(index_type=IndexType(index_type.value), recall_target=recall_target))
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(f"rebuilt {index_dir}: {manifest['count']} images, index {json.dumps(manifest['index']['params'])}")


@app.command()
def query(
    text: Optional[str] = typer.Argument(None, help="The query, e.g. \"a person in a red dress on a beach\"."),
    index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="The index to search."),
    k: int = typer.Option(10, min=1, help="Results per query."),
    queries: Optional[Path] = typer.Option(None, exists=True, dir_okay=False, help="File with one query per line (a batch)."),
    model: Optional[str] = typer.Option(None, help="Must equal the index's model; default: the index's model."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per query instead of a table."),
    html: Optional[Path] = typer.Option(None, help="Also write a self-contained HTML page of thumbnails here."),
):
    """Search the index by text: prints rank, score and path of the best matches."""
    from retrieval.report import results_html, write_html
    from retrieval.search import run_queries

    texts = [text] if text is not None else []
    if queries is not None:
        texts += [line.strip() for line in queries.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        _fail("give a query TEXT or --queries FILE")
    try:
        store, results = run_queries(index_dir, texts, k=k, model=model, device=device)
    except _user_errors() as e:
        _fail(str(e))
    if as_json:
        for r in results:
            typer.echo(json.dumps(r.to_json()))
    else:
        for r in results:
            typer.echo(f"# {r.query}")
            for h in r.hits:
                typer.echo(f"{h.rank:>4}  {h.score:.4f}  {h.path}")
    if html is not None:
        write_html(html, results_html(results, store.manifest["gallery_root"]))
        typer.echo(f"wrote {html}", err=True)


@app.command()
def info(index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="The index folder.")):
    """Show an index's manifest, counts and skipped files."""
    from indexes.store import IndexStore

    try:
        store = IndexStore(index_dir)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(json.dumps(store.manifest, indent=2))
    typer.echo(f"images: {store.count}   skipped: {len(store.skipped)}")
    for row in store.skipped.itertuples():
        typer.echo(f"  skipped {row.path}: {row.reason}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the demo's world, index and report."),
    model: str = typer.Option("tiny-random", help=MODEL_HELP),
    k: int = typer.Option(5, min=1, help="Results per query."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Run the engine end to end on the built-in synthetic world, with no download.

    Writes the world's test split (rendered scenes and captions), indexes its images, answers queries
    whose right answer is known (prints where it ranks) and writes OUT/results.html.
    """
    from retrieval.demo import run_demo

    try:
        result = run_demo(out, model=model, k=k, progress=progress, device=device)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(result.summary.format())
    for r, rank in zip(result.results, result.target_ranks):
        typer.echo(f"# {r.query}")
        for h in r.hits:
            typer.echo(f"{h.rank:>4}  {h.score:.4f}  {h.path}")
        typer.echo(f"  -> the image this caption describes is at rank {rank}" if rank else
                   f"  -> the image this caption describes is not in the top {k}")
    typer.echo(f"report: {result.html}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
