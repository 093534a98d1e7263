"""Index a gallery folder: scan it, diff it against the committed index, embed new or changed images in
resumable shards, commit the change (a new segment for the new rows, tombstones for the removed ones).

    index_gallery(gallery_dir, index_dir, IndexingConfig(model=DEFAULT_MODEL))

`index_gallery` is a loop of numbered steps in plain sight; each step is a plain function with dataclass
inputs and outputs, tested on its own (tests/test_indexer_steps.py):

    check_inputs  the committed index (read once, pinned: `IndexWriter.open`) and the encoder are of `config.model`
    scan          the gallery's image files, sorted by path                                   -> GalleryScan
    diff          against the committed version: new, changed, deleted, unchanged files    -> GalleryDiff
                  (unchanged files keep their id and embedding; a file is unchanged while path, size and mtime are)
    plan_shards   the files to embed -> rows reused from finished shards of an interrupted run
                  (same model and gallery) + the shards still to embed                         -> ShardPlan
    embed         each planned shard through `embed_shard`, written to work/ as it completes   -> [ShardOutput]
    merge         new rows (fresh ids in path order, never reused) + ids of removed rows      -> Change
    commit        the change as one new segment + tombstones (indexes.store.IndexWriter), atomically
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from indexes.shards import (
    META_COLUMNS,
    SKIP_COLUMNS,
    ShardInput,
    ShardOutput,
    finished_shards,
    mapped,
    next_shard_number,
    write_shard,
)
from indexes.store import (
    META_DTYPES,
    SKIP_DTYPES,
    IndexStore,
    IndexStoreError,
    IndexWriter,
    Rows,
    index_config_dict,
    write_in_order,
)
from indexes.vector_index import IndexConfig, IndexType, choose_index_type
from retrieval.gallery import GalleryDataset, GalleryFile, collate_gallery, resolve_gallery, scan_gallery, worker_init
from retrieval.io.images import DEFAULT_MAX_PIXELS
from retrieval.models.clip import DEFAULT_MODEL
from retrieval.models.encoders import ClipEncoder

FILE_KEY = ["path", "bytes", "mtime_ns"]  # a file is unchanged while all three are


def default_workers() -> int:
    """Decoding processes: one core is left to the encoder; at most 4 (decoding a 224 px batch is cheap)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class IndexingConfig:
    model: str = DEFAULT_MODEL  # CLIP model SPEC (retrieval.models.clip)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (GPU: bf16/fp16, CPU: fp32) | fp32 | fp16 | bf16
    batch_size: int = 64  # images per forward pass
    workers: int = -1  # decoding processes; -1 = default_workers(), 0 = decode in this process
    shard_size: int = 4096  # images per shard: the resume granularity after a crash
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped (decompression-bomb guard)
    # Worker start method. GNU OpenMP (faiss, torch) is not fork-safe (faiss#5206, pytorch#45198) when a
    # forked child enters a parallel region; workers run with one thread (worker_init), so they never do,
    # and fork starts them in milliseconds where spawn/forkserver re-import torch (seconds per run).
    mp_context: str = "fork" if sys.platform == "linux" else "spawn"
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self):
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError(
                f"`batch_size` and `shard_size` must be >= 1, got `batch_size={self.batch_size}`, "
                f"`shard_size={self.shard_size}`"
            )


@dataclass
class IndexSummary:
    """What one run did. The image counts are exact and add up: count == unchanged + indexed + reused."""

    indexed: int  # images embedded by this run (usable files only; unusable ones are in newly_skipped)
    reused: int  # images taken from finished shards of an interrupted run instead of re-embedding them
    unchanged: int  # images of the committed index kept as they were (same id, same embedding)
    removed: int  # committed images dropped: file deleted, or changed (its new version is embedded anew)
    skipped: pd.DataFrame  # path, bytes, mtime_ns, reason: every unusable file of the gallery, by path
    newly_skipped: int  # of which found unusable since the committed index (by this run or a reused shard)
    count: int  # images in the index after this run
    seconds: float  # wall time of the whole run
    embed_seconds: float  # wall time of the embedding loop (model loading excluded)
    manifest: dict  # the committed manifest (the previous one when nothing changed)

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def format(self) -> str:
        types = [s["index"]["params"]["index_type"] for s in self.manifest.get("segments", [])]
        kinds = ", ".join(f"{t} x{types.count(t)}" if types.count(t) > 1 else t for t in dict.fromkeys(types))
        layout = f"{len(types)} segment{'s' * (len(types) != 1)}" + (f": {kinds}" if kinds else "")
        lines = [
            f"indexed {self.indexed} new or changed images ({self.images_per_second:.1f} images/s), "
            f"reused {self.reused} from finished shards, kept {self.unchanged} unchanged, removed {self.removed}; "
            f"skipped {len(self.skipped)} files ({self.newly_skipped} new); index holds {self.count} images "
            f"({layout}); {self.seconds:.1f} s in all",
        ]
        for row in self.skipped.itertuples():
            lines.append(f"  skipped {row.path}: {row.reason}")
        return "\n".join(lines)


