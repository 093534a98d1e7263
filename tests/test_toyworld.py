"""The toy world: determinism, captions that name words only, concepts that only images tell apart, and a
benchmark split that PerVL's reader reads back."""

import dataclasses
import json
import re
from collections import Counter
from itertools import combinations

import numpy as np
import pytest
from PIL import Image

from benchmarks.pervl_data import missing_images, read_split
from benchmarks.world import (
    WorldConfig,
    caption,
    context_caption,
    n_word_combinations,
    plan_split,
    render_scene,
    sample_scene,
    sample_training_pair,
    world_config,
    write_split,
)
from benchmarks.world.captions import CONTEXT_WORDS, detail_negative, detail_phrase, detailed_caption, short_caption
from benchmarks.world.garments import EMBLEM_SPOTS, GARMENTS, Details

CONFIG = WorldConfig()
TINY = world_config("tiny")
GARMENT_WORDS = set(CONFIG.categories) | set(CONFIG.colour_names) | set(CONFIG.patterns)
DETAIL_WORDS = set(CONFIG.emblems) | set(EMBLEM_SPOTS) | {"trim", "hem", "collar", "cuffs", "waist", "belt", "emblem"}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def changed_pixels(a: Image.Image, b: Image.Image, threshold: int = 40) -> int:
    return int((np.abs(pixels(a) - pixels(b)).max(axis=-1) > threshold).sum())


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(0)
    return [sample_scene(rng, CONFIG) for _ in range(400)]


# ----- rendering


def test_render_size_and_mode(scenes):
    image = render_scene(scenes[0], CONFIG)
    assert image.mode == "RGB" and image.size == (64, 64)
    small = WorldConfig(image_size=32, supersample=1)
    assert render_scene(scenes[0], small).size == (32, 32)


def test_render_is_deterministic_given_the_scene(scenes):
    assert np.array_equal(pixels(render_scene(scenes[1], CONFIG)), pixels(render_scene(scenes[1], CONFIG)))


def test_same_seed_same_pairs_other_seed_other_pairs():
    def pairs(seed):
        rng = np.random.default_rng(seed)
        return [sample_training_pair(rng, CONFIG) for _ in range(6)]

    a, b, c = pairs(7), pairs(7), pairs(8)
    assert all(np.array_equal(pixels(x), pixels(y)) and s == t for (x, s), (y, t) in zip(a, b))
    assert [s for _, s in a] != [s for _, s in c]
    assert not all(np.array_equal(pixels(x), pixels(y)) for (x, _), (y, _) in zip(a, c))


def test_contexts_differ_from_each_other(scenes):
    """Every pair of backgrounds differs clearly at 64 px (mean absolute difference, same figure)."""
    base = scenes[0]
    images = {c: pixels(render_scene(dataclasses.replace(base, context=c), CONFIG)) for c in CONFIG.contexts}
    for a, b in combinations(CONFIG.contexts, 2):
        assert np.abs(images[a] - images[b]).mean() > 25, (a, b)


def test_categories_have_distinct_silhouettes(scenes):
    base = dataclasses.replace(scenes[0], pattern="plain", details=Details())
    images = {c: render_scene(dataclasses.replace(base, category=c), CONFIG) for c in CONFIG.categories}
    for a, b in combinations(CONFIG.categories, 2):
        assert changed_pixels(images[a], images[b]) >= 20, (a, b)


def test_unnamed_details_change_pixels():
    """Concepts with the same words, drawn into the same scene, render differently."""
    plan = plan_split(CONFIG, "test")
    rng = np.random.default_rng(0)
    checked = 0
    for a, b in combinations(plan.concepts, 2):
        if a.words != b.words:
            continue
        scene = sample_scene(rng, CONFIG, concept=a)
        other = dataclasses.replace(scene, details=b.details, concept=b.pair_id)
        assert changed_pixels(render_scene(scene, CONFIG), render_scene(other, CONFIG)) >= 15, (a, b)
        checked += 1
    assert checked >= 25


# ----- captions


def test_captions_name_the_words_and_nothing_else(scenes):
    rng = np.random.default_rng(1)
    for scene in scenes:
        text = caption(scene, rng)
        found = words(text)
        assert found & GARMENT_WORDS <= set(scene.words), (text, scene.words)
        assert not found & DETAIL_WORDS, text
        assert not re.search(r"\d", text), text
        assert "person" in found or scene.category in found


