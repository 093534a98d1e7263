"""Read a PerVL-DeepFashion2 split (Cohen et al., ECCV 2022; NVlabs/PerVLBenchmark, annotations/deep_fashion/).

    split = read_split("/work/shared/pervl/deep_fashion", "test")      # the real annotations
    split = read_split(write_split(out, WorldConfig()).annotations)      # a toy-world split, same code
    missing_images(split, images_root)                                   # what to fetch before evaluating

Files, as the real ones are (the toy world writes the same):
- `<split>_fsl_train.txt`: blocks `codes_infer/<pair_id>:` then one image file name per line (`127479.jpg`),
  blocks separated by a blank line. The names live under `<images root>/train/image/`.
- `<split>_captions.csv`: image_name,pair_id,caption; one evaluation image a row, image_name relative to the
  images root (`train/image/043380.jpg`). Every caption says "person".
- `shortened_deepfashion2_captions.csv`, `detailed_deepfashion2_captions.csv`: the same columns for the
  evaluation images of both splits (and some few-shot images); read filtered to the split's evaluation images.
- `train_coarse_grained_names.csv`: unique_pair_ids,pair_id_categories, for every DeepFashion2 pair_id.

Pair ids are decimal integers. In the real files the txt headers and the csv columns already agree as strings
(no zero padding anywhere); they are still normalised to `str(int(id))` everywhere, so a zero-padded id
(`0042`) written by another tool joins with `42` instead of silently missing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

CAPTION_FILES = {
    "default": "{split}_captions.csv",
    "short": "shortened_deepfashion2_captions.csv",
    "detailed": "detailed_deepfashion2_captions.csv",
}
CAPTION_COLUMNS = ["image_name", "pair_id", "caption"]
CATEGORY_FILE = "train_coarse_grained_names.csv"
CATEGORY_COLUMNS = ["unique_pair_ids", "pair_id_categories"]
FSL_IMAGE_DIR = Path("train/image")  # few-shot images, relative to the images root

_HEADER = re.compile(r"codes_infer/([^/:\s]+):")
_IMAGE_NAME = re.compile(r"[^/\\\s]+\.(jpg|jpeg|png)", re.IGNORECASE)


class PervlFormatError(ValueError):
    """An annotation file that does not follow PerVL's format; the message names the file and line."""


@dataclass(frozen=True)
class PervlSplit:
    split: str
    fsl_train: dict[str, list[str]]  # pair_id -> few-shot image names as written ("127479.jpg"), file order
    queries: pd.DataFrame  # image_name, pair_id, caption: one row per evaluation image
    categories: dict[str, str]  # pair_id -> coarse category word ("skirt", "vest dress", ...)

    @property
    def pair_ids(self) -> list[str]:
        """The split's concepts, in the order of the few-shot file."""
        return list(self.fsl_train)

    @property
    def n_fsl_images(self) -> int:
        return sum(len(names) for names in self.fsl_train.values())


def normalize_pair_id(value, where: str) -> str:
    """'0042', 42, ' 42 ' -> '42'; anything but a non-negative decimal integer is a format error."""
    text = str(value).strip()
    if not text.isdigit():
        raise PervlFormatError(f"{where}: pair_id {value!r} is not a decimal integer")
    return str(int(text))


def _require(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"PerVL {what} file {path} not found; point at a folder holding PerVL's annotations/deep_fashion/ files "
            f"(NVlabs/PerVLBenchmark) or the annotations/ folder written by benchmarks.world.write_split"
        )
    return path


def read_fsl_train(path: str | Path) -> dict[str, list[str]]:
    """Parse a `<split>_fsl_train.txt`: pair_id -> image names, both in file order."""
    path = _require(Path(path), "few-shot list")
    out: dict[str, list[str]] = {}
    current = None
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        header = _HEADER.fullmatch(line)
        if header:
            current = normalize_pair_id(header[1], where)
            if current in out:
                raise PervlFormatError(f"{where}: concept {current} is listed twice")
            out[current] = []
        elif not _IMAGE_NAME.fullmatch(line):
            raise PervlFormatError(
                f"{where}: expected `codes_infer/<pair_id>:` or an image file name like 127479.jpg, got {raw!r}"
            )
        elif current is None:
            raise PervlFormatError(f"{where}: image {line!r} comes before any `codes_infer/<pair_id>:` header")
        elif line in out[current]:
            raise PervlFormatError(f"{where}: image {line!r} is listed twice for concept {current}")
        else:
            out[current].append(line)
    empty = [pair_id for pair_id, names in out.items() if not names]
    if empty:
        raise PervlFormatError(f"{path}: concepts {empty} have no few-shot images")
    if not out:
        raise PervlFormatError(f"{path}: no `codes_infer/<pair_id>:` header found")
    return out


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise PervlFormatError(f"{path}: missing columns {missing}; expected {columns}, found {list(frame.columns)}")
    frame = frame[columns]
    if (frame == "").to_numpy().any():
        row = int((frame == "").any(axis=1).to_numpy().argmax())
        raise PervlFormatError(f"{path}: empty field in data row {row + 1}: {frame.iloc[row].to_dict()}")
    return frame


