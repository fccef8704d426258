"""The miniature world: captioned procedural images whose content is known by construction.

A scene is an object, a colour, a background and a style. Style ``"photo"`` draws the object
filled with its colour, lightly shaded, on the background; style ``"pencil sketch"`` draws a
graphite outline with hatching on near-white paper, so a sketch has no colour and no
background (both ``None``). The world serves three jobs: pretraining data for the tiny
SD-architecture model (every object except ``HELD_OUT``), the concept that model has never
seen (``HELD_OUT``), and the training and test images of the judge (``judge.py``).

    scenes = sample_scenes(1000, seed=0, exclude_objects=(HELD_OUT,))
    rng = np.random.default_rng(0)
    image = render(scenes[0], size=64, rng=rng)   # PIL RGB, jittered pose, mild noise
    text = caption(scenes[0], rng)                # e.g. "a photo of a red star on grass"
    render(Scene("star", "red", "blue", "photo")) # canonical: centred, no jitter, no noise

Everything is drawn at 4x the requested size and box-downsampled (anti-aliasing). A photo
never puts an object on a background that would hide it (``CLASHES``). The same seed gives
the same scenes, images and captions, and the first k of n scenes equal the k scenes drawn
with the same seed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from ..fsutil import atomic_dir

__all__ = [
    "BACKGROUNDS",
    "BACKGROUND_PHRASES",
    "CLASHES",
    "COLOURS",
    "COLOUR_RGB",
    "HELD_OUT",
    "OBJECTS",
    "PHOTO",
    "PHOTO_CAPTIONS",
    "PLAIN_BACKGROUNDS",
    "SKETCH",
    "SKETCH_CAPTIONS",
    "STYLES",
    "Scene",
    "WorldExample",
    "caption",
    "photo_pairs",
    "prompt_asks",
    "render",
    "render_empty",
    "render_examples",
    "sample_scenes",
    "silhouette_of",
    "write_examples",
]

# ------------------------------------------------------------------------------ vocabulary
# Filled shapes whose silhouettes stay apart at 32 px under +-20 degrees of rotation (no
# diamond: a turned square; no ring: a circle's outline in a sketch).
OBJECTS = ("circle", "square", "triangle", "star", "heart", "cross", "moon", "arrow")
# The concept the tiny model never sees in pretraining: two lobes and a point, unlike any
# other silhouette here, and "heart" is one token in the tiny CLIP vocabulary.
HELD_OUT = "heart"

COLOUR_RGB = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (40, 90, 220),
    "yellow": (245, 215, 40),
    "orange": (245, 135, 25),
    "purple": (140, 55, 190),
    "white": (246, 246, 246),
    "black": (25, 25, 25),
}
COLOURS = tuple(COLOUR_RGB)

BACKGROUNDS = ("white", "black", "blue", "stripes", "dots", "grass")
# How captions say it: "on a striped background", "on grass".
BACKGROUND_PHRASES = {
    "white": "a white background",
    "black": "a black background",
    "blue": "a blue background",
    "stripes": "a striped background",
    "dots": "a dotted background",
    "grass": "grass",
}
# Colours a photo never puts on a background: the object would vanish into it.
CLASHES = {
    "white": frozenset({"white"}),
    "black": frozenset({"black"}),
    "blue": frozenset({"blue", "purple"}),
    "stripes": frozenset({"white"}),  # pink and white stripes
    "dots": frozenset({"green"}),  # teal with pale dots
    "grass": frozenset({"green"}),
}

PHOTO, SKETCH = STYLES = ("photo", "pencil sketch")

# The first template of each list is the canonical caption (``caption(scene)`` without rng).
# "{a_colour_object}" is "a red star" / "an orange arrow"; "{a_object}" is "a star".
PHOTO_CAPTIONS = (
    "a photo of {a_colour_object} on {background}",
    "{a_colour_object} on {background}",
    "a photo of {a_colour_object}",
    "{a_colour_object}",
    "a photo of {a_object} on {background}",
)
SKETCH_CAPTIONS = (
    "a pencil sketch of {a_object}",
    "a sketch of {a_object}",
    "{a_object}, pencil sketch",
)

SUPERSAMPLE = 4  # drawn at 4x, box-downsampled


@dataclass(frozen=True)
class Scene:
    """What one image shows. A ``"pencil sketch"`` has ``colour`` and ``background`` None.

    Raises:
        ValueError: an unknown name, a sketch with a colour or background, a photo without
            them, or a photo colour that ``CLASHES`` with its background.
    """

    object: str
    colour: str | None
    background: str | None
    style: str = PHOTO

    def __post_init__(self) -> None:
        _check_name("object", self.object, OBJECTS)
        _check_name("style", self.style, STYLES)
        if self.style == SKETCH:
            if self.colour is not None or self.background is not None:
                raise ValueError(
                    f"A pencil sketch is grey on paper: give colour=None and background=None "
                    f"(got colour={self.colour!r}, background={self.background!r})."
                )
            return
        _check_name("colour", self.colour, COLOURS)
        _check_name("background", self.background, BACKGROUNDS)
        if self.colour in CLASHES[self.background]:
            raise ValueError(
                f"A {self.colour} object on the {self.background} background would be "
                f"invisible; pick another colour or background (see world.CLASHES)."
            )


def _check_name(kind: str, value: object, vocabulary: Sequence[str]) -> None:
    if value not in vocabulary:
        raise ValueError(f"Unknown {kind} {value!r}; choose one of {', '.join(vocabulary)}.")


def photo_pairs() -> list[tuple[str, str]]:
    """Every (colour, background) a photo may show, in vocabulary order (41 of 48)."""
    return [(c, b) for c in COLOURS for b in BACKGROUNDS if c not in CLASHES[b]]


# ------------------------------------------------------------------------------ sampling
def sample_scenes(
    n: int,
    seed: int,
    *,
    objects: Iterable[str] | None = None,
    exclude_objects: Iterable[str] = (),
    sketch_fraction: float = 0.25,
) -> list[Scene]:
    """``n`` scenes drawn with ``seed``: objects uniform over ``objects`` (default all) minus
    ``exclude_objects``; a sketch with probability ``sketch_fraction``, else a photo with a
    (colour, background) pair uniform over ``photo_pairs()``.

    Raises:
        ValueError: an unknown object, no object left, or ``sketch_fraction`` outside [0, 1].
    """
    pool = list(OBJECTS if objects is None else objects)
    excluded = set(exclude_objects)
    for name in [*pool, *excluded]:
        _check_name("object", name, OBJECTS)
    pool = [o for o in pool if o not in excluded]
    if not pool:
        raise ValueError("No object left to draw: `objects` minus `exclude_objects` is empty.")
    if not 0.0 <= sketch_fraction <= 1.0:
        raise ValueError(f"sketch_fraction must be in [0, 1], got {sketch_fraction}.")
    pairs = photo_pairs()
    rng = np.random.default_rng(seed)
    scenes = []
    for _ in range(n):  # a fixed number of draws per scene: prefixes agree across n
        obj = pool[rng.integers(len(pool))]
        is_sketch = rng.random() < sketch_fraction
        colour, background = pairs[rng.integers(len(pairs))]
        if is_sketch:
            scenes.append(Scene(obj, None, None, SKETCH))
        else:
            scenes.append(Scene(obj, colour, background, PHOTO))
    return scenes


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A caption for ``scene``: a random template with ``rng``, the canonical one without.

    "a photo of a red star on a blue background", "an orange arrow", "a pencil sketch of a
    moon", ...
    """
    templates = SKETCH_CAPTIONS if scene.style == SKETCH else PHOTO_CAPTIONS
    template = templates[0] if rng is None else templates[rng.integers(len(templates))]
    return template.format(
        a_object=_with_article(scene.object),
        a_colour_object=_with_article(f"{scene.colour} {scene.object}"),
        background=BACKGROUND_PHRASES.get(scene.background, ""),
    )


