"""load_image: every bad kind refused with its reason, every odd kind converted to upright 8-bit RGB."""

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from retrieval.io.images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, BadImage, load_image
from tests.badfiles import BAD_REASONS, OK_SIZES, write_bad_files

TOL = 6  # JPEG round trip of a flat colour, in 8-bit levels


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad")
    expected = write_bad_files(folder)
    assert expected == {**{n: "ok" for n in OK_SIZES}, **{n: "bad" for n in BAD_REASONS}}
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    return folder


def rgb(im: Image.Image, x: int, y: int) -> np.ndarray:
    return np.array(im.getpixel((x, y)), dtype=int)


def near(im: Image.Image, x: int, y: int, colour, tol: int = TOL) -> bool:
    return bool(np.abs(rgb(im, x, y) - np.array(colour)).max() <= tol)


def test_constants():
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
    assert DEFAULT_MAX_PIXELS == Image.MAX_IMAGE_PIXELS == 89_478_485


@pytest.mark.parametrize("name", sorted(OK_SIZES))
def test_convertible_kinds_give_rgb_of_the_upright_size(bad_dir, name):
    im = load_image(bad_dir / name)
    assert (im.mode, im.size) == ("RGB", OK_SIZES[name])


@pytest.mark.parametrize("name", sorted(BAD_REASONS))
def test_bad_kinds_raise_bad_image_with_their_reason(bad_dir, name):
    with pytest.raises(BadImage) as info:
        load_image(bad_dir / name)
    assert info.value.reason.startswith(BAD_REASONS[name]), info.value.reason
    assert str(info.value) == info.value.reason


def test_exact_reasons(bad_dir):
    def reason(path, **kw) -> str:
        with pytest.raises(BadImage) as info:
            load_image(path, **kw)
        return info.value.reason

    assert reason(bad_dir / "empty.jpg") == "empty file"
    assert reason(bad_dir / "text.png") == "not an image (no JPEG/PNG/GIF/WEBP/BMP/TIFF header)"
    assert reason(bad_dir / "truncated.png") == "truncated or corrupt (OSError: image file is truncated)"
    assert reason(bad_dir / "truncated.jpg").startswith("truncated or corrupt (OSError: image file is truncated")
    assert reason(bad_dir / "nope.jpg").startswith("unreadable file (FileNotFoundError: ")
    assert reason(bad_dir).startswith("unreadable file (IsADirectoryError: ")


def test_truncated_files_are_refused_without_changing_pillow_globals(bad_dir):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    for name in ("truncated.jpg", "truncated.png"):
        with pytest.raises(BadImage):
            load_image(bad_dir / name)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS


