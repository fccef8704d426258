"""The labelled grid's title band has a fixed maximum height (issue 30, case 7: a prompt of
200,000 newlines drew a 2.8 M-pixel-tall grid), and the comparer's seeds are whole numbers in
[0, 2**63)."""

from __future__ import annotations

import pytest
from PIL import Image, ImageDraw, ImageFont

from sai_diffusion.compare import TITLE_LINES, check_seeds, grid_layout, make_grid
from sai_diffusion.errors import UserError

ROWS = {
    "sgd-sai": [Image.new("RGB", (64, 64), "red")] * 2,
    "adamw": [Image.new("RGB", (64, 64))] * 2,
}
COLUMNS = ["seed 1", "seed 2"]


def _layout(title: str):
    return grid_layout(ROWS, row_labels={}, col_labels=COLUMNS, title=title)


def _width(text: str) -> int:
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return draw.textbbox((0, 0), text, font=ImageFont.load_default())[2]


@pytest.mark.parametrize(
    "title",
    ["\n" * 200_000, "a photo of {token} " * 10_000, "x" * 1_000_000, "word\n" * 50],
    ids=["newlines", "long line", "one long word", "many lines"],
)
def test_a_long_title_is_cut_to_the_band(title):
    """Any title takes at most TITLE_LINES lines, the band no more than a title of that many
    lines; each line fits the grid's width and the last ends in an ellipsis."""
    band = _layout("\n".join(["x"] * TITLE_LINES)).top
    layout = _layout(title)
    assert len(layout.title_lines) <= TITLE_LINES and layout.top <= band
    assert layout.title_lines[-1].endswith("…")
    assert all(_width(line) <= layout.size[0] - 12 for line in layout.title_lines)  # 2 * PAD
    grid = make_grid(ROWS, row_labels={}, col_labels=COLUMNS, title=title)
    assert grid.size == layout.size and grid.height == layout.top + 2 * 64


def test_a_title_that_fits_is_drawn_whole():
    lines = _layout("a pencil sketch of <Vthing>\nLoRA weight 1").title_lines
    assert lines == ("a pencil sketch of <Vthing>", "LoRA weight 1")


def test_seeds_are_whole_numbers_below_2_to_the_63():
    check_seeds([0, 1, 2**63 - 1])
    for bad in ([], [2**63], [99999999999999999999999], [-1], [1.5], [True]):
        with pytest.raises(UserError, match="seed"):
            check_seeds(bad)
