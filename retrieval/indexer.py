"""Index a gallery folder: scan, embed new or changed images in resumable shards, commit a new generation.

    index_gallery(gallery_dir, index_dir, IndexingConfig(model="ViT-L-14-quickgelu/openai"))

Steps, each visible below:
 1. scan the gallery (sorted, deterministic);
 2. diff against the committed index: unchanged files keep their id and embedding, deleted files drop out,
    new or changed files (size or mtime differ) are to embed;
 3. reuse finished shards of an interrupted run (same model and gallery) instead of re-embedding them;
 4. embed the rest, decoding in DataLoader worker processes while the model encodes, one shard folder
    written atomically per `shard_size` images;
 5. commit: ids for new files (in path order, never reusing an id), build the FAISS index, atomic switch.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from indexes.shards import META_COLUMNS, SKIP_COLUMNS, ShardInput, ShardOutput, finished_shards, next_shard_number, write_shard
from indexes.store import IndexStoreError, index_config_dict, commit_generation, read_manifest
from indexes.vector_index import IndexConfig
from retrieval.models.encoders import ClipEncoder
from retrieval.gallery import GalleryDataset, GalleryFile, collate_gallery, scan_gallery, worker_init
from retrieval.io.images import DEFAULT_MAX_PIXELS
from retrieval.models.clip import DEFAULT_MODEL

FILE_KEY = ["path", "bytes", "mtime_ns"]


def default_workers() -> int:
    """Decoding processes: one core is left to the encoder; at most 4 (decoding a 224 px batch is cheap)."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class IndexingConfig:
    model: str = DEFAULT_MODEL          # CLIP model SPEC (retrieval.models.clip)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    precision: str = "auto"             # auto (GPU: bf16/fp16, CPU: fp32) | fp32 | fp16 | bf16
    batch_size: int = 64                # images per forward pass
    workers: int = -1                   # decoding processes; -1 = default_workers(), 0 = decode in this process
    shard_size: int = 4096              # images per shard: the resume granularity after a crash
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are skipped (decompression-bomb guard)
    # Worker start method. GNU OpenMP (faiss, torch) is not fork-safe (faiss#5206, pytorch#45198) when a
    # forked child enters a parallel region; workers run with one thread (worker_init), so they never do,
    # and fork starts them in milliseconds where spawn/forkserver re-import torch (seconds per run).
    mp_context: str = "fork" if sys.platform == "linux" else "spawn"
    index: IndexConfig = field(default_factory=IndexConfig)

    def __post_init__(self):
        if self.batch_size < 1 or self.shard_size < 1:
            raise ValueError("batch_size and shard_size must be >= 1")


@dataclass
class IndexSummary:
    indexed: int            # images embedded in this run
    reused: int             # images taken from finished shards of an interrupted run
    unchanged: int          # images kept from the previous index as they were
    removed: int            # images of the previous index no longer in the gallery (or changed)
    skipped: pd.DataFrame   # path, bytes, mtime_ns, reason: every unusable file of the gallery
    newly_skipped: int      # of which found in this run
    count: int              # images in the committed index
    seconds: float          # wall time of the whole run
    embed_seconds: float    # wall time of the embedding loop
    manifest: dict

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.embed_seconds if self.embed_seconds > 0 else 0.0

    def format(self) -> str:
        lines = [
            f"indexed {self.indexed} new or changed images ({self.images_per_second:.1f} images/s), "
            f"reused {self.reused} from finished shards, kept {self.unchanged} unchanged, removed {self.removed}; "
            f"skipped {len(self.skipped)} files ({self.newly_skipped} new); index holds {self.count} images "
            f"({self.manifest['index']['params']['index_type'] if self.manifest['index']['params'] else 'empty'}); "
            f"{self.seconds:.1f} s in all",
        ]
        for row in self.skipped.itertuples():
            lines.append(f"  skipped {row.path}: {row.reason}")
        return "\n".join(lines)


def _files_frame(files: Sequence[GalleryFile]) -> pd.DataFrame:
    return pd.DataFrame([(f.path, f.bytes, f.mtime_ns) for f in files], columns=FILE_KEY).astype(
        {"bytes": "int64", "mtime_ns": "int64"}
    )