def prompt_asks(text: str, thing: str) -> dict[str, str | None]:
    """What a prompt about ``thing`` (an object name, or a concept token) asks for: its
    ``colour`` (the colour word right before ``thing``), ``background`` (a trailing "on ..."
    phrase of ``BACKGROUND_PHRASES``) and ``style`` ("sketch" or "photo" in the text); None
    where the prompt is silent. "a photo of a green <V> on grass" asks green, grass, photo.
    """
    words = re.escape(thing)
    colour = re.search(rf"\b({'|'.join(COLOURS)})\s+{words}", text)
    background = next(
        (name for name, phrase in BACKGROUND_PHRASES.items() if text.endswith(f"on {phrase}")),
        None,
    )
    style = SKETCH if "sketch" in text else PHOTO if "photo" in text else None
    return {
        "colour": colour.group(1) if colour else None,
        "background": background,
        "style": style,
    }


def _with_article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


# ------------------------------------------------------------------------------ shapes
_Polygon = tuple[np.ndarray, bool]  # (points (N, 2) in units of the radius, y down; add?)


def _ring(n: int, radius: float = 1.0, phase: float = -math.pi / 2) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 96, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y - 2.5], axis=1) / 15  # lobes at y -0.9, point at y +1.0


def _star() -> np.ndarray:
    points = _ring(10, 1.1)
    points[1::2] *= 0.45  # inner corners
    return points


