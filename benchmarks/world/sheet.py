"""A contact sheet: rendered scenes in a grid, each with the words that describe it (to look at the world)."""

from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

from benchmarks.world.scene import Scene


def scene_label(scene: Scene) -> list[str]:
    """Short lines naming a scene's factors: words, then the unnamed details."""
    d = scene.details
    trim = f"{d.trim}:{d.trim_colour}" if d.trim else "-"
    emblem = f"{d.emblem}@{d.emblem_at}:{d.emblem_colour}" if d.emblem else "-"
    return [scene.context, f"{scene.colour} {scene.pattern}", f"{scene.category}, {scene.pose}", trim, emblem]


def contact_sheet(images: Sequence[Image.Image], labels: Sequence[Sequence[str]], columns: int = 8,
                  zoom: int = 2) -> Image.Image:
    """Tiles of `images` (each zoomed `zoom`x, nearest) with their label lines underneath."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if not images:
        raise ValueError("no images for the contact sheet")
    w, h = images[0].size[0] * zoom, images[0].size[1] * zoom
    line_h = 11
    text_h = line_h * max(len(lines) for lines in labels) + 4
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * (w + 4), rows * (h + text_h + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (image, lines) in enumerate(zip(images, labels)):
        x, y = (i % columns) * (w + 4), (i // columns) * (h + text_h + 4)
        sheet.paste(image.resize((w, h), Image.NEAREST), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 1, y + h + 2 + j * line_h), line[:24], fill=(0, 0, 0))
    return sheet
