"""Labelled image grids: one row per model, one column per seed, a title above.

Labels use Pillow's built-in font (no font files, no downloads). ``grid_layout`` gives the
geometry ``make_grid`` draws, so callers and tests can find each tile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

PAD = 6  # pixels around every label
TITLE_LINES = 3  # the title band's most lines: a longer title is cut, ending in "…"
ELLIPSIS = "…"


@dataclass(frozen=True)
class GridLayout:
    """Where ``make_grid`` puts things: tile (i, j) has its top-left corner at
    (left + j * tile_w, top + i * tile_h)."""

    left: int  # width of the row-label column
    top: int  # height of the title band plus the column-label band
    tile_w: int
    tile_h: int
    rows: int
    cols: int
    title_lines: tuple[str, ...]

    @property
    def size(self) -> tuple[int, int]:
        return self.left + self.cols * self.tile_w, self.top + self.rows * self.tile_h


def grid_layout(
    rows: Mapping[str, Sequence[Image.Image]],
    *,
    row_labels: Mapping[str, str],
    col_labels: Sequence[str],
    title: str | None = None,
) -> GridLayout:
    """The geometry of ``make_grid``'s image (see it for the arguments)."""
    if not rows:
        raise ValueError("make_grid needs at least one row")
    sizes = {im.size for images in rows.values() for im in images}
    cols = max(len(images) for images in rows.values())
    if len(sizes) != 1 or any(len(images) != cols for images in rows.values()):
        raise ValueError(f"every row needs {cols} images of one size; got sizes {sizes}")
    if len(col_labels) != cols:
        raise ValueError(f"{len(col_labels)} column labels for {cols} columns")
    (tile_w, tile_h), font = sizes.pop(), _font()
    zoom = _zoom(tile_w, tile_h)
    tile_w, tile_h = tile_w * zoom, tile_h * zoom
    left = 2 * PAD + max(_text_size(row_labels.get(k, k), font)[0] for k in rows)
    header = 2 * PAD + _lines_height(1, font)
    lines: tuple[str, ...] = ()
    if title:
        lines = tuple(_wrap(title, left + cols * tile_w - 2 * PAD, font))
        header += 2 * PAD + _lines_height(len(lines), font)
    return GridLayout(left, header, tile_w, tile_h, len(rows), cols, lines)


def make_grid(
    rows: Mapping[str, Sequence[Image.Image]],
    *,
    row_labels: Mapping[str, str],
    col_labels: Sequence[str],
    title: str | None = None,
) -> Image.Image:
    """One row per key of ``rows`` (in order), one column per image, on white.

    ``row_labels`` (newlines allowed; a missing key shows the key) go in a column on the left,
    ``col_labels`` above the columns, ``title`` (wrapped to the grid's width, at most
    ``TITLE_LINES`` lines: a longer one is cut with an ellipsis) above all. The
    labels use PIL's built-in font. Every image must have the same size; images under
    ``MIN_TILE`` pixels (the miniature world's 32 px) are enlarged by a whole factor, nearest
    neighbour, so that they can be seen and their labels fit beside them.
    """
    layout = grid_layout(rows, row_labels=row_labels, col_labels=col_labels, title=title)
    grid = Image.new("RGB", layout.size, "white")
    draw, font = ImageDraw.Draw(grid), _font()
    if layout.title_lines:
        draw.multiline_text((PAD, PAD), "\n".join(layout.title_lines), fill="black", font=font)
    y = layout.top - PAD - _lines_height(1, font)
    for j, label in enumerate(col_labels):
        x = layout.left + j * layout.tile_w + (layout.tile_w - _text_size(label, font)[0]) // 2
        draw.text((max(x, layout.left + j * layout.tile_w), y), label, fill="black", font=font)
    for i, (key, images) in enumerate(rows.items()):
        y = layout.top + i * layout.tile_h
        draw.multiline_text((PAD, y + PAD), row_labels.get(key, key), fill="black", font=font)
        for j, image in enumerate(images):
            tile = image.convert("RGB")
            if tile.size != (layout.tile_w, layout.tile_h):
                tile = tile.resize((layout.tile_w, layout.tile_h), Image.NEAREST)
            grid.paste(tile, (layout.left + j * layout.tile_w, y))
    return grid


MIN_TILE = 64  # pixels: smaller images are shown enlarged


def _zoom(width: int, height: int) -> int:
    """The whole factor that brings a tile's shorter side to at least ``MIN_TILE``."""
    return max(1, -(-MIN_TILE // max(min(width, height), 1)))


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()  # shipped with Pillow: no download


def _text_size(text: str, font) -> tuple[int, int]:
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font=font)
    return box[2], box[3]


def _lines_height(n: int, font) -> int:
    """The height of n lines of any text (so that "x" and "Tg" take the same room)."""
    return _text_size("\n".join(["Ág|"] * n), font)[1]


def _wrap(text: str, width: int, font, max_lines: int = TITLE_LINES) -> list[str]:
    """Greedy word wrap to ``width`` pixels, at most ``max_lines`` lines. A longer text is cut,
    its last line ending in an ellipsis; so is a word wider than a line."""
    # each character is at least a pixel wide: no more of the text can show, and a title of
    # megabytes costs no more than one that fills the band
    shown = text[: max_lines * (width + 1)]
    lines: list[str] = []
    for paragraph in shown.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            trial = f"{line} {word}" if line else word
            if line and _text_size(trial, font)[0] > width:
                lines.append(line)
                line = word
                if len(lines) > max_lines:
                    break
            else:
                line = trial
        lines.append(line)
        if len(lines) > max_lines:
            break
    cut = len(lines) > max_lines or len(shown) < len(text)
    lines = lines[:max_lines]
    return [_fit(line, width, font, cut and i == len(lines) - 1) for i, line in enumerate(lines)]


def _fit(line: str, width: int, font, ellipsis: bool) -> str:
    """``line``, or its longest start that fits ``width`` pixels with an ellipsis after it
    (when ``ellipsis``, or when the line does not fit)."""
    if not ellipsis and _text_size(line, font)[0] <= width:
        return line
    lo, hi = 0, len(line)  # binary search: the text's width grows with its length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _text_size(line[:mid].rstrip() + ELLIPSIS, font)[0] <= width:
            lo = mid
        else:
            hi = mid - 1
    return line[:lo].rstrip() + ELLIPSIS


def stack(grids: Sequence[Image.Image]) -> Image.Image:
    """Grids one below the other, left-aligned, on white."""
    width = max(g.width for g in grids)
    out = Image.new("RGB", (width, sum(g.height for g in grids)), "white")
    y = 0
    for g in grids:
        out.paste(g, (0, y))
        y += g.height
    return out