def _cross(half_width: float = 0.34, reach: float = 1.0) -> np.ndarray:
    w, r = half_width, reach
    return np.array(
        [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
         (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    )  # fmt: skip


def _arrow() -> np.ndarray:
    return np.array(
        [(-1.1, -0.27), (0.1, -0.27), (0.1, -0.72), (1.1, 0.0),
         (0.1, 0.72), (0.1, 0.27), (-1.1, 0.27)]
    )  # fmt: skip


# Sizes are tuned so every shape covers a similar area at the same radius.
_SHAPES: dict[str, tuple[_Polygon, ...]] = {
    "circle": ((_ring(96), True),),
    "square": ((_ring(4, 1.15, math.pi / 4), True),),
    "triangle": ((_ring(3, 1.2) + (0, 0.12), True),),
    "star": ((_star(), True),),
    "heart": ((_heart(), True),),
    "cross": ((_cross(), True),),
    "moon": ((_ring(96), True), (_ring(96, 0.85) + (0.5, -0.25), False)),
    "arrow": ((_arrow(), True),),
}


class _Pose(NamedTuple):
    cx: float  # centre, output pixels
    cy: float
    radius: float  # output pixels
    angle: float  # radians
    light: tuple[float, float]  # unit vector towards the light


def _pose(size: int, rng: np.random.Generator | None) -> _Pose:
    if rng is None:
        return _Pose(size / 2, size / 2, 0.34 * size, 0.0, (-0.6, -0.8))
    radius = rng.uniform(0.27, 0.40) * size
    slack = max(size / 2 - 1.15 * radius, 0.0)  # shapes reach ~1.15 radii from the centre
    cx, cy = size / 2 + slack * rng.uniform(-0.8, 0.8, size=2)
    angle = math.radians(rng.uniform(-20, 20))
    light = rng.uniform(-math.pi, 0)  # from above, any side
    return _Pose(cx, cy, radius, angle, (math.cos(light), math.sin(light)))


def _mask(obj: str, size: int, pose: _Pose) -> Image.Image:
    """The filled silhouette on the 4x canvas: an L image, 255 inside."""
    canvas = size * SUPERSAMPLE
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(pose.angle), math.sin(pose.angle)
    rotation = np.array([[c, s], [-s, c]])  # row vectors: p @ R turns by +angle
    for points, add in _SHAPES[obj]:
        xy = (points @ rotation * pose.radius + (pose.cx, pose.cy)) * SUPERSAMPLE
        draw.polygon(xy.ravel().tolist(), fill=255 if add else 0)
    return mask


def silhouette_of(
    obj: str,
    size: int,
    radius: float,
    angle: float = 0.0,
    centre: tuple[float, float] | None = None,
) -> np.ndarray:
    """The (size, size) bool silhouette ``render`` gives ``obj`` at ``radius`` pixels, turned by
    ``angle`` radians about ``centre`` (x, y pixels; default the middle): the 4x mask
    box-downsampled, at least half covered. ``shape.best_fit_iou`` fits these."""
    cx, cy = (size / 2, size / 2) if centre is None else centre
    coverage = _shrink(_mask(obj, size, _Pose(cx, cy, radius, angle, (0.0, -1.0))), size)
    return coverage >= 0.5


_EDGE = [255 if 12 < v < 243 else 0 for v in range(256)]  # lookup tables for Image.point
_INSIDE = [255 if v >= 243 else 0 for v in range(256)]
_HALF = [v // 2 for v in range(256)]


def _edge_and_inside(mask: Image.Image, width: float) -> tuple[Image.Image, Image.Image]:
    """L masks (255 set) of a band about ``width`` canvas pixels wide centred on the
    silhouette's edge, and of the inside beyond it. A box blur and a threshold stand in for
    morphology (30x faster than PIL's MinFilter at these sizes)."""
    blurred = mask.filter(ImageFilter.BoxBlur(max(width / 2, 0.5)))
    return blurred.point(_EDGE), blurred.point(_INSIDE)


def _shrink(mask: Image.Image, side: int) -> np.ndarray:
    """A 4x L mask box-downsampled to (side, side) float32 coverage in [0, 1]: the
    anti-aliasing."""
    return np.asarray(mask.resize((side, side), Image.BOX), np.float32) / 255


@cache
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (y, x), each (side, side) float32; shared, read-only."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) + 0.5
    y.flags.writeable = x.flags.writeable = False
    return y, x


def _light_side(pose: _Pose, size: int) -> np.ndarray:
    """(size, size): position along the light direction in radii, +1 on the lit rim, -1 on
    the dark one."""
    y, x = _grid(size)
    lx, ly = pose.light
    return ((x - pose.cx) * lx + (y - pose.cy) * ly) / pose.radius


# ------------------------------------------------------------------------------ backgrounds
_STRIPES = ((250, 240, 240), (235, 150, 180))  # near-white, pink
_DOTS = ((30, 135, 140), (190, 230, 222))  # teal, pale teal
_GRASS_TOP, _GRASS_BOTTOM = (130, 185, 75), (45, 115, 35)
_BLADES = ((30, 90, 25), (160, 210, 95))  # dark, light
_PAPER = np.float32((243, 242, 238))  # a sketch's paper
_PLAIN = {"white": (240, 240, 236), "black": COLOUR_RGB["black"], "blue": COLOUR_RGB["blue"]}
PLAIN_BACKGROUNDS = tuple(_PLAIN)  # one colour and a gentle gradient: no texture


def _background(name: str, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """(size, size, 3) float32 in 0..255. Patterns are drawn as masks on the 4x canvas and
    coloured at 1x. Without rng: fixed period, phase and texture."""
    jitter = rng is not None
    texture_rng = rng if jitter else np.random.default_rng(0)
    canvas = size * SUPERSAMPLE
    if name in _PLAIN:
        y, _ = _grid(size)
        gradient = rng.uniform(0.0, 0.12) if jitter else 0.06
        shade = (1 + gradient * (0.5 - y / size))[..., None]  # lighter at the top
        return np.float32(_PLAIN[name]) * shade + 12 * (shade - 1)
    if name == "stripes":
        angle = math.radians(45 + (rng.uniform(-12, 12) if jitter else 0))
        period = canvas / 6 * (rng.uniform(0.85, 1.15) if jitter else 1.0)
        mask = _stripes_mask(canvas, angle, period, phase=texture_rng.random())
        return _tint(np.full((size, size, 3), _STRIPES[0], np.float32), mask, _STRIPES[1])
    if name == "dots":
        spacing = canvas / 5 * (rng.uniform(0.85, 1.15) if jitter else 1.0)
        mask = _dots_mask(canvas, spacing, offset=texture_rng.uniform(0, spacing, size=2))
        return _tint(np.full((size, size, 3), _DOTS[0], np.float32), mask, _DOTS[1])
    if name == "grass":
        t = (_grid(size)[0] / size)[..., None]
        field = np.float32(_GRASS_TOP) * (1 - t) + np.float32(_GRASS_BOTTOM) * t
        masks = [Image.new("L", (canvas, canvas), 0) for _ in _BLADES]
        draws = [ImageDraw.Draw(m) for m in masks]
        blades = 80  # short, slightly leaning strokes, 60% dark
        x0, y0 = texture_rng.uniform((0, 0.05), (1, 1.1), size=(blades, 2)).T * canvas
        height = texture_rng.uniform(0.05, 0.14, blades) * canvas
        lean = texture_rng.uniform(-0.05, 0.05, blades) * canvas
        shade = (texture_rng.random(blades) >= 0.6).tolist()  # 0: dark, 1: light
        for i in range(blades):
            line = (x0[i], y0[i], x0[i] + lean[i], y0[i] - height[i])
            draws[shade[i]].line(line, fill=255, width=max(canvas // 80, 1))
        for mask, colour in zip(masks, _BLADES, strict=True):
            field = _tint(field, mask, colour)
        return field
    raise ValueError(f"Unknown background {name!r}; choose one of {', '.join(BACKGROUNDS)}.")


def _tint(image: np.ndarray, mask: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    """``image`` (1x) painted with ``colour`` where the 4x L ``mask`` is set, anti-aliased."""
    alpha = _shrink(mask, image.shape[0])[..., None]
    return image * (1 - alpha) + np.float32(colour) * alpha


def _stripes_mask(
    canvas: int, angle: float, period: float, phase: float, duty: float = 0.5
) -> Image.Image:
    """Bands ``duty`` of a ``period`` wide, their normal at ``angle``: a polygon per band."""
    normal = np.array([math.cos(angle), math.sin(angle)])
    along = np.array([-normal[1], normal[0]]) * canvas * 1.5  # long enough to cross the canvas
    # Canvas points p span u = p . normal over [u_low, u_high]; band k covers u in
    # [(k - phase) * period, (k - phase + duty) * period].
    u_low = canvas * (min(normal[0], 0) + min(normal[1], 0))
    u_high = canvas * (max(normal[0], 0) + max(normal[1], 0))
    bands = np.arange(math.floor(u_low / period) - 1, math.ceil(u_high / period) + 2) - phase
    low = bands[:, None, None] * period * normal  # (K, 1, 2)
    high = low + duty * period * normal
    corners = np.concatenate([low - along, low + along, high + along, high - along], axis=1)
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    for polygon in corners.reshape(len(bands), -1).tolist():  # (K, 8): x0, y0, x1, y1, ...
        draw.polygon(polygon, fill=255)
    return mask


def _dots_mask(canvas: int, spacing: float, offset: np.ndarray) -> Image.Image:
    """Dots of radius 0.24 ``spacing`` on a hexagonal grid (odd rows shifted half a step)."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    row_height = spacing * math.sqrt(3) / 2
    radius = 0.24 * spacing
    for row in range(-1, int(canvas / row_height) + 2):
        cy = (row + 0.5) * row_height - offset[1]
        shift = offset[0] + (row % 2) * spacing / 2
        for column in range(-1, int(canvas / spacing) + 2):
            cx = (column + 0.5) * spacing - shift
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    return mask


# ------------------------------------------------------------------------------ rendering
def render(scene: Scene, size: int = 64, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image.

    With ``rng``: random position, size, rotation, lighting, colour tint, background phase and
    pixel noise. Without: the canonical picture (centred, upright, no noise), the same every
    call. About 1 ms at 32 px and 2 ms at 64 px on one CPU core.

    Raises:
        ValueError: ``size`` below 8.
    """
    return render_with_mask(scene, size, rng)[0]


def render_with_mask(
    scene: Scene, size: int = 64, rng: np.random.Generator | None = None
) -> tuple[Image.Image, Image.Image]:
    """``render``'s image (the same pixels for the same ``rng`` state) and the object's
    subject mask: an L image of ``size`` x ``size``, 255 where the silhouette covers at least
    half a pixel, 0 elsewhere (what a Mix-of-Show ``mask/`` folder holds)."""
    _check_size(size)
    pose = _pose(size, rng)
    mask = _mask(scene.object, size, pose)
    draw = _draw_sketch if scene.style == SKETCH else _draw_photo
    image = _finish(draw(scene, mask, pose, size, rng), rng)
    subject = Image.fromarray(np.where(_shrink(mask, size) >= 0.5, 255, 0).astype(np.uint8), "L")
    return image, subject


def render_empty(
    background: str | None, size: int = 64, rng: np.random.Generator | None = None
) -> Image.Image:
    """A scene with no object: a photo background, or blank sketch paper for None. The judge
    learns from these what "nothing there" looks like.

    Raises:
        ValueError: an unknown background, or ``size`` below 8.
    """
    _check_size(size)
    if background is None:
        return _finish(np.broadcast_to(_PAPER, (size, size, 3)), rng)
    _check_name("background", background, BACKGROUNDS)
    return _finish(_background(background, size, rng), rng)


def _check_size(size: int) -> None:
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}.")


def _finish(image: np.ndarray, rng: np.random.Generator | None) -> Image.Image:
    """(size, size, 3) float -> PIL RGB, with sensor / paper grain when ``rng`` is given."""
    if rng is not None:  # one value per pixel for all channels
        image = image + rng.normal(0.0, rng.uniform(1.0, 4.0), size=(*image.shape[:2], 1))
    return Image.fromarray(np.clip(np.rint(image), 0, 255).astype(np.uint8), "RGB")


def _draw_photo(scene: Scene, mask: Image.Image, pose: _Pose, size: int, rng) -> np.ndarray:
    """(size, size, 3) float: the shaded object over its background."""
    background = _background(scene.background, size, rng)
    rgb = np.array(COLOUR_RGB[scene.colour], np.float32)
    if rng is not None:  # exposure and a slight tint; small enough to keep orange != yellow
        rgb = rgb * rng.uniform(0.9, 1.06) + rng.normal(0.0, 5.0, size=3).astype(np.float32)
    # Lit side up to 22% brighter, dark side 22% darker; the additive part shades black too.
    # Smooth, so computed at 1x; only the silhouette and its rim need the 4x canvas.
    shade = 0.22 * np.clip(_light_side(pose, size), -1.0, 1.0)[..., None]
    edge, _ = _edge_and_inside(mask, width=0.8 * SUPERSAMPLE)
    body = (rgb * (1 + shade) + 30 * shade) * (1 - 0.3 * _shrink(edge, size)[..., None])  # rim
    alpha = _shrink(mask, size)[..., None]
    return background * (1 - alpha) + body * alpha


def _draw_sketch(scene: Scene, mask: Image.Image, pose: _Pose, size: int, rng) -> np.ndarray:
    """(size, size, 3) float: graphite outline plus hatching on the shadow side, on paper."""
    canvas = size * SUPERSAMPLE
    # Line widths in output pixels: a 64 px sketch has ~1.8 px lines, never thinner than 1.25.
    line = max(1.25, 0.028 * size) * SUPERSAMPLE
    edge, inside = _edge_and_inside(mask, width=line)
    if rng is None:
        graphite, pressure, angle, spacing_scale, threshold = 70.0, 1.0, 45.0, 1.0, -0.1
    else:
        graphite, pressure = rng.uniform(50, 105), rng.uniform(0.8, 1.0)
        angle = rng.uniform(30, 60) * (1 if rng.random() < 0.7 else -1)
        spacing_scale, threshold = rng.uniform(0.85, 1.2), rng.uniform(-0.5, 0.2)
    spacing = max(2.5, 0.075 * size) * SUPERSAMPLE * spacing_scale
    strokes = _stripes_mask(canvas, math.radians(angle), spacing, phase=0.0, duty=0.35)
    hatching = ImageChops.multiply(
        ImageChops.multiply(strokes, inside), _shadow(canvas, pose, threshold)
    )
    lines = ImageChops.lighter(edge, hatching.point(_HALF))  # hatching half as dark
    darkness = (_shrink(lines, size) * pressure)[..., None]
    return _PAPER * (1 - darkness) + graphite * darkness


def _shadow(canvas: int, pose: _Pose, threshold: float) -> Image.Image:
    """4x L mask of the side away from the light, where ``_light_side`` < ``threshold``: the
    half-plane p . light < offset, drawn as one large quadrilateral."""
    light = np.array(pose.light)
    along = np.array([-light[1], light[0]])
    offset = SUPERSAMPLE * (threshold * pose.radius + pose.cx * light[0] + pose.cy * light[1])
    far, reach = -3 * canvas, 3 * canvas  # every canvas point p has p . light > -1.5 canvas
    corners = [offset * light - reach * along, offset * light + reach * along,
               far * light + reach * along, far * light - reach * along]  # fmt: skip
    mask = Image.new("L", (canvas, canvas), 0)
    ImageDraw.Draw(mask).polygon([tuple(c) for c in corners], fill=255)
    return mask


# ------------------------------------------------------------------------------ datasets
class WorldExample(NamedTuple):
    scene: Scene
    image: Image.Image
    caption: str


def render_examples(
    n: int,
    seed: int,
    *,
    size: int = 64,
    objects: Iterable[str] | None = None,
    exclude_objects: Iterable[str] = (),
    sketch_fraction: float = 0.25,
) -> list[WorldExample]:
    """``n`` captioned images: ``sample_scenes(n, seed, ...)``, each rendered and captioned
    with one generator seeded by ``(seed, 1)``, so the images do not replay the scene draws."""
    scenes = sample_scenes(
        n, seed, objects=objects, exclude_objects=exclude_objects, sketch_fraction=sketch_fraction
    )
    rng = np.random.default_rng((seed, 1))
    return [WorldExample(s, render(s, size, rng), caption(s, rng)) for s in scenes]


def write_examples(examples: Sequence[WorldExample], folder: str | Path) -> Path:
    """Write ``00000.png`` + ``00000.txt`` (the caption) per example: the "images with
    same-name .txt captions" layout that ``files.concept_data.discover_examples`` reads. The
    folder appears complete or not at all; an existing one is replaced."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        for i, example in enumerate(examples):
            example.image.save(tmp / f"{i:05d}.png")
            (tmp / f"{i:05d}.txt").write_text(example.caption + "\n", encoding="utf-8")
    return folder