def _keys(frame: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_frame(frame[FILE_KEY])


def embed_shards(
    shards: Sequence[ShardInput], encoder: ClipEncoder, config: IndexingConfig, progress=None
) -> Iterator[tuple[int, ShardOutput]]:
    """Embed each shard's files; yields (shard position, output) as each shard completes.

    One DataLoader serves all shards (workers start once); its batches never cross a shard boundary.
    """
    if not shards:
        return
    root = shards[0].gallery_root
    files = [GalleryFile(*r) for s in shards for r in s.files[FILE_KEY].itertuples(index=False)]
    batches, ends, start = [], [], 0
    for s in shards:
        n = len(s.files)
        batches += [list(range(i, min(i + config.batch_size, start + n))) for i in range(start, start + n, config.batch_size)]
        start += n
        ends.append(len(batches))  # shard s is complete after batch number ends[s]
    workers = default_workers() if config.workers < 0 else config.workers
    dataset = GalleryDataset(root, files, encoder.preprocess, max_pixels=config.max_pixels, min_size=encoder.image_size)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=collate_gallery,
        worker_init_fn=worker_init if workers else None,
        multiprocessing_context=config.mp_context if workers else None,
        pin_memory=encoder.device.type == "cuda",
        prefetch_factor=4 if workers else None,
    )
    emb, meta, skip, shard_i = [], [], [], 0
    for b, batch in enumerate(loader):
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
            progress.set_postfix(skipped=len(skip), refresh=False)
        if b + 1 == ends[shard_i]:
            dim = encoder.dim
            yield shard_i, ShardOutput(
                embeddings=np.concatenate(emb).astype(np.float16) if emb else np.zeros((0, dim), np.float16),
                metadata=pd.DataFrame(meta, columns=META_COLUMNS),
                skipped=pd.DataFrame(skip, columns=SKIP_COLUMNS),
            )
            emb, meta, skip, shard_i = [], [], [], shard_i + 1


def embed_shard(shard: ShardInput, encoder: ClipEncoder, config: IndexingConfig) -> ShardOutput:
    """Embed one self-contained shard (for workers that embed shards independently)."""
    return next(embed_shards([shard], encoder, config))[1]