# ---------------------------------------------------------------- the steps' inputs and outputs
@dataclass(frozen=True)
class GalleryScan:
    root: str  # absolute path of the gallery folder; file paths are relative to it
    files: pd.DataFrame  # (n_files,) columns FILE_KEY, sorted by path


@dataclass(frozen=True)
class GalleryDiff:
    """A scan against the committed generation. Each scanned file is in exactly one of new, changed or
    unchanged (kept_rows, kept_skipped); each committed entry whose path is gone is in deleted."""

    new: pd.DataFrame  # files at paths the committed generation does not hold; FILE_KEY, path order
    changed: pd.DataFrame  # files at committed paths (images or skipped) with another size or mtime; FILE_KEY
    todo: pd.DataFrame  # new and changed: the files to embed; FILE_KEY, path order
    deleted: pd.DataFrame  # committed entries (images or skipped files) whose path is gone; FILE_KEY, path order
    kept_rows: np.ndarray  # (n_kept,) int64: rows of the committed metadata/embeddings whose file is unchanged
    kept_skipped: pd.DataFrame  # committed skipped files still there unchanged (not retried); SKIP_COLUMNS
    removed: int  # committed images dropped: deleted or changed
    next_id: int  # the first id never given (ids are not reused)

    @property
    def is_empty(self) -> bool:
        """Nothing new, changed or deleted: the committed generation is the gallery."""
        return not (len(self.new) or len(self.changed) or len(self.deleted))


@dataclass(frozen=True)
class ShardPlan:
    reused: list[ShardOutput]  # finished shards' outputs, cut to the files to embed (each file once)
    to_embed: list[
        tuple[int, ShardInput]
    ]  # (shard number, input) for the other files: shard_size files each, path order


@dataclass(frozen=True)
class Change:
    """What a run commits: only the change, never the rows it keeps (they stay in their segments)."""

    added: Rows  # new rows: metadata (id + META_COLUMNS, fresh ids in path order) and (n_new, dim) float16 embeddings
    deleted_ids: np.ndarray  # (n_removed,) int64: committed rows of deleted or changed files
    skipped: pd.DataFrame  # SKIP_COLUMNS, path order: every unusable file of the gallery (kept and newly found)
    next_id: int  # the first id never given
    count: int  # images in the index after the commit


# Embedder(plan, config, work_dir, progress) -> outputs of plan.to_embed in plan order, each also written to
# work_dir with indexes.shards.write_shard as it completes (the signature of `embed` without the encoder).
Embedder = Callable[[ShardPlan, "IndexingConfig", Path, bool], list[ShardOutput]]


# ---------------------------------------------------------------- the steps
def check_inputs(
    config: IndexingConfig, committed: IndexStore | None, encoder: ClipEncoder | None, gallery_root: str
) -> None:
    """Refuse an encoder or a committed index of another model than `config.model`; warn when the committed
    index was made from another gallery folder (paths are relative, so its unchanged files are still kept)."""
    if encoder is not None and encoder.spec != config.model:
        raise ValueError(
            f"`encoder` is {encoder.spec}, but the config says `model={config.model}`: pass an encoder of "
            f"{config.model}, or `encoder=None` to load it"
        )
    if committed is None:
        return
    if committed.model != config.model:
        raise IndexStoreError(
            f"the index in {committed.dir} was built with `model={committed.model}`, not {config.model}: index into a "
            f"new `index_dir`, or run with `model={committed.model}`"
        )
    if committed.manifest["gallery_root"] != gallery_root:
        warnings.warn(
            f"{committed.dir} indexed {committed.manifest['gallery_root']}; now indexing {gallery_root} "
            "(paths are relative)"
        )


def scan(gallery_dir: str | Path) -> GalleryScan:
    """The gallery's image files (retrieval.gallery.scan_gallery), sorted by path."""
    root = resolve_gallery(gallery_dir)
    files = [(f.path, f.bytes, f.mtime_ns) for f in scan_gallery(root)]
    return GalleryScan(
        root=root, files=pd.DataFrame(files, columns=FILE_KEY).astype({"bytes": "int64", "mtime_ns": "int64"})
    )


