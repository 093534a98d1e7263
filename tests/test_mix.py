"""Query mixes (retrieval/mix.py): the parser and its errors, the weighted sum, reading the files a mix names; and
the engine answering them (`Engine.query_mix`, `Engine.query_image`) on a 12-image gallery indexed with the
tiny-random CLIP, checked against brute force over the stored embeddings (ids exactly)."""

import numpy as np
import pytest
from PIL import Image

from retrieval import Engine, QueryError
from retrieval.composed import composed_feature
from retrieval.mix import FILE, GALLERY_ID, TEXT, MixError, Term, combine, is_mix, parse_mix, read_mix_files
from tests.tiny import make_token, write_gallery

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----- the parser
@pytest.mark.parametrize(
    "text, terms",
    [
        (
            '"2:a red dress" + photo.jpg - "hat"',
            [(TEXT, "a red dress", 2.0), (FILE, "photo.jpg", 1.0), (TEXT, "hat", -1.0)],
        ),
        ("a person wearing a * on the grass", [(TEXT, "a person wearing a * on the grass", 1.0)]),
        ("a black-and-white t-shirt", [(TEXT, "a black-and-white t-shirt", 1.0)]),
        ('#12 + 0.5:"red"', [(GALLERY_ID, "12", 1.0), (TEXT, "red", 0.5)]),
        ('-"hat" + 3:#4', [(TEXT, "hat", -1.0), (GALLERY_ID, "4", 3.0)]),
        ("2:my-photo.PNG+#4", [(FILE, "my-photo.PNG", 2.0), (GALLERY_ID, "4", 1.0)]),
        ('"a \\"quoted\\" word"', [(TEXT, 'a "quoted" word', 1.0)]),
        ("photos/cat.jpg", [(FILE, "photos/cat.jpg", 1.0)]),
    ],
)
def test_mix_parses(text, terms):
    assert [(t.kind, t.value, t.weight) for t in parse_mix(text)] == terms


@pytest.mark.parametrize(
    "text, position, expected",
    [
        ('"a dress" hat', 10, "'+' or '-'"),
        ('"a dress" + hat', 12, "quoted text"),
        ('"unclosed', 9, "closing"),
        ('"a" +', 5, "a term"),
        ('#x + "a"', 1, "digits"),
        ('0:"a"', 0, "above 0"),
        ('"" + #1', 0, "some text"),
        ("", 0, "a query"),
    ],
)
def test_mix_errors_say_where_and_what(text, position, expected):
    with pytest.raises(MixError) as e:
        parse_mix(text)
    assert e.value.position == position and expected in e.value.expected and f"position {position}" in str(e.value)


def test_a_plain_sentence_is_not_a_mix():
    assert not is_mix("a person wearing a * on the grass") and not is_mix("a t-shirt's print")
    assert is_mix("cat.jpg") and is_mix('"a" + #3') and is_mix("#3")


def test_combine_is_the_normalised_weighted_sum():
    v = np.eye(3, dtype=np.float32)
    np.testing.assert_allclose(combine(np.array([2.0, -1.0]), v[:2]), np.array([2, -1, 0]) / np.sqrt(5), atol=1e-6)
    with pytest.raises(ValueError, match="cancel out"):
        combine(np.array([1.0, -1.0]), np.stack([v[0], v[0]]))
    assert Term(TEXT, "a", -2.0, 0).to_json() == {"kind": "text", "value": "a", "weight": -2.0}


def test_read_mix_files_reads_paths_safely_and_names_a_bad_one(tmp_path):
    Image.new("RGB", (20, 10), (0, 200, 0)).save(tmp_path / "green.png")
    (tmp_path / "fake.jpg").write_bytes(b"not an image at all")
    images = read_mix_files(parse_mix('"a hat" + green.png + 2:green.png'), tmp_path)
    assert list(images) == ["green.png"] and images["green.png"].size == (20, 10) and images["green.png"].mode == "RGB"
    for name, reason in (("fake.jpg", "not an image"), ("gone.png", "unreadable file")):
        with pytest.raises(ValueError, match=f"'{name}', which cannot be used: {reason}"):
            read_mix_files(parse_mix(f'"a" + {name}'), tmp_path)


# ----- the engine
@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("mix")
    write_gallery(root / "gallery", 12)
    engine = Engine(root / "index", tokens_dir=root / "tokens", clip=tiny_encoder)
    engine.index(root / "gallery", progress=False, workers=0)
    return engine


def brute_force(engine, q: np.ndarray, k: int, exclude: int | None = None) -> list[int]:
    ids = engine.store.metadata["id"].to_numpy()
    scores = engine.store.vectors_for_ids(ids) @ q
    return [int(ids[i]) for i in np.argsort(-scores, kind="stable") if ids[i] != exclude][:k]