def test_a_detail_share_of_captions_names_the_details_and_share_0_draws_nothing(scenes):
    """Section 3: with detail_share 1 every caption that names the garment also names its details, in
    detail_phrase's words; with share 0 the caption stream is the committed models' (no extra draw)."""
    assert detail_phrase(Details("collar", "white", "circle", "left", "yellow")) == (
        "with a white collar and a yellow circle on the left"
    )
    assert detail_phrase(Details("cuffs", "orange")) == "with orange cuffs"
    assert detail_phrase(Details(emblem="cross", emblem_at="centre", emblem_colour="orange")) == (
        "with an orange cross in the centre"
    )
    assert detail_phrase(Details()) == ""
    rng, ref = np.random.default_rng(5), np.random.default_rng(5)
    named = 0
    for scene in scenes:
        text = caption(scene, rng, detail_share=1.0)
        plain = caption(scene, ref)
        ref.random()  # the one extra draw of share > 0
        phrase = detail_phrase(scene.details)
        names_garment = scene.category in words(text)
        assert text == (
            plain.replace(scene.category, f"{scene.category} {phrase}", 1) if phrase and names_garment else plain
        ), (text, plain)
        named += bool(phrase and names_garment)
    assert named > 100
    a, b = np.random.default_rng(6), np.random.default_rng(6)
    assert [caption(s, a, detail_share=0.0) for s in scenes] == [caption(s, b) for s in scenes]
    assert a.random() == b.random()


def test_garment_share_sets_how_often_a_caption_names_the_garment(scenes):
    """Section 4's caption lever: GARMENT_SHARE is the probability that a caption names the garment; None keeps the
    committed stream (same draws), and every share makes the same number of draws."""
    from benchmarks.world.captions import CAPTION_TEMPLATES, garment_templates

    assert garment_templates(None) is CAPTION_TEMPLATES
    assert sum(w for t, w in CAPTION_TEMPLATES if "{g}" in t) == pytest.approx(0.9)  # the grammar's own share
    for share in (0.0, 0.3, 1.0):
        weights = garment_templates(share)
        assert sum(w for t, w in weights if "{g}" in t) == pytest.approx(share)
        assert sum(w for _, w in weights) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        garment_templates(1.5)
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert [caption(s, a, garment_share=None) for s in scenes] == [caption(s, b) for s in scenes]
    rng = np.random.default_rng(8)
    never = [caption(s, rng, garment_share=0.0) for s in scenes]
    assert not any(s.category in words(t) for s, t in zip(scenes, never))
    always = [caption(s, rng, garment_share=1.0) for s in scenes]
    assert all(s.category in words(t) for s, t in zip(scenes, always))
    x, y = np.random.default_rng(9), np.random.default_rng(9)
    for s in scenes:
        caption(s, x, garment_share=0.3)
        caption(s, y)
    assert x.random() == y.random()  # no extra draw: the streams after the captions stay aligned


def test_detail_sizes_are_world_fields_that_draw_larger_details(scenes):
    """trim_width and emblem_size (fractions of the figure's height) draw larger details and nothing else: the
    renders of a garment without details do not change; out-of-range values are refused."""
    bold = world_config("pervl-v2")
    assert bold.trim_width > CONFIG.trim_width and bold.emblem_size > CONFIG.emblem_size
    plain = next(s for s in scenes if s.details.trim is None and s.details.emblem is None)
    assert np.array_equal(np.asarray(render_scene(plain, CONFIG)), np.asarray(render_scene(plain, bold)))
    for field, other in (("trim", "emblem"), ("emblem", "trim")):
        scene = next(s for s in scenes if getattr(s.details, field) and not getattr(s.details, other))
        bare = np.asarray(render_scene(dataclasses.replace(scene, details=Details()), CONFIG))
        small = (np.asarray(render_scene(scene, CONFIG)) != bare).any(-1).sum()
        large = (np.asarray(render_scene(scene, bold)) != bare).any(-1).sum()
        assert large > 1.3 * small > 0, (field, small, large)
    for bad in ({"emblem_size": 0.0}, {"trim_width": 0.3}):
        with pytest.raises(ValueError, match="fraction of the figure"):
            world_config(**bad)


