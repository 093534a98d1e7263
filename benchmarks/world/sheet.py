"""A contact sheet: rendered scenes in a grid, each with the words that describe it (to look at the world)."""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image, ImageDraw

from benchmarks.world.scene import Scene
from retrieval.io.images import image_grid

LINE_HEIGHT = 11  # px per label line (PIL's default font is ~10 px tall)
GAP = 4  # white px right of and below each tile


def scene_label(scene: Scene) -> list[str]:
    """Short lines naming a scene's factors: words, then the unnamed details."""
    d = scene.details
    trim = f"{d.trim}:{d.trim_colour}" if d.trim else "-"
    emblem = f"{d.emblem}@{d.emblem_at}:{d.emblem_colour}" if d.emblem else "-"
    return [scene.context, f"{scene.colour} {scene.pattern}", f"{scene.category}, {scene.pose}", trim, emblem]


def contact_sheet(
    images: Sequence[Image.Image], labels: Sequence[Sequence[str]], columns: int = 8, zoom: int = 2, max_chars: int = 24
) -> Image.Image:
    """Tiles of `images` (each zoomed `zoom`x, nearest) with their label lines (cut to `max_chars`) underneath,
    `columns` tiles per row."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not images:
        raise ValueError("no images for the contact sheet")
    w, h = images[0].size[0] * zoom, images[0].size[1] * zoom
    text_h = LINE_HEIGHT * max(len(lines) for lines in labels) + 4
    tiles = []
    for image, lines in zip(images, labels):
        tile = Image.new("RGB", (w + GAP, h + text_h + GAP), (255, 255, 255))
        tile.paste(image.resize((w, h), Image.NEAREST), (0, 0))
        draw = ImageDraw.Draw(tile)
        for j, line in enumerate(lines):
            draw.text((1, h + 2 + j * LINE_HEIGHT), line[:max_chars], fill=(0, 0, 0))
        tiles.append(tile)
    return image_grid(tiles, columns)