def test_query_mix_is_the_weighted_sum_of_texts_gallery_images_and_given_images(engine):
    ids = sorted(engine.store.metadata["id"].astype(int).tolist())
    green = Image.new("RGB", (32, 32), (10, 200, 10))
    clip = engine.clip
    features = np.stack(
        [
            clip.encode_texts(["a red dress"])[0],
            engine.store.vectors_for_ids(np.array([ids[3]]))[0],
            clip.encode_pil([green])[0],
        ]
    )
    q = combine(np.array([2.0, -1.0, 0.5]), features)
    r = engine.query_mix(f'"2:a red dress" - #{ids[3]} + 0.5:green.png', k=5, images={"green.png": green})
    assert [h.id for h in r.hits] == brute_force(engine, q, 5) and [h.rank for h in r.hits] == [1, 2, 3, 4, 5]
    assert [t.kind for t in r.terms] == [TEXT, GALLERY_ID, FILE] and r.tokens == ()
    assert r.to_json()["terms"][1] == {"kind": "id", "value": str(ids[3]), "weight": -1.0}
    assert r.to_json()["results"][0] == {
        "rank": 1,
        "score": round(r.hits[0].score, 6),
        "path": r.hits[0].path,
        "id": r.hits[0].id,
    }
    # parsed terms work as the text does; a plain sentence is a one-term mix with the hits of `query`
    assert [h.id for h in engine.query_mix(r.terms, k=5, images={"green.png": green}).hits] == [h.id for h in r.hits]
    plain = engine.query("a red dress", k=4)
    assert [(h.id, h.rank) for h in engine.query_mix("a red dress", k=4).hits] == [(h.id, h.rank) for h in plain.hits]


def test_query_mix_composes_a_term_with_a_custom_token(engine):
    token = make_token(engine.clip, name="my-dress")
    ids = sorted(engine.store.metadata["id"].astype(int).tolist())
    g = composed_feature(engine.clip, engine.plan("a person wearing a *", [token]))
    q = combine(np.array([1.0, 1.0]), np.stack([g, engine.store.vectors_for_ids(np.array([ids[0]]))[0]]))
    r = engine.query_mix(f'"a person wearing a *" + #{ids[0]}', k=4, tokens=[token])
    assert [h.id for h in r.hits] == brute_force(engine, q, 4) and r.tokens == ("my-dress",)
    named = engine.query_mix(f'"a person wearing a <my-dress>" + #{ids[0]}', k=4, tokens=[token])
    assert [h.id for h in named.hits] == [h.id for h in r.hits]


def test_query_mix_errors_name_the_argument_to_fix(engine):
    ids = sorted(engine.store.metadata["id"].astype(int).tolist())
    green = Image.new("RGB", (8, 8))
    cases = [
        (dict(mix='"a" + photo.jpg'), "`images` has no image of that name"),
        (dict(mix='"a" + #1', images={"x.png": green}), "'x.png' is given but the query does not name it"),
        (dict(mix=f'"red" + #{ids[0]}', tokens=[make_token(engine.clip)]), "no term of the mix uses it"),
        (dict(mix='"a" + #424242'), "no image with id 424242"),
        (dict(mix='"a *" + #1'), "no token was given"),
        (dict(mix='"a" - "a"'), "cancel out"),
        (dict(mix='"a" + hat'), "position 6"),
        (dict(mix='"a"', k=0), "`k=0`"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("*", r"\*")):
            engine.query_mix(**kwargs)
    with pytest.raises(QueryError, match="a token in"):  # a stored token's name, not passed as `tokens`
        engine.tokens.save(make_token(engine.clip, name="stored"))
        engine.query_mix('"a <stored> dress" + #1')


def test_query_image_by_picture_and_by_gallery_id(engine):
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    r = engine.query_image(red, k=3)
    assert [h.id for h in r.hits] == brute_force(engine, engine.clip.encode_pil([red])[0], 3) and r.query == "image"
    some = sorted(engine.store.metadata["id"].astype(int).tolist())[5]
    like = engine.query_image(some, k=4)
    expected = brute_force(engine, engine.store.vectors_for_ids(np.array([some]))[0], 4, exclude=some)
    assert [h.id for h in like.hits] == expected and [h.rank for h in like.hits] == [1, 2, 3, 4]
    assert like.query == f"#{some}" and engine.query_image(some, k=2, name="mine").query == "mine"
    with pytest.raises(QueryError, match="no image with id 424242"):
        engine.query_image(424242)
    with pytest.raises(TypeError, match="PIL image or a gallery id"):
        engine.query_image("photo.jpg")