def test_views_are_off_by_default_and_drawn_at_their_shares(scenes):
    """Back views, bags and zoom-ins (DeepFashion2's viewpoint, occlusion, zoom-in) are off in the v1 world, whose
    random stream they leave alone; where a share is set, each occurs about that often, independently."""
    assert all(not s.back_view and s.bag is None and s.zoom == 1.0 for s in scenes)
    views = world_config("pervl-v2", back_view_share=0.3, bag_share=0.5, zoom_share=0.2)
    rng = np.random.default_rng(0)
    drawn = [sample_scene(rng, views) for _ in range(600)]
    for share, hits in (
        (0.3, sum(s.back_view for s in drawn)),
        (0.5, sum(s.bag is not None for s in drawn)),
        (0.2, sum(s.zoom > 1 for s in drawn)),
    ):
        assert abs(hits / len(drawn) - share) < 0.06, (share, hits)
    assert all(views.zoom[0] <= s.zoom <= views.zoom[1] for s in drawn if s.zoom > 1)
    assert sum(s.back_view and s.bag is not None for s in drawn) > 0  # independent draws: they combine
    # the first scene's words and jitter are drawn before its view: the same as in the world without views
    first = sample_scene(np.random.default_rng(0), world_config("pervl-v2"))
    assert dataclasses.replace(drawn[0], back_view=False, bag=None, zoom=1.0, zoom_anchor=0.0) == first
    for bad, match in (({"bag_share": 1.5}, "share"), ({"zoom": (0.8, 1.2)}, "zoom")):
        with pytest.raises(ValueError, match=match):
            world_config(**bad)


def test_a_back_view_hides_the_emblem_a_bag_covers_the_garment_a_zoom_crops_the_figure(scenes):
    """Each view changes the image as its name says: from behind the emblem (printed on the front) and the face are
    gone but the trim stays; a bag paints its colour over the garment; zoomed in with the feet at the bottom edge,
    the head is out of frame, and with the head at the top edge, the feet are."""
    from benchmarks.world.scene import BAG_COLOURS, HAIR_COLOURS, SKIN_TONES, Bag

    world = world_config("pervl-v2")
    scene = next(s for s in scenes if s.details.emblem and s.details.trim and s.category == "dress")
    back = dataclasses.replace(scene, back_view=True)
    no_emblem = dataclasses.replace(back, details=dataclasses.replace(scene.details, emblem=None))
    assert np.array_equal(pixels(render_scene(back, world)), pixels(render_scene(no_emblem, world)))
    assert changed_pixels(render_scene(scene, world), render_scene(back, world)) > 0
    no_trim = dataclasses.replace(back, details=dataclasses.replace(scene.details, trim=None))
    assert changed_pixels(render_scene(back, world), render_scene(no_trim, world)) > 0  # the trim is still seen
    skin = np.array(SKIN_TONES[scene.skin])
    face_rows = slice(0, 24)  # the head of a standing figure is in the top rows of a 64 px image

    def skin_pixels(image, rows):
        return int((np.abs(pixels(image)[rows] - skin).max(-1) < 6).sum())

    arms_down = dataclasses.replace(back, pose="standing", person_height=0.9)
    assert skin_pixels(render_scene(dataclasses.replace(arms_down, back_view=False), world), face_rows) > skin_pixels(
        render_scene(arms_down, world), face_rows
    )
    bagged = dataclasses.replace(scene, bag=Bag(x=0.05, y=0.45, half=0.1, colour=1))
    bag_rgb = np.array(BAG_COLOURS[1])
    assert int((np.abs(pixels(render_scene(bagged, world)) - bag_rgb).max(-1) < 4).sum()) > 40
    hair = np.array(HAIR_COLOURS[scene.hair])
    for anchor, head_seen in ((0.0, False), (1.0, True)):
        zoomed = dataclasses.replace(scene, zoom=1.8, zoom_anchor=anchor, person_height=0.9)
        image = pixels(render_scene(zoomed, world))
        assert bool((np.abs(image[:8] - hair).max(-1) < 4).sum() > 3) is head_seen, anchor