def diff(scanned: GalleryScan, committed: IndexStore | None) -> GalleryDiff:
    """Which scanned files are new, changed or unchanged, and which committed ones are deleted."""
    files = scanned.files
    if committed is None:
        none = files.iloc[:0]
        return GalleryDiff(
            new=files,
            changed=none,
            todo=files,
            deleted=none,
            kept_rows=np.zeros(0, np.int64),
            kept_skipped=pd.DataFrame(columns=SKIP_COLUMNS),
            removed=0,
            next_id=0,
        )
    meta, skipped = committed.metadata, committed.skipped
    held = pd.concat([meta[FILE_KEY], skipped[FILE_KEY]], ignore_index=True)  # every committed entry, once per path
    keys = _keys(files)
    unchanged = keys.isin(_keys(held))
    at_held_path = files["path"].isin(held["path"]).to_numpy()
    kept_rows = np.flatnonzero(_keys(meta).isin(keys)).astype(np.int64)
    return GalleryDiff(
        new=files[~at_held_path].reset_index(drop=True),
        changed=files[at_held_path & ~unchanged].reset_index(drop=True),
        todo=files[~unchanged].reset_index(drop=True),
        deleted=held[~held["path"].isin(files["path"])].sort_values("path", kind="stable").reset_index(drop=True),
        kept_rows=kept_rows,
        kept_skipped=skipped[_keys(skipped).isin(keys)].reset_index(drop=True),
        removed=len(meta) - len(kept_rows),
        next_id=int(committed.manifest["next_id"]),
    )


def plan_shards(
    todo: pd.DataFrame,
    finished: Sequence[ShardOutput],
    config: IndexingConfig,
    gallery_root: str,
    first_number: int = 0,
) -> ShardPlan:
    """Take what FINISHED shards hold of TODO (rows of files no longer to do are dropped; a file in two shards
    is taken once, from the first), and cut the rest of TODO into shards numbered from FIRST_NUMBER."""
    wanted = _keys(todo)
    taken = wanted[:0]
    reused = []
    for out in finished:
        ok = _keys(out.metadata).isin(wanted) & ~_keys(out.metadata).isin(taken)
        bad = _keys(out.skipped).isin(wanted) & ~_keys(out.skipped).isin(taken)
        if not (ok.any() or bad.any()):
            continue
        out = ShardOutput(
            embeddings=out.embeddings[ok],
            metadata=out.metadata[ok].reset_index(drop=True),
            skipped=out.skipped[bad].reset_index(drop=True),
        )
        taken = taken.append(_keys(out.metadata)).append(_keys(out.skipped))
        reused.append(out)
    rest = todo[~wanted.isin(taken)].reset_index(drop=True) if len(taken) else todo.reset_index(drop=True)
    n = config.shard_size
    to_embed = [
        (
            first_number + j,
            ShardInput(
                files=rest.iloc[i : i + n].reset_index(drop=True), model=config.model, gallery_root=gallery_root
            ),
        )
        for j, i in enumerate(range(0, len(rest), n))
    ]
    return ShardPlan(reused=reused, to_embed=to_embed)


