"""personal-retrieval: search your image gallery by text with CLIP + FAISS.

Each command parses its arguments and calls one library function; `--help` on any command explains it.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from enum import Enum
from pathlib import Path
from typing import List, Optional

import click
import typer

from retrieval.models import DEFAULT_MODEL
from tokens.defaults import DEFAULT_TOKENS_DIR

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


# Library errors name Python arguments in backticks (`model=tiny-random`, `overwrite=True`, `tokens=['my-dress']`);
# a user of this CLI reads them as its flags. Where a flag is not the argument's name with dashes:
_FLAG_OF_ARGUMENT = {"n_vectors": "vectors", "guidance_scale": "guidance", "tokens": "token", "gair_config": "weights"}
_ARGUMENT = re.compile(r"`([a-z][a-z0-9_]*)(?:=([^`]*))?`")


def flags(message: str) -> str:
    """A library message in this CLI's words: `name=value` -> --name value, `name` -> --name (True: the flag alone)."""

    def say(m: re.Match) -> str:
        name, value = m.group(1), m.group(2)
        flag = "--" + _FLAG_OF_ARGUMENT.get(name, name).replace("_", "-")
        if value is None or value == "True":
            return flag
        return f"{flag} {value.strip('[]').replace(chr(39), '').replace(chr(34), '')}"

    return _ARGUMENT.sub(say, message)


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {flags(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _user_errors():
    """The errors that are the user's to fix: shown as one message, never a stack trace."""
    from indexes.locking import IndexLockedError
    from indexes.store import IndexStoreError
    from retrieval.models.clip import ModelLoadError

    return (
        ModelLoadError,
        IndexStoreError,
        IndexLockedError,
        FileNotFoundError,
        NotADirectoryError,
        ValueError,
        KeyError,
        TypeError,
    )


WAIT_HELP = "When another process is writing this index, wait for it instead of stopping with its name."
MODEL_HELP = (
    "CLIP model SPEC: NAME/PRETRAINED (e.g. ViT-L-14-quickgelu/openai, the text tower of Stable Diffusion 1.x), "
    "NAME/path/to/weights, hf-hub:ORG/REPO, a local model folder, or tiny-random (download-free smoke test, "
    "meaningless results)."
)


class ComputeEngine(str, Enum):
    local = "local"
    ray = "ray"


def _gallery_argument(value: str) -> str:
    """A local folder that exists (typer's Path(exists=True, file_okay=False) check), or a URL, checked by its scan."""
    if "://" in value:  # retrieval.gallery.is_url, without importing torch for --help
        return value
    try:
        return str(click.Path(exists=True, file_okay=False).convert(value, None, None))
    except click.BadParameter as e:
        raise ValueError(e.message) from e  # said by typer as "Invalid value for 'gallery_dir': ..."


@app.command()
def index(
    gallery_dir: str = typer.Argument(
        ...,
        parser=_gallery_argument,
        help="Folder of images, searched recursively; or an fsspec URL (s3://bucket/photos, gs://..., "
        "file:///srv/photos; needs that filesystem's package, e.g. s3fs).",
    ),
    index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="Where the index is kept (created if missing)."),
    model: str = typer.Option(DEFAULT_MODEL, help=MODEL_HELP),
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N."),
    precision: Precision = typer.Option(Precision.auto, help="auto: bf16/fp16 on GPU, fp32 on CPU."),
    batch_size: int = typer.Option(64, min=1, help="Images per forward pass."),
    workers: int = typer.Option(-1, min=-1, help="Decoding processes (-1: one per spare core, at most 4; 0: none)."),
    index_type: IndexTypeOpt = typer.Option(
        IndexTypeOpt.auto,
        help="auto: exact search for small galleries, IVF (or IVF-PQ past the memory budget) "
        "tuned to the recall target for large ones.",
    ),
    recall_target: float = typer.Option(
        0.95, min=0.5, max=1.0, help="recall@10 that approximate indexes are tuned to."
    ),
    shard_size: int = typer.Option(
        4096, min=1, help="Images per shard: after a crash, a rerun resumes at a shard boundary."
    ),
    max_pixels: int = typer.Option(
        89_478_485, min=1, help="Images with more pixels are skipped (decompression bombs)."
    ),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
    engine: ComputeEngine = typer.Option(
        ComputeEngine.local,
        help="local: embed in this process. ray: on a Ray cluster, one actor per GPU (else per CPU) holding the "
        "model; needs `pip install '.\\[ray]'`, and the gallery readable from every node (a shared folder or a URL).",
    ),
    address: Optional[str] = typer.Option(
        None,
        help="With --engine ray: the cluster (auto: the one `ray start` runs on this machine; HOST:PORT; "
        "ray://HOST:10001). Default: a new local Ray on this machine's cores.",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
):
    """Index (or update the index of) an image gallery.

    Only new or changed images are embedded; deleted ones are dropped; ids of unchanged images stay.
    Interrupted runs resume from their finished shards. Unusable files are skipped and listed.
    A commit writes only the change (a new segment; deletions as tombstones); segments are merged by size tier
    as they accumulate (see `compact`). One writer at a time: a second one stops, naming the first (or `--wait`s).
    With --engine ray the shards are embedded on a Ray cluster (--address); the index is written here.
    """
    from indexes.vector_index import IndexConfig, IndexType
    from retrieval import Engine

    if engine is ComputeEngine.ray:
        from retrieval.distributed import import_ray

        try:
            import_ray()
        except ImportError as e:
            _fail(str(e))
    try:
        summary = Engine(index_dir, model=model, device=device).index(
            gallery_dir,
            progress=progress,
            wait=wait,
            engine=engine.value,
            address=address,
            precision=precision.value,
            batch_size=batch_size,
            workers=workers,
            shard_size=shard_size,
            max_pixels=max_pixels,
            index=IndexConfig(index_type=IndexType(index_type.value), recall_target=recall_target),
        )
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(summary.format())


@app.command()
def reindex(
    index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="An existing index folder."),
    index_type: IndexTypeOpt = typer.Option(IndexTypeOpt.auto, help="The new index type."),
    recall_target: float = typer.Option(0.95, min=0.5, max=1.0, help="recall@10 target for approximate types."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
):
    """Rebuild the FAISS index with another type from the stored embeddings (no image is re-embedded): every
    segment is merged into one, built with the new type."""
    from indexes.vector_index import IndexConfig, IndexType
    from retrieval import Engine

    try:
        manifest = Engine(index_dir).reindex(
            IndexConfig(index_type=IndexType(index_type.value), recall_target=recall_target), wait=wait
        )
    except _user_errors() as e:
        _fail(str(e))
    segments = [s["index"]["params"] for s in manifest["segments"]]
    typer.echo(f"rebuilt {index_dir}: {manifest['count']} images, index {json.dumps(segments)}")


@app.command()
def compact(
    index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="An existing index folder."),
    full: bool = typer.Option(False, "--full", help="Merge every segment into one (default: only full size tiers)."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
):
    """Merge the index's small segments into larger ones and drop deleted rows.

    Each commit adds one segment; commits merge a size tier automatically once it holds 10 segments. This runs the
    same merge on demand (`--full`: everything into one segment, the fastest to search). Crash-safe: a kill at any
    moment leaves the previous version readable. Readers keep working throughout."""
    from retrieval import Engine

    try:
        manifest = Engine(index_dir).compact(full=full, wait=wait)
    except _user_errors() as e:
        _fail(str(e))
    if manifest is None:
        typer.echo(f"{index_dir}: nothing to merge")
    else:
        typer.echo(f"compacted {index_dir}: {manifest['count']} images in {len(manifest['segments'])} segment(s)")


@app.command()
def migrate(
    index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="An index folder written by an older version."),
    wait: bool = typer.Option(False, "--wait", help=WAIT_HELP),
):
    """Convert an index folder of format 1 (one generation rewritten by each commit) to format 2 (segments) in
    place, without copying the embeddings. The next `index` run does this by itself; this does it now."""
    from retrieval import Engine

    try:
        manifest = Engine(index_dir).migrate(wait=wait)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(f"{index_dir}: index format {manifest['format_version']}, {manifest['count']} images")


@app.command()
def query(
    text: Optional[str] = typer.Argument(
        None,
        help='The query, e.g. "a person in a red dress on a beach", or with a custom token: '
        '"a person wearing a * in front of a brick wall" --token my-dress, or a weighted mix of quoted texts, '
        'image files and gallery ids: \'"2:a red dress" + photo.jpg - "hat" + #12\' (an image file\'s path, '
        "#ID an id from an earlier result).",
    ),
    image: Optional[Path] = typer.Option(
        None,
        "--image",
        dir_okay=False,
        help="Query by this image file instead of a TEXT: the gallery images nearest it (to mix it with words, "
        "name it in the TEXT: '\"a red dress\" + photo.jpg').",
    ),
    index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="The index to search."),
    k: int = typer.Option(10, min=1, help="Results per query."),
    queries: Optional[Path] = typer.Option(
        None, exists=True, dir_okay=False, help="File with one query per line (a batch)."
    ),
    model: Optional[str] = typer.Option(None, help="Must equal the index's model; default: the index's model."),
    token: List[str] = typer.Option(
        [],
        "--token",
        help="A custom token from --tokens-dir: `*` in the query stands for it (its parent word is "
        "added after it); with several, write <NAME> for each. Repeat for several.",
    ),
    tokens_dir: Path = typer.Option(DEFAULT_TOKENS_DIR, help="The token store (see `tokens list`)."),
    gair: bool = typer.Option(
        False,
        "--gair",
        help="Generation Aided Image Retrieval (Perera et al., Algorithm 1): generate an image for "
        "the query mixed with and without the token at each --weights w, keep the w whose image "
        "is closest to both the concept and the context, search with that mixture.",
    ),
    weights: str = typer.Option("0:1:0.1", help="GAIR weights: comma-separated, or start:stop:step (stop included)."),
    attributes: Optional[str] = typer.Option(
        None,
        help="GAIR context words, comma-separated, put in place of the token (default: the token's own, else "
        "the paper's red,old,worn,bright,dark,pink).",
    ),
    concept_images: Optional[Path] = typer.Option(
        None,
        file_okay=False,
        help="Folder of the concept's images for GAIR's score and the report (default: the "
        "feature stored in the token, the folder it was learned from).",
    ),
    diffusion: str = typer.Option(
        "auto", help="Diffusion model for --gair (see `generate --help`); auto: paired with the index's model."
    ),
    steps: Optional[int] = typer.Option(
        None, min=1, help="GAIR sampler steps (default: the diffusion model's, SD: 50)."
    ),
    guidance: Optional[float] = typer.Option(
        None, help="GAIR guidance scale (default: the diffusion model's, SD: 7.5)."
    ),
    n_context: int = typer.Option(1, min=1, help="GAIR context images per query."),
    seed: int = typer.Option(0, help="GAIR noise seed (every w uses the same noise)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per query instead of a table."),
    report: Optional[Path] = typer.Option(
        None,
        "--report",
        "--html",
        help="Also write a self-contained HTML page: results as thumbnails; with tokens, "
        "the concept images and, with --gair, the image generated for each w.",
    ),
    progress: bool = typer.Option(True, help="Show a progress bar while GAIR generates."),
):
    """Search the index by text, by an image (--image) or by a mix of both: prints rank, score and path of the best
    matches.

    With --token, the query is composed with a custom token (`learn-token`); with --gair it is also visualised:
    the generated images show what the engine understood (see --report).
    """
    from retrieval import Engine, GairConfig
    from retrieval.gair import parse_weights
    from retrieval.io.images import BadImage, load_image
    from retrieval.mix import is_mix, parse_mix, read_mix_files

    texts = [text] if text is not None else []
    if queries is not None:
        texts += [line.strip() for line in queries.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts and image is None:
        _fail("give a query TEXT, --queries FILE or --image PATH")
    if texts and image is not None:
        _fail(
            "give a query TEXT (or --queries) or --image, not both: to mix them, name the image in the TEXT, "
            "'\"a red dress\" + photo.jpg'"
        )
    mixes = image is not None or any(is_mix(t) for t in texts)
    if mixes and gair:
        _fail("--gair takes sentences with * (one custom token), not an image or a mix of terms")
    images = None  # the concept images, for GAIR and the report
    try:
        # 1. every check that needs no model, then the models (once), then the queries
        picture = load_image(image) if image is not None else None
        engine = Engine(index_dir, tokens_dir, model=model, diffusion=diffusion, device=device)
        if picture is not None:
            results = [engine.query_image(picture, k, name=str(image))]
        elif mixes:  # each line a mix (a plain sentence is a mix of one term); the files it names are paths from here
            results = [engine.query_mix(t, k=k, images=read_mix_files(parse_mix(t)), tokens=token) for t in texts]
        else:
            engine.check_queries(texts, token, gair)
            config = GairConfig(
                weights=parse_weights(weights), steps=steps, guidance_scale=guidance, seed=seed, n_context=n_context
            )
            words = [a.strip() for a in attributes.split(",")] if attributes is not None else None
            images = engine.read_concept_images(concept_images) if concept_images is not None else None
            results = engine.query_many(
                texts,
                token,
                k=k,
                gair=gair,
                attributes=words,
                gair_config=config,
                concept_images=images,
                progress=progress,
            )
    except BadImage as e:
        _fail(f"cannot use --image {image}: {e.reason}")
    except _user_errors() as e:
        _fail(str(e))
    for r in results:
        if getattr(r, "truncated", False):
            typer.secho(
                f"warning: {r.query!r} is longer than the text encoder's context and was truncated",
                fg=typer.colors.YELLOW,
                err=True,
            )
        if as_json:
            typer.echo(json.dumps(r.to_json()))
            continue
        typer.echo(f"# {r.query}")
        if hasattr(r, "composed"):
            typer.echo(f"#   encoded as: {r.composed}")
        if hasattr(r, "terms"):
            typer.echo("#   mix: " + "  ".join(f"{t.weight:+g} x {t.kind} {t.value}" for t in r.terms))
        if getattr(r, "gair", None) is not None:
            typer.echo(f"#   GAIR w* = {r.gair.w:g}   (attributes: {', '.join(r.attributes)})")
            for w, s, c, x in zip(r.gair.weights, r.gair.scores, r.gair.concept_similarity, r.gair.context_similarity):
                mark = "  <- w*" if w == r.gair.w else ""
                typer.echo(f"#   w={w:<4g} score {s:.4f}  (cos concept {c:.4f}, cos context {x:.4f}){mark}")
        for h in r.hits:
            typer.echo(f"{h.rank:>4}  {h.score:.4f}  {h.path}")
    if report is not None:
        typer.echo(f"wrote {engine.report(results, report, images)}", err=True)


@app.command()
def info(index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="The index folder.")):
    """Show an index's manifest, counts and skipped files."""
    from retrieval import Engine

    try:
        store = Engine(index_dir).store
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(json.dumps(store.manifest, indent=2))
    typer.echo(f"images: {store.count}   skipped: {len(store.skipped)}")
    for row in store.skipped.itertuples():
        typer.echo(f"  skipped {row.path}: {row.reason}")