def test_benchmarks_draw_the_world_a_clip_was_trained_in(tmp_path):
    from benchmarks.world import trained_world

    assert trained_world("toyworld") == "pervl-v2-views"  # the committed CLIP's train_config.json names it
    assert trained_world("tiny-random") == "pervl"  # no world model: no train_config.json
    folder = tmp_path / "clip"
    folder.mkdir()
    assert trained_world(str(folder)) == "pervl"
    (folder / "train_config.json").write_text(json.dumps({"config": {"world_preset": "pervl-v2-views"}}))
    assert trained_world(str(folder)) == "pervl-v2-views"
    assert trained_world(f"local-dir:{folder}") == "pervl-v2-views"
    (folder / "train_config.json").write_text(json.dumps({"config": {"steps": 10}}))  # before the field existed
    assert trained_world(str(folder)) == "pervl"
    (folder / "train_config.json").write_text(json.dumps({"config": {"world_preset": "no-such-world"}}))
    with pytest.raises(KeyError, match="no-such-world"):
        trained_world(str(folder))


def test_a_detail_negative_changes_exactly_one_named_detail(scenes):
    """NegCLIP-style hard negatives (train_clip's detail_negatives): the caption with the trim's colour or the
    emblem's shape changed, everything else the same; none for a caption that names no detail."""
    world = world_config("tiny")
    rng = np.random.default_rng(0)
    made = 0
    for scene in scenes:
        text = caption(scene, np.random.default_rng(1), detail_share=1.0)
        made_one = detail_negative(text, scene.details, scene.colour, rng, world)
        phrase = detail_phrase(scene.details)
        if not phrase or phrase not in text:
            assert made_one is None
            continue
        made += 1
        negative, details = made_one
        assert negative == text.replace(phrase, detail_phrase(details))  # the text says what the details are
        head, tail = text.split(phrase)
        assert negative.startswith(head) and negative.endswith(tail) and negative != text
        changed = negative[len(head) : len(negative) - len(tail)]
        d = scene.details
        trims = {c for c in world.colour_rgb if c != d.trim_colour} if d.trim else set()
        emblems = {e for e in world.emblems if e != d.emblem} if d.emblem else set()
        options = {detail_phrase(dataclasses.replace(d, trim_colour=c)) for c in trims}
        options |= {detail_phrase(dataclasses.replace(d, emblem=e)) for e in emblems}
        assert changed in options, (phrase, changed)
    assert made >= 3
    assert detail_negative("a person on a beach.", Details("collar", "white"), "red", rng, world) is None


def test_a_detail_negative_may_change_any_named_detail_field(scenes):
    """With every field changeable (where the trim runs, its colour, the emblem's shape, spot and colour), each
    negative differs from its details in exactly one field, its text says so, and over the scenes every field
    changes at least once; a trim move without the garment's category is refused."""
    from benchmarks.world.garments import DETAIL_FIELDS

    world = world_config("tiny")
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(20):
        for scene in scenes:
            text = caption(scene, np.random.default_rng(1), detail_share=1.0)
            made = detail_negative(text, scene.details, scene.colour, rng, world, scene.category, DETAIL_FIELDS)
            if made is None:
                assert detail_phrase(scene.details) not in text or not detail_phrase(scene.details)
                continue
            negative, details = made
            changed = [f for f in DETAIL_FIELDS if getattr(details, f) != getattr(scene.details, f)]
            assert len(changed) == 1 and details.differences(scene.details) == 1
            assert negative == text.replace(detail_phrase(scene.details), detail_phrase(details))
            seen.update(changed)
    assert seen == set(DETAIL_FIELDS), seen
    with_trim = next(s for s in scenes if s.details.trim)
    text = caption(with_trim, np.random.default_rng(1), detail_share=1.0)
    with pytest.raises(ValueError, match="category"):
        detail_negative(text, with_trim.details, with_trim.colour, rng, world, None, ("trim",))
    with pytest.raises(ValueError, match="unknown detail fields"):
        detail_negative(text, with_trim.details, with_trim.colour, rng, world, None, ("sleeves",))