def embed_shard(
    shard: ShardInput, encoder: ClipEncoder, config: IndexingConfig, progress: tqdm | None = None
) -> ShardOutput:
    """Embed one self-contained shard: its files are decoded in DataLoader worker processes while the model
    encodes. PROGRESS, a tqdm bar, advances by each batch's files.

    One DataLoader per shard: its workers start and its decode pipeline refills once per shard (measured with
    2 fork workers on a busy 2-core CPU: ~0.2 s per shard, under 1% of a default 4096-image shard).
    """
    if shard.model != encoder.spec:
        raise ValueError(
            f"the shard is for `model={shard.model}`, the encoder is {encoder.spec}: embed it with an "
            f"encoder of {shard.model}"
        )
    files = [GalleryFile(*r) for r in shard.files[FILE_KEY].itertuples(index=False)]
    workers = default_workers() if config.workers < 0 else config.workers
    dataset = GalleryDataset(
        shard.gallery_root, files, encoder.preprocess, max_pixels=config.max_pixels, min_size=encoder.image_size
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.batch_size,
        num_workers=workers,
        collate_fn=collate_gallery,
        worker_init_fn=worker_init if workers else None,
        multiprocessing_context=config.mp_context if workers else None,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    emb, meta, skip = [], [], []
    for batch in loader:
        if batch.pixels.shape[0]:
            emb.append(encoder.encode_images(batch.pixels))  # (n_ok, dim)
        for j, i in enumerate(batch.indices.tolist()):
            f = files[i]
            if batch.ok[j]:
                meta.append((f.path, f.bytes, f.mtime_ns, int(batch.widths[j]), int(batch.heights[j])))
            else:
                skip.append((f.path, f.bytes, f.mtime_ns, batch.reasons[j]))
        if progress is not None:
            progress.update(len(batch.indices))
    return ShardOutput(
        embeddings=np.concatenate(emb).astype(np.float16) if emb else np.zeros((0, encoder.dim), np.float16),
        metadata=pd.DataFrame(meta, columns=META_COLUMNS),
        skipped=pd.DataFrame(skip, columns=SKIP_COLUMNS),
    )


def embed(
    plan: ShardPlan, encoder: ClipEncoder, config: IndexingConfig, work_dir: Path, progress: bool = False
) -> list[ShardOutput]:
    """Embed the planned shards one by one (`embed_shard`), writing each to WORK_DIR as it completes: a run
    killed here resumes from the shards already written. Returns their outputs in plan order."""
    outputs, n_skipped = [], 0
    total = sum(len(shard.files) for _, shard in plan.to_embed)
    with tqdm(total=total, unit="img", desc="embedding", disable=not progress, dynamic_ncols=True) as bar:
        for number, shard in plan.to_embed:
            out = embed_shard(shard, encoder, config, progress=bar)
            outputs.append(mapped(write_shard(work_dir, number, shard, out), out))  # not kept in RAM
            n_skipped += len(out.skipped)
            bar.set_postfix(skipped=n_skipped, refresh=False)
    return outputs


def merge(
    committed: IndexStore | None,
    changes: GalleryDiff,
    outputs: Sequence[ShardOutput],
    dim: int,
    scratch: Path | None = None,
) -> Change:
    """The change to commit: the rows of OUTPUTS (reused and new shards, each file once) with fresh ids in path
    order; the committed rows of deleted or changed files to delete (tombstones); the gallery's unusable files.
    Committed rows of unchanged files are not touched: they keep their id, their embedding and their segment.
    SCRATCH: a file for the added embeddings, written chunk by chunk and memory-mapped (a run of millions of
    images never holds them all in RAM); None: in RAM."""
    for out in outputs:
        if out.embeddings.shape[1:] != (dim,):
            raise ValueError(f"shard embeddings of shape {out.embeddings.shape} for an index of dim {dim}")
    new_meta = _concat([o.metadata for o in outputs], META_COLUMNS)
    order = np.argsort(new_meta["path"].to_numpy(), kind="stable")
    new_meta = new_meta.iloc[order].reset_index(drop=True)
    new_emb = _in_order([o.embeddings for o in outputs], order, dim, scratch)  # (n_new, dim) float16
    new_meta.insert(0, "id", np.arange(changes.next_id, changes.next_id + len(new_meta), dtype=np.int64))
    if committed is not None:
        held = committed.metadata["id"].to_numpy(np.int64)
        deleted = np.setdiff1d(held, held[changes.kept_rows])  # (n_removed,) ids of deleted or changed files
    else:
        deleted = np.zeros(0, np.int64)
    skipped = _concat([changes.kept_skipped] + [o.skipped for o in outputs], SKIP_COLUMNS)
    return Change(
        added=Rows(new_meta.astype(META_DTYPES), new_emb),
        deleted_ids=deleted,
        skipped=skipped.sort_values("path", kind="stable").reset_index(drop=True).astype(SKIP_DTYPES),
        next_id=changes.next_id + len(new_meta),
        count=len(changes.kept_rows) + len(new_meta),
    )


def _in_order(parts: Sequence[np.ndarray], order: np.ndarray, dim: int, scratch: Path | None) -> np.ndarray:
    """The rows of PARTS (concatenated) in ORDER, as float16: row j is input row order[j]. With SCRATCH, written
    into that .npy file in chunks and returned memory-mapped (indexes.store.write_in_order); else built in RAM."""
    if scratch is None:
        return np.concatenate([np.zeros((0, dim), np.float16)] + [np.asarray(p) for p in parts])[order].astype(
            np.float16
        )
    return write_in_order(scratch, [(p, np.arange(len(p))) for p in parts], order, dim)


# Text queries of the kind users type, whose CLIP embeddings tune approximate segments (indexes.store
# IndexWriter.commit `tuning_queries`): text sits apart from images in CLIP space (the modality gap, Liang et al.
# 2022), and an nprobe tuned on image-like queries alone gives text queries recall@10 ~0.85 instead of the target
# (benchmarks/index_scale.py hard). Generic subjects of a photo gallery, in CLIP's prompt style (Radford et al.
# 2021, Sec. 3.1.4: "A photo of a {label}.").
TUNING_TEMPLATES = ("a photo of a {}.", "a {} outdoors", "a close-up photo of the {}", "a person with a {}")
TUNING_SUBJECTS = (
    "dog", "cat", "bird", "horse", "car", "bicycle", "boat", "train", "airplane", "tree", "flower", "mountain",
    "beach", "lake", "river", "city street", "building", "bridge", "house", "kitchen", "living room", "garden",
    "park", "forest", "snowy field", "sunset", "night sky", "birthday cake", "pizza", "cup of coffee", "teapot",
    "mug", "dress", "shirt", "jacket", "sweater", "hat", "pair of shoes", "handbag", "necklace", "watch", "child",
    "family", "wedding", "concert", "football game", "laptop", "book", "painting", "toy",
)  # fmt: skip


def tuning_queries(encoder: ClipEncoder) -> np.ndarray:
    """(200, dim) float32: the CLIP text embeddings of TUNING_TEMPLATES x TUNING_SUBJECTS."""
    return encoder.encode_texts([t.format(s) for t in TUNING_TEMPLATES for s in TUNING_SUBJECTS])


def is_approximate(count: int, dim: int, index_config: IndexConfig) -> bool:
    """Whether an index of COUNT rows is built approximate (and so tuned, on text queries too) by INDEX_CONFIG."""
    return choose_index_type(max(count, 1), dim, index_config) != IndexType.FLAT


def needs_tuning_queries(committed: IndexStore | None, change: Change, config: IndexingConfig, dim: int) -> bool:
    """Whether this commit should give the store text tuning queries: it has none yet, and the index reaches the
    size of an approximate segment (a store holds one model, so stored queries stay valid)."""
    if committed is not None and committed.manifest.get("tuning_queries"):
        return False
    return is_approximate(change.count, dim, config.index)


def commit(
    writer: IndexWriter,
    change: Change,
    config: IndexingConfig,
    gallery_root: str,
    tuning: np.ndarray | None = None,
) -> dict:
    """Commit CHANGE through WRITER (indexes.store.IndexWriter.commit): one new segment for the added rows,
    tombstones for the deleted ones, the skipped list, then the manifest; a crash at any moment leaves the previous
    version readable. An index built with another index config is then rebuilt with this one (stored embeddings,
    nothing re-embedded). TUNING: text tuning queries to keep in the store (`tuning_queries`), or None. Returns the
    new manifest."""
    manifest = writer.commit(
        change.added,
        delete_ids=change.deleted_ids,
        skipped=change.skipped,
        model=config.model,
        gallery_root=gallery_root,
        next_id=change.next_id,
        index_config=config.index,
        indexing_config={k: v for k, v in asdict(config).items() if k != "index"},
        tuning_queries=tuning,
    )
    if _built_with_other_config(manifest, config):
        manifest = writer.compact(config.index, full=True) or manifest
    return manifest


def _built_with_other_config(manifest: dict, config: IndexingConfig) -> bool:
    """Whether some segment was built with another index config than CONFIG's (recorded per segment)."""
    wanted = index_config_dict(config.index)
    if manifest["format_version"] == 1:
        return manifest["index"]["config"] != wanted
    return any(s["index"].get("built_with", wanted) != wanted for s in manifest["segments"])


# ---------------------------------------------------------------- the loop
def index_gallery(
    gallery_dir: str | Path,
    index_dir: str | Path,
    config: IndexingConfig = IndexingConfig(),
    progress: bool = True,
    encoder: ClipEncoder | None = None,
    embedder: Embedder | None = None,
    wait: bool | float = False,
) -> IndexSummary:
    """Create or update the index of GALLERY_DIR in INDEX_DIR (see the module docstring).

    ENCODER: a loaded ClipEncoder of `config.model` (e.g. the one an engine holds); None loads it, only when
    there is something to embed or no index yet (whose dim it gives).
    EMBEDDER: who embeds the planned shards (step 5), e.g. `retrieval.distributed.RayEmbedder`; None embeds
    them in this process with ENCODER (`embed`). An embedder loads its own models and writes each finished
    shard to work/ as it completes, so a killed run resumes from them either way.
    WAIT: the whole run holds INDEX_DIR's writer lock; when another writer holds it, fail at once naming it
    (False), wait for it (True), or wait at most WAIT seconds.
    """
    t0 = time.perf_counter()
    index_dir = Path(index_dir)
    work_dir = index_dir / "work"
    gallery_root = resolve_gallery(gallery_dir)  # an absolute local folder, or an fsspec URL as given

    # 1. check inputs: the encoder and (under the writer lock, read once) the committed index are of config.model
    check_inputs(config, None, encoder, gallery_root)
    with IndexWriter(index_dir, wait=wait, purpose=f"indexing {gallery_root}") as writer:
        committed = writer.open()
        check_inputs(config, committed, None, gallery_root)

        # 2. scan the gallery
        scanned = scan(gallery_root)

        # 3. diff against the committed version; nothing new, changed or deleted and the same index type: keep it
        changes = diff(scanned, committed)
        if committed is not None and changes.is_empty and not _built_with_other_config(committed.manifest, config):
            return IndexSummary(
                indexed=0,
                reused=0,
                unchanged=len(changes.kept_rows),
                removed=0,
                skipped=committed.skipped,
                newly_skipped=0,
                count=committed.count,
                seconds=time.perf_counter() - t0,
                embed_seconds=0.0,
                manifest=committed.manifest,
            )

        # 4. plan: what finished shards of an interrupted run hold is reused, the rest is cut into shards
        finished = [out for _, out in finished_shards(work_dir, config.model, gallery_root)]
        plan = plan_shards(changes.todo, finished, config, gallery_root, first_number=next_shard_number(work_dir))

        # 5. embed the planned shards, each written to work/ as it completes (the resume point)
        local = embedder is None
        if local and encoder is None and (plan.to_embed or committed is None):  # a first index takes its dim from it
            encoder = ClipEncoder.from_spec(config.model, device=config.device, precision=config.precision)
        t_embed = time.perf_counter()
        if not plan.to_embed:
            embedded = []
        elif local:
            embedded = embed(plan, encoder, config, work_dir, progress=progress)
        else:
            embedded = embedder(plan, config, work_dir, progress)
        embed_seconds = time.perf_counter() - t_embed

        # 6. merge: reused and new rows get fresh ids in path order; rows of deleted or changed files are deleted
        dim = _dim(committed, encoder, plan.reused + embedded, config)
        work_dir.mkdir(parents=True, exist_ok=True)
        change = merge(committed, changes, plan.reused + embedded, dim, scratch=work_dir / "merged-embeddings.npy")

        # 7. commit the change (a new segment, tombstones, the manifest), then drop the shards it now holds; once
        # the index is large enough for approximate segments, they are tuned on text queries too
        tuning = None
        if needs_tuning_queries(committed, change, config, dim):
            if encoder is None:  # embedded elsewhere (Ray): the text tower, here
                encoder = ClipEncoder.from_spec(config.model, device=config.device, precision=config.precision)
            tuning = tuning_queries(encoder)
        manifest = commit(writer, change, config, gallery_root, tuning)
        shutil.rmtree(work_dir, ignore_errors=True)
    return IndexSummary(
        indexed=_images(embedded),
        reused=_images(plan.reused),
        unchanged=len(changes.kept_rows),
        removed=changes.removed,
        skipped=change.skipped,
        newly_skipped=sum(len(o.skipped) for o in plan.reused + embedded),
        count=change.count,
        seconds=time.perf_counter() - t0,
        embed_seconds=embed_seconds,
        manifest=manifest,
    )


def _dim(
    committed: IndexStore | None, encoder: ClipEncoder | None, outputs: Sequence[ShardOutput], config: IndexingConfig
) -> int:
    """The index's dimension: the committed one, else the encoder's, else the shards' (an embedder ran)."""
    if committed is not None:
        return committed.manifest["dim"]
    if encoder is not None:
        return encoder.dim
    if outputs:
        return outputs[0].embeddings.shape[1]
    return ClipEncoder.from_spec(config.model, device="cpu", precision="fp32").dim  # empty gallery, remote embedder


def _keys(frame: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_frame(frame[FILE_KEY])


def _concat(frames: Sequence[pd.DataFrame], columns: list[str]) -> pd.DataFrame:
    frames = [f[columns] for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def _images(outputs: Sequence[ShardOutput]) -> int:
    return sum(len(o.metadata) for o in outputs)
