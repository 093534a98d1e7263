"""benchmarks/token_quality.py's measures on made-up features: MRR and AUCs of a prompt, and the method variants."""

import numpy as np

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