def read_captions(path: str | Path) -> pd.DataFrame:
    """A captions csv (image_name, pair_id, caption) with pair_ids normalised; image names must be unique."""
    path = _require(Path(path), "captions")
    frame = _read_csv(path, CAPTION_COLUMNS)
    frame["pair_id"] = [normalize_pair_id(v, f"{path} row {i + 1}") for i, v in enumerate(frame["pair_id"])]
    duplicated = frame["image_name"][frame["image_name"].duplicated()].tolist()
    if duplicated:
        raise PervlFormatError(f"{path}: image_name repeated: {duplicated[:5]}")
    return frame.reset_index(drop=True)


def read_categories(path: str | Path) -> dict[str, str]:
    """train_coarse_grained_names.csv: pair_id -> coarse category word."""
    path = _require(Path(path), "category names")
    frame = _read_csv(path, CATEGORY_COLUMNS)
    out: dict[str, str] = {}
    for i, (pair_id, category) in enumerate(zip(frame["unique_pair_ids"], frame["pair_id_categories"])):
        pair_id = normalize_pair_id(pair_id, f"{path} row {i + 1}")
        if out.setdefault(pair_id, category) != category:
            raise PervlFormatError(f"{path}: pair_id {pair_id} has two categories, {out[pair_id]!r} and {category!r}")
    return out


def read_split(
    annotations_dir: str | Path, split: str = "test", captions: Literal["default", "short", "detailed"] = "default"
) -> PervlSplit:
    """Read one split: few-shot lists, evaluation captions (default, short or detailed) and categories."""
    if captions not in CAPTION_FILES:
        raise ValueError(f"captions={captions!r}; choose one of {sorted(CAPTION_FILES)}")
    root = Path(annotations_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"annotations folder {root} not found")
    # 1. few-shot lists and the split's evaluation images
    fsl = read_fsl_train(root / f"{split}_fsl_train.txt")
    queries = read_captions(root / CAPTION_FILES["default"].format(split=split))

    # 2. caption variant: the split's evaluation images, in the split's order, captions from the variant file
    if captions != "default":
        variant_path = root / CAPTION_FILES[captions]
        variant = read_captions(variant_path).set_index("image_name")
        absent = queries["image_name"][~queries["image_name"].isin(variant.index)].tolist()
        if absent:
            raise PervlFormatError(
                f"{variant_path}: no {captions} caption for {len(absent)} evaluation images of "
                f"{split}, e.g. {absent[:3]}"
            )
        matched = variant.loc[queries["image_name"]]
        disagree = queries["image_name"][matched["pair_id"].to_numpy() != queries["pair_id"].to_numpy()].tolist()
        if disagree:
            raise PervlFormatError(f"{variant_path}: pair_id differs from {split}'s captions file for {disagree[:3]}")
        queries = queries.assign(caption=matched["caption"].to_numpy())

    # 3. the two files must describe the same concepts, and no evaluation image may be a few-shot image
    only_fsl = sorted(set(fsl) - set(queries["pair_id"]), key=int)
    only_queries = sorted(set(queries["pair_id"]) - set(fsl), key=int)
    if only_fsl or only_queries:
        raise PervlFormatError(
            f"{root}: {split}'s few-shot list and captions disagree on concepts: only in the "
            f"few-shot list {only_fsl[:10]}, only in the captions {only_queries[:10]}"
        )
    shots = {(FSL_IMAGE_DIR / name).as_posix() for names in fsl.values() for name in names}
    leaked = queries["image_name"][queries["image_name"].isin(shots)].tolist()
    if leaked:
        raise PervlFormatError(f"{root}: evaluation images also listed as few-shot images: {leaked[:5]}")

    # 4. categories of the split's concepts
    all_categories = read_categories(root / CATEGORY_FILE)
    uncategorised = [pair_id for pair_id in fsl if pair_id not in all_categories]
    if uncategorised:
        raise PervlFormatError(f"{root / CATEGORY_FILE}: no category for pair_ids {uncategorised[:10]}")
    return PervlSplit(
        split=split, fsl_train=fsl, queries=queries, categories={pair_id: all_categories[pair_id] for pair_id in fsl}
    )


def fsl_image_path(images_root: str | Path, name: str) -> Path:
    """Where a few-shot image lives: <images_root>/train/image/<name>."""
    return Path(images_root) / FSL_IMAGE_DIR / name


def query_image_path(images_root: str | Path, image_name: str) -> Path:
    """Where an evaluation image lives: <images_root>/<image_name> (image_name is train/image/NNNNNN.jpg)."""
    return Path(images_root) / image_name


def missing_images(split: PervlSplit, images_root: str | Path) -> list[Path]:
    """Every image the split names that is not a file under images_root: few-shot images, then queries."""
    paths = [fsl_image_path(images_root, name) for names in split.fsl_train.values() for name in names]
    paths += [query_image_path(images_root, name) for name in split.queries["image_name"]]
    return [p for p in paths if not p.is_file()]