@app.command()
def demo(
    out: Path = typer.Option(Path("demo"), help="Folder for the demo's world, index and report."),
    model: str = typer.Option("toyworld", help=MODEL_HELP + " Default: the synthetic world's own small CLIP."),
    k: int = typer.Option(5, min=1, help="Results per query."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    tokens: bool = typer.Option(
        True, help="Also learn a custom token for one concept and answer GAIR queries with it."
    ),
    token_steps: int = typer.Option(300, min=0, help="Optimiser steps of the demo's token."),
    sample_steps: Optional[int] = typer.Option(
        None, min=1, help="Sampler steps for negatives and GAIR (default: the diffusion model's)."
    ),
):
    """Run the engine end to end on the built-in synthetic world, with no download.

    Writes the world's test split (rendered scenes and captions), indexes its images, answers queries
    whose right answer is known (prints where it ranks) and writes OUT/results.html. Then learns a custom
    token for one concept from its few-shot images, answers that concept's captions with words only, with
    the token and with the token + GAIR, and writes OUT/gair.html (the images GAIR generated, the results).
    """
    from benchmarks.demo import run_demo

    try:
        result = run_demo(
            out,
            model=model,
            k=k,
            progress=progress,
            device=device,
            token_steps=token_steps,
            sample_steps=sample_steps,
            tokens=tokens,
        )
    except _user_errors() as e:
        _fail(str(e))
    if result.started_afresh:
        typer.echo(f"{out} held a demo made by other models (another --model, or new committed weights): rebuilt it")
    typer.echo(result.summary.format())
    for r, rank, target, concept in zip(result.results, result.target_ranks, result.targets, result.concepts):
        typer.echo(f"# {r.query}   (answer: {target}, concept {concept})")
        for h in r.hits:
            typer.echo(f"{h.rank:>4}  {h.score:.4f}  {h.path}")
        typer.echo(
            f"  -> the image this caption describes is at rank {rank}"
            if rank
            else f"  -> the image this caption describes is not in the top {k}"
        )
    typer.echo(
        "Each query's words also describe its concept's look-alikes (same garment words, other unnamed details): words\n"
        "alone cannot tell them apart. Custom tokens learned from a few photos of each concept are meant to."
    )
    typer.echo(f"report: {result.html}")
    t = result.token
    if t is not None:
        typer.echo(
            f"\ncustom token {t.token!r} for concept {t.concept} (parent {t.parent!r}), learned from its few-shot "
            f"images {'(reused from the last run)' if t.reused else f'in {t.seconds:.0f} s'} (method ours, caption-initialised). Rank of each caption's own image among "
            f"{result.summary.count} gallery images:"
        )
        for i, (q, target) in enumerate(zip(t.queries, t.targets)):
            typer.echo(f"# {q}   (answer: {target})")
            typer.echo(
                f"  words only: {t.ranks['words'][i]:>4}   token: {t.ranks['token'][i]:>4}   "
                f"token + GAIR: {t.ranks['token+gair'][i]:>4} (w* = {t.gair_w[i]:g})"
            )
        typer.echo(f"report: {t.html}")


# ----- custom tokens (tokens/): learn, visualise, manage
class MethodOpt(str, Enum):
    ours = "ours"
    ti = "ti"
    pt = "pt"
    batex = "batex"


TOKEN_MODEL_HELP = (
    "CLIP model SPEC whose embedding space the tokens live in (see `index --help`); `toyworld` is the synthetic "
    "world's CLIP, `tiny-random` a download-free smoke test. Tokens remember it: one made for another model is refused."
)
DIFFUSION_HELP = (
    "Diffusion model SPEC: a hub repo id, a local diffusers folder, or a preset (sd14, sd15, sd21, toyworld, "
    "tiny-random). auto: the one paired with --model (ViT-L-14-quickgelu/openai -> sd14 = CompVis/stable-diffusion-v1-4, "
    "ViT-H-14/laion2b_s32b_b79k -> sd21, toyworld -> toyworld, tiny-random -> tiny-random)."
)
TOKENS_DIR_HELP = "The token store: a folder of <name>.safetensors files (created on first use)."


@app.command("learn-token")
def learn_token_command(
    name: str = typer.Argument(
        ...,
        help="The token's name (letters, digits, . _ -); in prompts it is * or <NAME>. With a folder of concept "
        "folders: the prefix of every token's name, NAME-<sub-folder>.",
    ),
    images: Path = typer.Option(
        ...,
        help="Folder of the concept's images (at least 3 usable; unreadable ones are skipped); or a folder of concept "
        "folders (no images of its own): one token per sub-folder, all learned in one batch.",
    ),
    parent: str = typer.Option(
        ..., help="The concept's parent word, e.g. dress (several words: their mean initialises the token)."
    ),
    method: MethodOpt = typer.Option(
        MethodOpt.ours,
        help="ours: diffusion + classification loss, token in an attribute subspace (Perera et al.); "
        "ti: textual inversion (diffusion loss); pt: prompt tuning (classification loss); batex: BaTex basis coefficients.",
    ),
    steps: Optional[int] = typer.Option(None, min=0, help="Optimiser steps (default: 20000; batex 500)."),
    vectors: Optional[int] = typer.Option(
        None, min=1, help="Vectors per token (default 10; with --init-caption: one per caption token)."
    ),
    init_caption: Optional[str] = typer.Option(
        None,
        help='Start from a caption, one vector per caption token ("a red tea kettle with gold leaf"), or auto: '
        "a caption ranked from the attribute vocabulary by CLIP against the images. Default: the parent word.",
    ),
    negatives: Optional[Path] = typer.Option(
        None,
        help="Folder of negative images of the parent (ours, pt). Default: sampled from the diffusion model for "
        '"image of a <parent>" and cached in --tokens-dir.',
    ),
    n_negatives: int = typer.Option(16, min=1, help="Negatives to sample when no --negatives folder is given."),
    negative_steps: int = typer.Option(50, min=1, help="Sampler steps when sampling negatives."),
    model: str = typer.Option(DEFAULT_MODEL, help=TOKEN_MODEL_HELP),
    diffusion: str = typer.Option("auto", help=DIFFUSION_HELP),
    tokens_dir: Path = typer.Option(DEFAULT_TOKENS_DIR, help=TOKENS_DIR_HELP),
    seed: int = typer.Option(0, help="Seeds the image, prompt, noise and timestep draws (and sampled negatives)."),
    overwrite: bool = typer.Option(False, help="Replace a token of the same name."),
    context_attributes: Optional[str] = typer.Option(
        None,
        help="Comma-separated words kept with the token for `query --gair`'s context query (default there: "
        "red,old,worn,bright,dark,pink, the paper's).",
    ),
    device: str = typer.Option("auto", help="auto (GPU if present, with mixed precision), cpu, cuda, cuda:N."),
    engine: ComputeEngine = typer.Option(
        ComputeEngine.local,
        help="With a folder of concept folders: local learns them in one batch here; ray spreads batches of "
        "concepts over a Ray cluster's workers (--address; needs `pip install '.\\[ray]'`), the same tokens.",
    ),
    address: Optional[str] = typer.Option(
        None, help="With --engine ray: the cluster (auto, HOST:PORT, ray://HOST:10001). Default: a new local Ray."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar with each loss term."),
):
    """Learn a custom token from a few images of a concept and its parent word, and save it in the token store.

    The token then works in prompts for generation (`generate`) and for CLIP retrieval. A NaN loss stops training
    and keeps the last good token (the summary says so). Given a folder of concept folders (concepts/teapot/,
    concepts/mug/, ...), one token per sub-folder (NAME-teapot, NAME-mug), concept i seeded --seed + i.
    """
    from retrieval import Engine
    from tokens.learn import concept_folders

    many = bool(concept_folders(images))
    if engine is ComputeEngine.ray:
        if not many:
            _fail(f"--engine ray spreads a folder of concept folders over a cluster; {images} is one concept's folder")
        from retrieval.distributed import import_ray

        try:
            import_ray()
        except ImportError as e:
            _fail(str(e))
    elif address is not None:
        _fail(f"--address {address} is for --engine ray: add --engine ray, or leave out --address")
    try:
        the_engine = Engine(tokens_dir=tokens_dir, model=model, diffusion=diffusion, device=device)
        if many:
            learn = functools.partial(the_engine.learn_tokens, images, parent, prefix=name, engine=engine.value)
            if address is not None:
                learn = functools.partial(learn, address=address)
        else:
            learn = functools.partial(the_engine.learn_token, name, images, parent)
        results = learn(
            progress=progress,
            method=method.value,
            steps=steps,
            n_vectors=vectors,
            init_caption=init_caption,
            negatives=negatives,
            seed=seed,
            overwrite=overwrite,
            overrides={"n_negatives": n_negatives, "negative_steps": negative_steps},
            context_attributes=tuple(a.strip() for a in (context_attributes or "").split(",") if a.strip()),
        )
    except _user_errors() as e:
        _fail(str(e))
    for result in results if many else [results]:
        typer.echo(result.format())


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt; * stands for the --token (or write <NAME> for each token)."),
    token: List[str] = typer.Option([], "--token", help="A token name from --tokens-dir (repeat for several)."),
    n: int = typer.Option(4, min=1, help="Images to generate."),
    out: Path = typer.Option(Path("grid.png"), help="Where the grid of images is written (PNG)."),
    steps: Optional[int] = typer.Option(
        None,
        min=1,
        help="Sampling steps (default: the diffusion model's own setting: 50 DDIM for Stable Diffusion, "
        "25 Euler ancestral for toyworld).",
    ),
    guidance: Optional[float] = typer.Option(
        None, help="Classifier-free guidance scale (default: the diffusion model's: SD 7.5, toyworld 4)."
    ),
    negative_prompt: str = typer.Option("", help="The unconditional prompt of classifier-free guidance."),
    seed: int = typer.Option(0, help="Image i starts from noise seeded seed + i."),
    model: str = typer.Option(DEFAULT_MODEL, help=TOKEN_MODEL_HELP),
    diffusion: str = typer.Option("auto", help=DIFFUSION_HELP),
    tokens_dir: Path = typer.Option(DEFAULT_TOKENS_DIR, help=TOKENS_DIR_HELP),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N."),
):
    """Generate images for a prompt with custom tokens and write them as one grid, e.g.
    generate "a photo of a * on a beach" --token my-dress. As in queries, the token's parent word is added after
    it (a * -> a <my-dress> dress) unless the prompt already says it."""
    from retrieval import Engine

    try:
        result = Engine(tokens_dir=tokens_dir, model=model, diffusion=diffusion, device=device).generate(
            prompt,
            token,
            n=n,
            steps=steps,
            guidance_scale=guidance,
            negative_prompt=negative_prompt,
            seed=seed,
            out=out,
        )
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(f"wrote {len(result.images)} images for {result.prompt!r} to {result.out}")


tokens_app = typer.Typer(no_args_is_help=True, help="List, show and delete the tokens of a token store.")
app.add_typer(tokens_app, name="tokens")


@tokens_app.command("list")
def tokens_list(
    tokens_dir: Path = typer.Option(DEFAULT_TOKENS_DIR, help=TOKENS_DIR_HELP),
    model: Optional[str] = typer.Option(None, help="Only the tokens made for this CLIP SPEC (default: all)."),
):
    """List the tokens: name, method, parent, vectors, model, when made."""
    from tokens.store import TokenStore

    try:
        entries = TokenStore(tokens_dir).entries()
    except _user_errors() as e:
        _fail(str(e))
    shown = [e for e in entries if model is None or (e.info is not None and e.info.model == model)]
    if not shown:
        typer.echo(f"no tokens in {tokens_dir}" + (f" for --model {model}" if model else ""))
    for e in shown:
        if e.info is None:
            typer.echo(f"{e.name:<24} UNREADABLE: {e.problem}")
        else:
            i = e.info
            typer.echo(
                f"{i.name:<24} {i.method:<6} parent={i.parent!r:<12} vectors={i.n_vectors:<3} model={i.model} {i.created}"
            )


@tokens_app.command("show")
def tokens_show(
    name: str = typer.Argument(..., help="The token's name."),
    tokens_dir: Path = typer.Option(DEFAULT_TOKENS_DIR, help=TOKENS_DIR_HELP),
):
    """Show everything a token file says about itself (model, parent, method, config, subspace, init, training)."""
    from dataclasses import asdict

    from tokens.store import TokenStore

    try:
        store = TokenStore(tokens_dir)
        info = store.info(name)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(json.dumps({"path": str(store.path(name)), "placeholder": info.placeholder, **asdict(info)}, indent=2))


@tokens_app.command("delete")
def tokens_delete(
    name: str = typer.Argument(..., help="The token's name."),
    tokens_dir: Path = typer.Option(DEFAULT_TOKENS_DIR, help=TOKENS_DIR_HELP),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
):
    """Delete a token file from the store."""
    from tokens.store import TokenStore

    try:
        store = TokenStore(tokens_dir)
        store.info(name)  # exists and readable: else the error names what the store has
    except _user_errors() as e:
        _fail(str(e))
    if not yes and not typer.confirm(f"delete token {name!r} ({store.path(name)})?"):
        _fail("not deleted")
    try:
        path = store.delete(name)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(f"deleted {path}")


@app.command()
def serve(
    index_dir: Path = typer.Option(DEFAULT_INDEX_DIR, help="The index to search."),
    tokens_dir: Path = typer.Option(DEFAULT_TOKENS_DIR, help=TOKENS_DIR_HELP),
    host: str = typer.Option("127.0.0.1", help="Address to listen on; any address but loopback requires --api-key."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port."),
    api_key: Optional[str] = typer.Option(
        None,
        envvar="PERSONAL_RETRIEVAL_API_KEY",
        help="Require this key (header X-API-Key) on every /api request; needed to listen beyond this machine.",
    ),
    model: Optional[str] = typer.Option(None, help="Must equal the index's model; default: the index's model."),
    diffusion: str = typer.Option("auto", help=DIFFUSION_HELP),
    device: str = typer.Option("auto", help="auto (GPU if present), cpu, cuda, cuda:N."),
):
    """Serve a web page and a JSON API over the index and the token store: search by words, tokens, photos and
    mixes, learn tokens, see GAIR's images and choose w. The models load once; the API is listed at /docs."""
    from retrieval.server import serve as run_server

    try:
        run_server(
            index_dir,
            tokens_dir,
            host=host,
            port=port,
            api_key=api_key,
            model=model,
            diffusion=diffusion,
            device=device,
        )
    except _user_errors() as e:
        _fail(str(e))


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
