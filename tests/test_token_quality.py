"""benchmarks/token_quality.py's measures on made-up features: MRR and AUCs of a prompt, and the method variants."""

import json

import numpy as np
import pytest

from benchmarks import token_quality


class FixedText:
    """A stand-in CLIP whose every prompt embeds to one fixed unit vector."""

    def __init__(self, vector):
        self.vector = np.asarray(vector, dtype=np.float32)

    def encode_texts(self, prompts, vectors=None):
        return np.stack([self.vector] * len(prompts))


def test_mrr_ranks_each_concept_image_against_the_other_concepts_images_only():
    clip = FixedText([1.0, 0.0])
    concept = np.array([[0.9, 0.1], [0.2, 0.9]])  # scores 0.9 and 0.2
    others = np.array([[0.5, 0.5], [0.3, 0.7], [0.95, 0.0]])  # scores 0.5, 0.3, 0.95
    m = token_quality.evaluate_prompt(clip, "p", None, None, concept, others, concept, others)
    assert m["mrr"] == (1 / 2 + 1 / 4) / 2  # 0.9: one other above; 0.2: three above
    assert m["auc_concept_others"] == 2 / 6  # 0.9 beats 2 of the 3, 0.2 beats none
    assert set(m) == {"mrr", "auc_concept_parent", "auc_concept_others", "auc_parent_classes"}


def test_ours_with_caption_initialisation_is_ours_from_an_auto_caption():
    config = token_quality.variant_config("ours+caption", steps=7)
    assert config.method == "ours" and config.init_caption == "auto" and config.steps == 7
    assert token_quality.variant_config("ti").init_caption is None


def test_rank_variants_cap_the_subspace():
    assert token_quality.variant_config("ours+r4").subspace_rank == 4
    assert token_quality.variant_config("ours").subspace_rank == 0  # the default keeps every direction


def test_one_training_gives_each_budgets_row_as_a_separate_training_would(tmp_path):
    # the convergence table trains once to the largest budget and reads each budget off a snapshot; the 2-step row
    # must equal the row of a 2-step training, number for number
    common = "--model tiny-random --diffusion tiny-random --concepts 2 --methods ti ours+r2 --gen-per-context 1 "
    common += "--parent-images 3 --negatives 2 --sample-steps 2 --device cpu --no-progress --out"
    token_quality.main([*common.split(), str(tmp_path / "a"), "--steps", "2", "4"])
    token_quality.main([*common.split(), str(tmp_path / "b"), "--steps", "2"])
    saved = json.loads((tmp_path / "a" / "token_quality.json").read_text())
    assert saved["complete"] is True  # rewritten after each method; complete after the last
    curve = saved["rows"]
    single = json.loads((tmp_path / "b" / "token_quality.json").read_text())["rows"]
    assert [(r["method"], r["steps"]) for r in curve] == [
        ("words", 0),
        ("ti", 2),
        ("ti", 4),
        ("ours+r2", 2),
        ("ours+r2", 4),
    ]
    measures = ("mrr", "auc_concept_parent", "auc_concept_others", "auc_parent_classes", *token_quality.GEN_COLUMNS)
    for method in ("ti", "ours+r2"):
        at2 = next(r for r in curve if r["method"] == method and r["steps"] == 2)
        alone = next(r for r in single if r["method"] == method)
        assert {k: at2[k] for k in measures} == pytest.approx({k: alone[k] for k in measures}, abs=1e-6)
