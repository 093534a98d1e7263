"""The PerVL reader on the real PerVL-DeepFashion2 annotation files, on stand-in images, and on broken files."""

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.pervl_data import (
    PervlFormatError,
    fsl_image_path,
    missing_images,
    normalize_pair_id,
    query_image_path,
    read_split,
)

REAL = Path(__file__).resolve().parents[2] / "shared/pervl/deep_fashion"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"PerVL annotation files not found at {REAL}")


# ----- the real files


@needs_real
def test_real_test_split():
    split = read_split(REAL, "test")
    assert len(split.fsl_train) == 50 and split.n_fsl_images == 653
    assert len(split.queries) == 221 and split.queries["pair_id"].nunique() == 50
    assert set(split.queries["pair_id"]) == set(split.fsl_train)
    assert min(map(len, split.fsl_train.values())) == 10 and max(map(len, split.fsl_train.values())) == 21
    assert split.fsl_train["10071"][:2] == ["127479.jpg", "127481.jpg"]
    assert split.queries.iloc[0].to_dict() == {
        "image_name": "train/image/043380.jpg",
        "pair_id": "3430",
        "caption": "a person poses on a plush white couch.",
    }
    assert split.queries["caption"].str.contains("person").all()
    assert set(split.categories) == set(split.fsl_train)
    assert Counter(split.categories.values()) == {
        "skirt": 15,
        "short sleeve top": 11,
        "vest": 8,
        "vest dress": 5,
        "trousers": 5,
        "long sleeve top": 3,
        "sling dress": 2,
        "long sleeve dress": 1,
    }


@needs_real
def test_real_validation_split():
    split = read_split(REAL, "validation")
    assert len(split.fsl_train) == 50 and split.n_fsl_images == 661
    assert len(split.queries) == 229 and split.queries["pair_id"].nunique() == 50
    assert split.queries["caption"].str.contains("person").all()
    assert set(split.categories) == set(split.fsl_train)
    assert not set(split.fsl_train) & set(read_split(REAL, "test").fsl_train)


@needs_real
@pytest.mark.parametrize("split_name, n_queries, n_shortened", [("test", 221, 204), ("validation", 229, 215)])
def test_real_caption_variants(split_name, n_queries, n_shortened):
    default = read_split(REAL, split_name).queries
    short = read_split(REAL, split_name, "short").queries
    detailed = read_split(REAL, split_name, "detailed").queries
    for variant in (short, detailed):
        assert variant[["image_name", "pair_id"]].equals(default[["image_name", "pair_id"]])
        assert variant["caption"].str.contains("person").all()
    assert len(short) == n_queries
    assert (short["caption"] != default["caption"]).sum() == n_shortened  # the rest were short already
    assert short["caption"].str.len().mean() < default["caption"].str.len().mean()
    # a fact of the published files: for evaluation images the "detailed" captions ARE the default ones
    assert detailed["caption"].equals(default["caption"])


@needs_real
def test_missing_images_on_stand_ins(tmp_path):
    split = read_split(REAL, "test")
    present = split.pair_ids[:3]
    for pair_id in present:
        names = [fsl_image_path(tmp_path, n) for n in split.fsl_train[pair_id]]
        names += [
            query_image_path(tmp_path, n) for n in split.queries.loc[split.queries.pair_id == pair_id, "image_name"]
        ]
        for i, path in enumerate(names):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), i * 10 % 256, np.uint8)).save(path)
    missing = missing_images(split, tmp_path)
    expected = [fsl_image_path(tmp_path, n) for p in split.pair_ids[3:] for n in split.fsl_train[p]]
    expected += [
        query_image_path(tmp_path, n) for n in split.queries.loc[~split.queries.pair_id.isin(present), "image_name"]
    ]
    assert missing == expected
    assert len(missing_images(split, tmp_path / "nowhere")) == 653 + 221


# ----- id conventions and broken files


