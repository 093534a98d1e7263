"""Resumable training checkpoints, shared by the world's trainers (`train_clip`, `train_diffusion`, `train`).

A checkpoint is one file per stage, `FOLDER/STAGE.pt`, written atomically (a crash leaves the previous one) and
read with `torch.load(weights_only=True)`: tensors, numbers and strings only, never arbitrary pickled objects. It
carries the fingerprint of the config that wrote it; resuming under another config is refused (it would mix two
recipes). Random streams are saved with it (numpy generators as JSON, torch generators as their state tensors), so
a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from retrieval.io.atomic import write_atomic


class CheckpointMismatch(ValueError):
    """A checkpoint folder holds a run of another config: resuming from it would mix two recipes."""


def fingerprint(config) -> str:
    """The config (a dataclass) as canonical JSON: what a checkpoint must match to be resumed."""
    return json.dumps(asdict(config), sort_keys=True, default=str)


def fingerprint_value(value) -> str:
    """One field's value as `fingerprint` writes it (tuples become lists)."""
    return json.dumps(value, sort_keys=True, default=str)


def default_folder(out: str | Path) -> Path:
    """Where a trainer writing the model folder OUT keeps its checkpoints unless told otherwise: OUT.checkpoints."""
    return Path(f"{Path(out)}.checkpoints")


def save_checkpoint(folder: str | Path | None, stage: str, config, state: dict) -> None:
    """STATE (tensors, numbers, strings, dicts and lists of them) to FOLDER/STAGE.pt, atomically; no FOLDER: nothing."""
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    payload = {**state, "config": fingerprint(config)}
    write_atomic(Path(folder) / f"{stage}.pt", lambda tmp: torch.save(payload, tmp))


def load_checkpoint(folder: str | Path | None, stage: str, config) -> dict | None:
    """The STAGE checkpoint in FOLDER written under CONFIG, or None when there is none; CheckpointMismatch when it
    was written under another config."""
    path = Path(folder) / f"{stage}.pt" if folder else None
    if path is None or not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("config") != fingerprint(config):
        raise CheckpointMismatch(
            f"{path} was written by a run with another config: resume with that config, or delete "
            f"{Path(folder)} to start this one from scratch"
        )
    return state


def rng_state(rng: np.random.Generator) -> str:
    return json.dumps(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: str) -> None:
    rng.bit_generator.state = json.loads(state)