def test_load_truncated_images_set_elsewhere_is_refused(bad_dir, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES is True"):
        load_image(bad_dir / "good.png")


def test_header_cut_short_is_corrupt_not_other_kind(bad_dir, tmp_path):
    (tmp_path / "head.jpg").write_bytes((bad_dir / "good_rgb.jpg").read_bytes()[:20])
    with pytest.raises(BadImage, match=r"^truncated or corrupt \(JPEG header cannot be read\)$"):
        load_image(tmp_path / "head.jpg")


def test_other_formats_renamed_are_not_opened(tmp_path):
    # An EPS would make Pillow run Ghostscript; an ICO is harmless but not what the extension says.
    (tmp_path / "eps.jpg").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    Image.new("RGB", (16, 16)).save(tmp_path / "icon.png", format="ICO")
    for name in ("eps.jpg", "icon.png"):
        with pytest.raises(BadImage, match=r"^not an image"):
            load_image(tmp_path / name)


def test_pixel_limit_is_decided_from_the_header(bad_dir, monkeypatch):
    w, h = OK_SIZES["good.png"]
    assert load_image(bad_dir / "good.png", max_pixels=w * h).size == (w, h)  # the limit itself is allowed
    with pytest.raises(BadImage, match=rf"^too many pixels \({w} x {h} > {w * h - 1}\)$"):
        load_image(bad_dir / "good.png", max_pixels=w * h - 1)
    # huge.png has no pixel data at all: only a header-time check can call it "too many pixels".
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow's own check off: ours alone decides
    with pytest.raises(BadImage, match=r"^too many pixels \(100000 x 100000 > 89478485\)$"):
        load_image(bad_dir / "huge.png")


def test_pillow_bomb_warning_is_a_refusal(bad_dir, monkeypatch):
    # Between MAX_IMAGE_PIXELS and twice it Pillow only warns; load_image must refuse, not load.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert 1000 < 40 * 30 <= 2000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the caller's filters must not matter
        with pytest.raises(BadImage, match=r"^too many pixels \(Pillow: Image size \(1200 pixels\)"):
            load_image(bad_dir / "good_rgb.jpg", max_pixels=10**6)


def test_exif_orientation_is_applied(bad_dir):
    im = load_image(bad_dir / "exif_rotated.jpg")  # stored 48 x 32, red 16 x 16 at the stored top-left
    assert im.size == (32, 48)
    red, blue = (255, 0, 0), (0, 0, 255)
    assert near(im, 24, 8, red) and near(im, 31, 0, red)  # now the top-right corner
    assert near(im, 8, 8, blue) and near(im, 24, 40, blue) and near(im, 0, 47, blue)


@pytest.mark.parametrize("name", ["gray16.png", "gray16.tif"])
def test_16_bit_grey_is_scaled_not_clipped(bad_dir, name):
    with Image.open(bad_dir / name) as raw:
        assert raw.mode.startswith("I;16")
    im = load_image(bad_dir / name)  # columns 0 | 32768 | 65535
    assert rgb(im, 5, 5).tolist() == [0, 0, 0]
    assert np.abs(rgb(im, 15, 5) - 128).max() <= 1  # mid grey, not white
    assert rgb(im, 25, 5).tolist() == [255, 255, 255]


def test_transparency_is_composited_on_white(bad_dir):
    pal = load_image(bad_dir / "palette_transparent.png")
    assert rgb(pal, 2, 5).tolist() == [255, 255, 255] and rgb(pal, 17, 5).tolist() == [255, 0, 0]
    rgba = load_image(bad_dir / "rgba.png")
    assert rgb(rgba, 2, 5).tolist() == [255, 255, 255] and rgb(rgba, 17, 5).tolist() == [0, 255, 0]


def test_colours_of_the_other_kinds(bad_dir):
    assert near(load_image(bad_dir / "cmyk.jpg"), 12, 8, (255, 0, 0))
    assert near(load_image(bad_dir / "gray.jpg"), 10, 10, (100, 100, 100), tol=2)
    bitonal = load_image(bad_dir / "bitonal.png")
    assert rgb(bitonal, 0, 0).tolist() == [0, 0, 0] and rgb(bitonal, 15, 7).tolist() == [255, 255, 255]
    assert rgb(load_image(bad_dir / "animated.gif"), 6, 5).tolist() == [255, 0, 0]  # first frame, not blue
    assert rgb(load_image(bad_dir / "animated.webp"), 7, 5).tolist() == [0, 255, 0]
    assert rgb(load_image(bad_dir / "image.bmp"), 9, 6).tolist() == [0, 0, 255]
    assert rgb(load_image(bad_dir / "good.png"), 0, 27).tolist() == [10, 200, 30]


@pytest.mark.parametrize(
    "mode, value, expected",
    [
        ("I", 32768, 128),  # 32-bit integer TIFF holding 16-bit data
        ("F", 0.5, 128),  # float TIFF in 0..1
        ("I;16B", 65535, 255),  # big-endian 16-bit
    ],
)
def test_high_depth_tiff_modes(tmp_path, mode, value, expected):
    Image.new(mode, (4, 3), value).save(tmp_path / "x.tif")
    with Image.open(tmp_path / "x.tif") as raw:
        assert raw.mode == mode
    im = load_image(tmp_path / "x.tif")
    assert (im.mode, im.size) == ("RGB", (4, 3))
    assert rgb(im, 1, 1).tolist() == [expected] * 3


@pytest.mark.parametrize(
    "mode, value, match",
    [
        ("I", -5, r"^unsupported pixels \(32-bit integer grey with values -5\.\.-5, expected 0\.\.65535\)$"),
        ("F", 2.0, r"^unsupported pixels \(float grey with values 2\.\.2, expected 0\.\.1\)$"),
        ("F", float("nan"), r"^unsupported pixels \(float grey with NaN"),
    ],
)
def test_high_depth_values_without_an_8_bit_meaning_are_refused(tmp_path, mode, value, match):
    Image.new(mode, (4, 3), value).save(tmp_path / "x.tif")
    with pytest.raises(BadImage, match=match):
        load_image(tmp_path / "x.tif")


def test_grey_with_alpha_is_composited_on_white(tmp_path):
    la = Image.new("LA", (8, 4), (0, 255))
    la.paste((0, 0), (0, 0, 4, 4))  # left half transparent black
    la.save(tmp_path / "la.png")
    im = load_image(tmp_path / "la.png")
    assert rgb(im, 1, 1).tolist() == [255, 255, 255] and rgb(im, 6, 1).tolist() == [0, 0, 0]


def test_file_handles_are_closed_and_result_is_independent(bad_dir, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for name in sorted(OK_SIZES) + sorted(BAD_REASONS):
            try:
                load_image(bad_dir / name)
            except BadImage:
                pass
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
    copy = tmp_path / "a.gif"
    copy.write_bytes((bad_dir / "animated.gif").read_bytes())
    im = load_image(copy)
    copy.unlink()  # nothing may still read the file
    assert np.asarray(im).shape == (10, 12, 3)


def test_jpeg_draft_decoding_keeps_the_full_size_and_enough_pixels(tmp_path):
    """min_size: a large JPEG decodes at a reduced DCT scale, never below min_size, and reports its full size."""
    from retrieval.io.images import load_image_and_size

    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8))
    big.save(tmp_path / "big.jpg", quality=90)
    small, size = load_image_and_size(tmp_path / "big.jpg", min_size=224)
    assert size == (1600, 1200) and small.mode == "RGB"
    assert min(small.size) >= 224 and small.size == (400, 300)  # 1/4 scale: 1/8 would give 150 < 224
    full, size_full = load_image_and_size(tmp_path / "big.jpg")
    assert full.size == size_full == (1600, 1200)
    big.save(tmp_path / "big.png")  # not a JPEG: no draft decoding
    assert load_image_and_size(tmp_path / "big.png", min_size=224)[0].size == (1600, 1200)


def test_draft_decoding_reports_the_upright_size_of_an_exif_rotated_jpeg(tmp_path):
    from retrieval.io.images import load_image_and_size

    im = Image.new("RGB", (1600, 1200), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "r.jpg", exif=exif)
    upright, size = load_image_and_size(tmp_path / "r.jpg", min_size=224)
    assert size == (1200, 1600) and upright.size == (300, 400)