def write_annotations(
    root: Path,
    fsl: str,
    captions: str,
    categories: str = "unique_pair_ids,pair_id_categories\n42,skirt\n7,vest\n",
    short: str | None = None,
) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "test_fsl_train.txt").write_text(fsl)
    (root / "test_captions.csv").write_text(captions)
    (root / "train_coarse_grained_names.csv").write_text(categories)
    if short is not None:
        (root / "shortened_deepfashion2_captions.csv").write_text(short)
    return root


FSL = "codes_infer/0042:\n000001.jpg\n000002.jpg\n\ncodes_infer/7:\n000003.jpg\n"
CAPTIONS = (
    "image_name,pair_id,caption\ntrain/image/000010.jpg,42,a person on a beach.\n"
    'train/image/000011.jpg,007,"by a wall, a person stands."\n'
)


def test_zero_padded_ids_are_normalised(tmp_path):
    split = read_split(write_annotations(tmp_path, FSL, CAPTIONS), "test")
    assert split.fsl_train == {"42": ["000001.jpg", "000002.jpg"], "7": ["000003.jpg"]}
    assert split.queries["pair_id"].tolist() == ["42", "7"]
    assert split.queries["caption"].tolist()[1] == "by a wall, a person stands."
    assert split.categories == {"42": "skirt", "7": "vest"}
    assert normalize_pair_id(" 0042 ", "here") == "42"
    with pytest.raises(PervlFormatError, match="not a decimal integer"):
        normalize_pair_id("a42", "here")


def test_windows_line_endings_and_trailing_spaces_are_read(tmp_path):
    fsl = FSL.replace("\n", " \r\n")
    assert read_split(write_annotations(tmp_path, fsl, CAPTIONS), "test").n_fsl_images == 3


@pytest.mark.parametrize(
    "fsl, message",
    [
        ("000001.jpg\ncodes_infer/42:\n000002.jpg\n", r"test_fsl_train.txt:1: .*before any"),
        ("codes_infer/42:\n000001.jpg\nsome words here\n", r"test_fsl_train.txt:3: expected"),
        ("codes_infer/42:\n000001.jpg\ncodes_infer/42:\n000002.jpg\n", "listed twice"),
        ("codes_infer/42:\n\ncodes_infer/7:\n000003.jpg\n", "no few-shot images"),
        ("", "no `codes_infer"),
    ],
)
def test_malformed_fsl_lines_are_named(tmp_path, fsl, message):
    with pytest.raises(PervlFormatError, match=message):
        read_split(write_annotations(tmp_path, fsl, CAPTIONS), "test")


def test_inconsistent_files_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="test_fsl_train.txt"):
        read_split(tmp_path, "test")
    with pytest.raises(PervlFormatError, match="missing columns"):
        read_split(write_annotations(tmp_path / "a", FSL, "image,pair_id,caption\nx.jpg,42,a person.\n"), "test")
    with pytest.raises(PervlFormatError, match=r"only in the captions \['9'\]"):
        read_split(write_annotations(tmp_path / "b", FSL, CAPTIONS + "train/image/000012.jpg,9,a person.\n"), "test")
    with pytest.raises(PervlFormatError, match="no category"):
        read_split(
            write_annotations(tmp_path / "c", FSL, CAPTIONS, "unique_pair_ids,pair_id_categories\n42,skirt\n"), "test"
        )
    with pytest.raises(PervlFormatError, match="also listed as few-shot"):
        read_split(write_annotations(tmp_path / "d", FSL, CAPTIONS.replace("000010", "000001")), "test")
    with pytest.raises(PervlFormatError, match="empty field"):
        read_split(write_annotations(tmp_path / "e", FSL, CAPTIONS.replace("a person on a beach.", "")), "test")
    short = "image_name,pair_id,caption\ntrain/image/000010.jpg,42,a person.\n"
    root = write_annotations(tmp_path / "f", FSL, CAPTIONS, short=short)
    with pytest.raises(PervlFormatError, match="no short caption for 1 evaluation images"):
        read_split(root, "test", "short")
    with pytest.raises(FileNotFoundError, match="detailed_deepfashion2_captions.csv"):
        read_split(root, "test", "detailed")
    with pytest.raises(ValueError, match="captions='long'"):
        read_split(root, "test", "long")