def index_gallery(
    gallery_dir: str | Path,
    index_dir: str | Path,
    config: IndexingConfig = IndexingConfig(),
    encoder: ClipEncoder | None = None,
    progress: bool = True,
) -> IndexSummary:
    """Create or update the index of GALLERY_DIR in INDEX_DIR (see module docstring)."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    gallery_root = str(Path(gallery_dir).resolve())
    index_dir = Path(index_dir)
    work_dir = index_dir / "work"
    if encoder is not None and encoder.spec != config.model:
        raise ValueError(f"encoder is {encoder.spec} but config.model is {config.model}")

    # 1. scan
    current = _files_frame(scan_gallery(gallery_root))

    # 2. diff against the committed generation
    old = read_manifest(index_dir)
    if old is not None and old["model"] != config.model:
        raise IndexStoreError(
            f"the index in {index_dir} was built with --model {old['model']}, not {config.model}: index into a new "
            f"--index-dir, or run with --model {old['model']}"
        )
    if old is not None and old["gallery_root"] != gallery_root:
        warnings.warn(f"{index_dir} indexed {old['gallery_root']}; now indexing {gallery_root} (paths are relative)")
    if old is not None and old["count"] + old["skipped"] > 0:
        gen = index_dir / old["directory"]
        old_meta = pd.read_parquet(gen / "metadata.parquet")
        old_emb = np.load(gen / "embeddings.npy", mmap_mode="r", allow_pickle=False)
        old_skip = pd.read_parquet(gen / "skipped.parquet")
        next_id = old["next_id"]
    else:
        old_meta = pd.DataFrame(columns=["id"] + META_COLUMNS)
        old_emb, old_skip, next_id = None, pd.DataFrame(columns=SKIP_COLUMNS), 0
    cur_keys = _keys(current)
    keep_rows = np.flatnonzero(_keys(old_meta).isin(cur_keys)) if len(old_meta) else np.zeros(0, int)
    keep_skip = old_skip[_keys(old_skip).isin(cur_keys)] if len(old_skip) else old_skip
    known = _keys(old_meta.iloc[keep_rows]).append(_keys(keep_skip)) if len(old_meta) or len(keep_skip) else None
    todo = current[~cur_keys.isin(known)] if known is not None and len(known) else current

    # 3. finished shards of an interrupted run
    done = finished_shards(work_dir, config.model, gallery_root)
    done_meta = [out.metadata.assign(_shard=i) for i, (_, out) in enumerate(done)]
    done_emb = [out.embeddings for _, out in done]
    done_skip = [out.skipped for _, out in done]
    done_keys = pd.concat([m[FILE_KEY] for m in done_meta] + [s[FILE_KEY] for s in done_skip]) if done else current.iloc[:0]
    remaining = todo[~_keys(todo).isin(_keys(done_keys))] if len(done_keys) else todo

    unchanged = old is not None and not len(todo) and not done and len(keep_rows) == len(old_meta) \
        and len(keep_skip) == len(old_skip) and old["index"]["config"] == index_config_dict(config.index)
    if unchanged:  # nothing to embed, drop or rebuild: keep the committed generation as it is
        return IndexSummary(indexed=0, reused=0, unchanged=len(keep_rows), removed=0, skipped=old_skip,
                            newly_skipped=0, count=old["count"], seconds=time.perf_counter() - t0,
                            embed_seconds=0.0, manifest=old)

    # 4. embed what is left, shard by shard
    t_embed = time.perf_counter()
    if len(remaining):
        if encoder is None:
            encoder = ClipEncoder.from_spec(config.model, device=config.device, precision=config.precision)
        first = next_shard_number(work_dir)
        shards = [
            ShardInput(files=remaining.iloc[i : i + config.shard_size].reset_index(drop=True), model=config.model,
                       gallery_root=gallery_root)
            for i in range(0, len(remaining), config.shard_size)
        ]
        bar = tqdm(total=len(remaining), unit="img", desc="embedding", disable=not progress, dynamic_ncols=True)
        with bar:
            for s, out in embed_shards(shards, encoder, config, progress=bar):
                write_shard(work_dir, first + s, shards[s], out)
                done_meta.append(out.metadata.assign(_shard=len(done_emb)))
                done_emb.append(out.embeddings)
                done_skip.append(out.skipped)
    embed_seconds = time.perf_counter() - t_embed

    # 5. merge and commit: unchanged rows keep their id, new rows get fresh ids in path order
    new_meta = pd.concat(done_meta, ignore_index=True) if done_meta else pd.DataFrame(columns=META_COLUMNS + ["_shard"])
    new_emb = np.concatenate(done_emb) if done_emb else np.zeros((0, old_emb.shape[1] if old_emb is not None else 0), np.float16)
    wanted = _keys(new_meta).isin(_keys(todo)) if len(new_meta) else np.zeros(0, bool)
    new_meta, new_emb = new_meta[wanted].drop(columns="_shard"), new_emb[wanted]
    order = np.argsort(new_meta["path"].to_numpy(), kind="stable")
    new_meta, new_emb = new_meta.iloc[order].reset_index(drop=True), new_emb[order]
    new_meta.insert(0, "id", np.arange(next_id, next_id + len(new_meta), dtype=np.int64))
    kept_meta = old_meta.iloc[keep_rows].reset_index(drop=True)
    if new_emb.shape[1] == 0 and old_emb is None and len(new_meta) == 0:
        dim = encoder.dim if encoder is not None else ClipEncoder.from_spec(config.model, device="cpu").dim
        new_emb = np.zeros((0, dim), np.float16)
    metadata = pd.concat([kept_meta, new_meta], ignore_index=True).astype(
        {"id": "int64", "bytes": "int64", "mtime_ns": "int64", "width": "int64", "height": "int64"}
    )
    embeddings = np.concatenate([np.asarray(old_emb[keep_rows]) if old_emb is not None else new_emb[:0], new_emb])
    new_skip = pd.concat(done_skip, ignore_index=True) if done_skip else pd.DataFrame(columns=SKIP_COLUMNS)
    new_skip = new_skip[_keys(new_skip).isin(_keys(todo))] if len(new_skip) else new_skip
    skipped = pd.concat([keep_skip, new_skip], ignore_index=True).sort_values("path", kind="stable").reset_index(drop=True)
    skipped = skipped.astype({"bytes": "int64", "mtime_ns": "int64", "reason": "str", "path": "str"})

    manifest = commit_generation(
        index_dir, metadata, embeddings, skipped, model=config.model, gallery_root=gallery_root,
        next_id=int(next_id + len(new_meta)), index_config=config.index,
        indexing_config={k: v for k, v in asdict(config).items() if k != "index"},
    )
    shutil.rmtree(work_dir, ignore_errors=True)  # merged: the shards are now part of the generation
    n_reused = sum(len(m) for m in done_meta[: len(done)]) + sum(len(s) for s in done_skip[: len(done)])
    return IndexSummary(
        indexed=len(remaining), reused=min(n_reused, len(todo)), unchanged=len(keep_rows),
        removed=len(old_meta) - len(keep_rows), skipped=skipped, newly_skipped=len(new_skip),
        count=len(metadata), seconds=time.perf_counter() - t0, embed_seconds=embed_seconds, manifest=manifest,
    )