def test_detail_factors_are_read_only_where_a_scene_has_the_detail(tiny_encoder, scenes):
    from benchmarks.world import evaluate

    with_trim = [s for s in scenes if s.details.trim][:6]
    without = [dataclasses.replace(s, details=Details()) for s in scenes[:6]]
    images = evaluate.render_scenes(with_trim, CONFIG)
    report = evaluate.zero_shot_report(tiny_encoder, images, with_trim, CONFIG, evaluate.DETAIL_FACTORS)
    assert 0 <= report["trim_colour"] <= 1
    blank = evaluate.zero_shot_report(tiny_encoder, images, without, CONFIG, ("trim_colour", "emblem"))
    assert np.isnan(blank["trim_colour"]) and np.isnan(blank["emblem"])
    prompts = evaluate.factor_prompt_sets("emblem", CONFIG)
    assert set(prompts) == set(CONFIG.emblems) and all(e in p for e, ps in prompts.items() for p in ps)


def test_context_captions_never_name_the_garment(scenes):
    rng = np.random.default_rng(2)
    for scene in scenes:
        for text in (context_caption(scene, rng), short_caption(scene), detailed_caption(scene)):
            found = words(text)
            assert "person" in found, text
            assert not found & (GARMENT_WORDS | DETAIL_WORDS), text
    for phrases in CONTEXT_WORDS.values():
        for text in (*phrases.places, phrases.noun, phrases.detailed):
            assert not words(text) & (GARMENT_WORDS | DETAIL_WORDS), text


def test_training_pairs_cover_every_factor():
    rng = np.random.default_rng(3)
    drawn = [sample_scene(rng, CONFIG) for _ in range(1500)]
    vocabularies = {
        "context": CONFIG.contexts,
        "category": CONFIG.categories,
        "colour": CONFIG.colour_names,
        "pattern": CONFIG.patterns,
        "pose": CONFIG.poses,
    }
    for field, vocabulary in vocabularies.items():
        assert {getattr(s, field) for s in drawn} == set(vocabulary), field
    assert {s.details.trim for s in drawn} >= {None, "hem", "collar", "cuffs", "waist"}
    assert {s.details.emblem for s in drawn} == {None, *CONFIG.emblems}
    assert n_word_combinations(CONFIG) == 14 * 8 * 10 * 4 * 4


# ----- concepts


def test_each_concepts_words_are_shared_and_details_differ():
    plan = plan_split(CONFIG, "test")
    assert len(plan.concepts) == 50 and len({c.pair_id for c in plan.concepts}) == 50
    counts = Counter(c.words for c in plan.concepts)
    assert min(counts.values()) >= 2
    for a, b in combinations(plan.concepts, 2):
        if a.words == b.words:
            assert a.details.differences(b.details) >= 2
    for c in plan.concepts:
        assert c.details.trim is not None or c.details.emblem is not None
        assert c.details.trim is None or c.details.trim in GARMENTS[c.category].trims


def test_look_alikes_differ_in_as_many_detail_fields_as_the_world_says():
    default = plan_split(CONFIG, "test").concepts
    assert plan_split(dataclasses.replace(CONFIG, detail_differences=(2, 5)), "test").concepts == default  # any >= 2
    close = plan_split(dataclasses.replace(CONFIG, detail_differences=(1, 2)), "test").concepts
    pairs = [(a, b) for a, b in combinations(close, 2) if a.words == b.words]
    assert pairs and all(1 <= a.details.differences(b.details) <= 2 for a, b in pairs)
    assert max(a.details.differences(b.details) for a, b in combinations(default, 2) if a.words == b.words) > 2
    with pytest.raises(ValueError, match="detail_differences"):
        WorldConfig(detail_differences=(3, 2))


def test_config_rejects_unknown_names_and_too_few_contexts():
    with pytest.raises(ValueError, match="volcano"):
        WorldConfig(contexts=("brick wall", "volcano"))
    with pytest.raises(ValueError, match="eval_per_concept"):
        WorldConfig(contexts=CONFIG.contexts[:4], eval_per_concept=4)
    with pytest.raises(KeyError, match="tiny"):
        world_config("huge")


# ----- the written split


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("toyworld") / "split", TINY, "test")


