"""Shards: the self-contained unit of indexing work.

A shard's input is a list of gallery files (path relative to the gallery root, size, mtime) plus the
model spec; its output is their embeddings and metadata, and the files that could not be used with a
reason. Nothing in a shard refers to other shards, so independent workers (other processes, other
machines) can embed shards and drop their folders into ``<index>/work/``; the next commit merges them.

On disk, one folder per finished shard, renamed into place atomically (so a shard folder that exists is
complete):  work/shard-000012/{input.json, embeddings.npy, metadata.parquet, skipped.parquet}
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from retrieval.io.atomic import atomic_dir

SHARD_FORMAT_VERSION = 1
META_COLUMNS = ["path", "bytes", "mtime_ns", "width", "height"]
SKIP_COLUMNS = ["path", "bytes", "mtime_ns", "reason"]


@dataclass
class ShardInput:
    """What to embed: files of one gallery, with the model that must embed them."""

    files: pd.DataFrame  # columns path, bytes, mtime_ns
    model: str  # model spec
    gallery_root: str  # absolute path of the gallery the paths are relative to

    def to_json(self) -> dict:
        return {
            "format_version": SHARD_FORMAT_VERSION,
            "model": self.model,
            "gallery_root": self.gallery_root,
            "files": self.files[["path", "bytes", "mtime_ns"]].to_dict("records"),
        }


@dataclass
class ShardOutput:
    """What came out: one embedding per usable file, and the unusable files with their reason."""

    embeddings: np.ndarray  # (n_ok, dim) float16, L2-normalised before the cast
    metadata: pd.DataFrame  # (n_ok,) columns META_COLUMNS, row i <-> embeddings[i]
    skipped: pd.DataFrame  # columns SKIP_COLUMNS


def write_shard(work_dir: Path, number: int, shard: ShardInput, out: ShardOutput) -> Path:
    """Write a finished shard as work_dir/shard-NNNNNN, atomically (the folder appears complete or not at all)."""
    if len(out.metadata) != len(out.embeddings):
        raise ValueError(f"shard {number}: {len(out.metadata)} metadata rows for {len(out.embeddings)} embeddings")
    target = work_dir / f"shard-{number:06d}"
    with atomic_dir(target) as tmp:
        (tmp / "input.json").write_text(json.dumps(shard.to_json()))
        with open(tmp / "embeddings.npy", "wb") as f:
            np.save(f, np.ascontiguousarray(out.embeddings, dtype=np.float16), allow_pickle=False)
        out.metadata[META_COLUMNS].to_parquet(tmp / "metadata.parquet", index=False)
        out.skipped[SKIP_COLUMNS].to_parquet(tmp / "skipped.parquet", index=False)
    return target


def mapped(folder: Path, out: ShardOutput) -> ShardOutput:
    """OUT with its embeddings memory-mapped from the shard written at FOLDER (`write_shard`), so that a run holds
    no finished shard's embeddings in RAM: the page cache does, and gives them back under memory pressure."""
    return replace(out, embeddings=np.load(folder / "embeddings.npy", mmap_mode="r", allow_pickle=False))


def read_shard(folder: Path) -> tuple[ShardInput, ShardOutput]:
    info = json.loads((folder / "input.json").read_text())
    if info.get("format_version") != SHARD_FORMAT_VERSION:
        raise ValueError(f"{folder}: shard format {info.get('format_version')} is not {SHARD_FORMAT_VERSION}")
    shard = ShardInput(
        files=pd.DataFrame(info["files"], columns=["path", "bytes", "mtime_ns"]),
        model=info["model"],
        gallery_root=info["gallery_root"],
    )
    out = ShardOutput(
        embeddings=np.load(folder / "embeddings.npy", mmap_mode="r", allow_pickle=False),  # read as merged
        metadata=pd.read_parquet(folder / "metadata.parquet"),
        skipped=pd.read_parquet(folder / "skipped.parquet"),
    )
    return shard, out


def finished_shards(work_dir: Path, model: str, gallery_root: str) -> list[tuple[Path, ShardOutput]]:
    """Finished shards in `work_dir` made by `model` for `gallery_root`, in shard-number order.
    Shards of another model or gallery are ignored (they are not this run's work)."""
    found = []
    for folder in sorted(work_dir.glob("shard-*")) if work_dir.is_dir() else []:
        try:
            shard, out = read_shard(folder)
        except (OSError, ValueError, KeyError) as e:  # unreadable: ignore it, its files get re-embedded
            warnings.warn(f"ignoring unreadable shard {folder.name}: {e}")
            continue
        if shard.model == model and shard.gallery_root == gallery_root:
            found.append((folder, out))
    return found


def next_shard_number(work_dir: Path) -> int:
    numbers = [int(p.name.split("-")[1]) for p in work_dir.glob("shard-*")] if work_dir.is_dir() else []
    return max(numbers, default=-1) + 1