def test_written_split_reads_back(tiny_split):
    split = read_split(tiny_split.annotations, "test")
    plan = plan_split(TINY, "test")
    assert split.pair_ids == [c.pair_id for c in plan.concepts]
    assert len(split.fsl_train) == TINY.n_concepts == 6
    assert all(TINY.shots[0] <= len(names) <= TINY.shots[1] for names in split.fsl_train.values())
    assert len(split.queries) == TINY.n_concepts * TINY.eval_per_concept
    assert split.categories == {c.pair_id: c.category for c in plan.concepts}
    assert missing_images(split, tiny_split.images) == []
    assert all(re.fullmatch(r"\d{6}\.jpg", n) for names in split.fsl_train.values() for n in names)
    assert split.queries["caption"].str.contains("person").all()
    for variant in ("short", "detailed"):
        assert (
            read_split(tiny_split.annotations, "test", variant).queries["image_name"].tolist()
            == split.queries["image_name"].tolist()
        )
    image = Image.open(tiny_split.images / "train/image" / split.fsl_train[split.pair_ids[0]][0])
    assert image.size == (64, 64) and image.mode == "RGB"


def test_fsl_file_has_the_real_layout(tiny_split):
    text = tiny_split.fsl_train.read_text()
    assert text.startswith("codes_infer/1:\n") and text.endswith(".jpg\n") and not text.endswith("\n\n")
    blocks = text[:-1].split("\n\n")
    assert len(blocks) == TINY.n_concepts
    assert all(line == line.strip() and line for block in blocks for line in block.split("\n"))


def test_evaluation_contexts_are_new_and_hold_hard_negatives(tiny_split):
    import pandas as pd

    scenes = pd.read_csv(tiny_split.scenes, dtype=str, keep_default_na=False)
    for pair_id, rows in scenes.groupby("pair_id"):
        shots = set(rows.loc[rows.role == "few-shot", "context"])
        evals = rows.loc[rows.role == "evaluation", "context"]
        assert len(evals) == TINY.eval_per_concept and len(set(evals)) == len(evals)
        assert not shots & set(evals), pair_id
    queries = scenes[scenes.role == "evaluation"]
    for _, q in queries.iterrows():  # same words, same context, another concept
        rivals = queries[
            (queries.category == q.category)
            & (queries.colour == q.colour)
            & (queries.pattern == q.pattern)
            & (queries.context == q.context)
            & (queries.pair_id != q.pair_id)
        ]
        assert len(rivals) >= 1, q.image_name


def test_write_split_is_deterministic(tiny_split, tmp_path):
    again = write_split(tmp_path / "again", TINY, "test")
    for name in ("fsl_train", "captions", "categories", "short_captions", "detailed_captions", "scenes"):
        assert getattr(again, name).read_bytes() == getattr(tiny_split, name).read_bytes(), name
    images = sorted(p.name for p in (tiny_split.images / "train/image").iterdir())
    assert images == sorted(p.name for p in (again.images / "train/image").iterdir())
    for name in images:
        a, b = (Image.open(p.images / "train/image" / name) for p in (tiny_split, again))
        assert np.array_equal(pixels(a), pixels(b)), name
    other = write_split(tmp_path / "other", dataclasses.replace(TINY, seed=1), "test")
    assert other.captions.read_bytes() != tiny_split.captions.read_bytes()


def test_both_splits_share_one_folder_but_not_two_worlds(tmp_path):
    write_split(tmp_path, TINY, "test")
    write_split(tmp_path, TINY, "validation")
    test, validation = read_split(tmp_path / "annotations", "test"), read_split(tmp_path / "annotations", "validation")
    assert not set(test.pair_ids) & set(validation.pair_ids)
    assert not set(test.queries["image_name"]) & set(validation.queries["image_name"])
    assert missing_images(validation, tmp_path / "images") == []
    with pytest.raises(ValueError, match="another config"):
        write_split(tmp_path, dataclasses.replace(TINY, seed=1), "test")
    # a folder written before WorldConfig gained a field (its default keeps the old world) is the same world
    record_path = tmp_path / "toyworld_config.json"
    record = json.loads(record_path.read_text())
    del record["config"]["back_view_share"], record["config"]["zoom"]
    record_path.write_text(json.dumps(record))
    write_split(tmp_path, TINY, "test")
    with pytest.raises(ValueError, match="another config"):
        write_split(tmp_path, dataclasses.replace(TINY, back_view_share=0.5), "test")
    with pytest.raises(ValueError, match="unknown split"):
        plan_split(TINY, "train")
