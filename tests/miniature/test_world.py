"""miniature.world: the procedural, captioned miniature world."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from sai_diffusion.files.concept_data import discover_examples
from sai_diffusion.miniature import world
from sai_diffusion.miniature.world import (
    BACKGROUNDS,
    CLASHES,
    COLOUR_RGB,
    COLOURS,
    HELD_OUT,
    OBJECTS,
    PHOTO,
    SKETCH,
    Scene,
    caption,
    photo_pairs,
    render,
    render_examples,
    sample_scenes,
    write_examples,
)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# --------------------------------------------------------------------------- determinism


def test_same_seed_gives_the_same_scenes_images_and_captions():
    first, again = render_examples(12, seed=7, size=32), render_examples(12, seed=7, size=32)
    assert [e.scene for e in first] == [e.scene for e in again]
    assert [e.caption for e in first] == [e.caption for e in again]
    assert all(a.image.tobytes() == b.image.tobytes() for a, b in zip(first, again, strict=True))


def test_another_seed_gives_other_scenes_and_images():
    a, b = render_examples(12, seed=7, size=32), render_examples(12, seed=8, size=32)
    assert [e.scene for e in a] != [e.scene for e in b]
    assert a[0].image.tobytes() != b[0].image.tobytes()


def test_the_first_scenes_do_not_depend_on_how_many_are_drawn():
    assert sample_scenes(200, seed=3)[:50] == sample_scenes(50, seed=3)


def test_the_canonical_render_is_the_same_every_call():
    scene = Scene("star", "red", "grass")
    assert render(scene, 32).tobytes() == render(scene, 32).tobytes()


# --------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("obj", OBJECTS)
def test_every_combination_renders_at_the_requested_size_as_rgb(obj):
    scenes = [Scene(obj, c, b) for c, b in photo_pairs()] + [Scene(obj, None, None, SKETCH)]
    rng = np.random.default_rng(0)
    for scene in scenes:
        for image in (render(scene, 16), render(scene, 24, rng)):
            assert image.mode == "RGB"
            assert image.size in ((16, 16), (24, 24))
    assert render(scenes[0], 64).size == (64, 64)


@pytest.mark.parametrize("colour", COLOURS)
def test_a_canonical_circle_shows_its_colour_at_the_centre(colour):
    """Shading is zero at the centre of an upright shape: the pixel is the colour itself."""
    background = next(b for b in BACKGROUNDS if colour not in CLASHES[b])
    image = pixels(render(Scene("circle", colour, background), 32))
    assert np.abs(image[16, 16] - np.array(COLOUR_RGB[colour])).max() <= 12


@pytest.mark.parametrize("background", BACKGROUNDS)
def test_the_object_stands_out_from_every_background(background):
    colour = next(c for c in COLOURS if c not in CLASHES[background])
    with_object = pixels(render(Scene("square", colour, background), 32))
    corner = with_object[:4, :4].reshape(-1, 3).mean(axis=0)
    centre = with_object[14:18, 14:18].reshape(-1, 3).mean(axis=0)
    assert np.abs(centre - corner).max() > 60


@pytest.mark.parametrize(("background", "share"), [("stripes", 0.5), ("dots", 0.21)])
def test_patterns_cover_the_whole_background(background, share):
    """Half of a striped background is pink; dots (radius 0.24 of the spacing, hexagonal)
    cover 0.21. Guards against bands or dots drawn on part of the canvas only."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        image = pixels(world.render_empty(background, 64, rng))
        second_colour = image[..., 1] < 195 if background == "stripes" else image[..., 0] > 110
        for half in (second_colour[:32], second_colour[32:], second_colour[:, :32]):
            assert abs(half.mean() - share) < 0.1


def test_sketches_are_near_greyscale_and_mostly_light():
    scenes = sample_scenes(40, seed=11, sketch_fraction=1.0)
    rng = np.random.default_rng(0)
    for scene in scenes:
        image = pixels(render(scene, 64, rng))
        channel_spread = image.max(axis=2) - image.min(axis=2)
        assert channel_spread.mean() < 8 and channel_spread.max() < 30  # paper (243, 242, 238)
        grey = image.mean(axis=2)
        assert (grey > 200).mean() > 0.7  # paper dominates
        assert grey.min() < 150  # but there is a graphite line


def test_an_empty_scene_is_the_background_alone_or_blank_paper():
    rng = np.random.default_rng(0)
    paper = pixels(world.render_empty(None, 32, rng))
    assert paper.shape == (32, 32, 3) and paper.mean() > 230 and paper.std() < 8
    for background in BACKGROUNDS:
        assert world.render_empty(background, 24, rng).size == (24, 24)
    with pytest.raises(ValueError, match="Unknown background 'sky'"):
        world.render_empty("sky")


def test_sketches_ignore_colour_and_background_and_photos_need_them():
    with pytest.raises(ValueError, match="colour=None and background=None"):
        Scene("star", "red", None, SKETCH)
    with pytest.raises(ValueError, match="Unknown colour"):
        Scene("star", None, None, PHOTO)


def test_unknown_names_and_hidden_objects_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="Unknown object 'hexagon'; choose one of circle"):
        Scene("hexagon", "red", "blue")
    with pytest.raises(ValueError, match="Unknown background 'sky'"):
        Scene("star", "red", "sky")
    with pytest.raises(ValueError, match="invisible"):
        Scene("star", "white", "white")
    with pytest.raises(ValueError, match="at least 8"):
        render(Scene("star", "red", "blue"), 4)


# --------------------------------------------------------------------------- sampling


def test_the_held_out_object_can_be_excluded_and_drawn_alone():
    pretraining = sample_scenes(2000, seed=0, exclude_objects=(HELD_OUT,))
    assert {s.object for s in pretraining} == set(OBJECTS) - {HELD_OUT}
    concept = sample_scenes(50, seed=0, objects=[HELD_OUT])
    assert {s.object for s in concept} == {HELD_OUT}


def test_sampling_refuses_typos_and_empty_object_sets():
    with pytest.raises(ValueError, match="Unknown object 'hearts'"):
        sample_scenes(10, seed=0, exclude_objects=("hearts",))
    with pytest.raises(ValueError, match="No object left"):
        sample_scenes(10, seed=0, objects=["star"], exclude_objects=["star"])
    with pytest.raises(ValueError, match="sketch_fraction"):
        sample_scenes(10, seed=0, sketch_fraction=1.5)


def test_photos_never_clash_and_the_sketch_fraction_holds():
    scenes = sample_scenes(4000, seed=1, sketch_fraction=0.25)
    photos = [s for s in scenes if s.style == PHOTO]
    assert all(s.colour not in CLASHES[s.background] for s in photos)
    assert {(s.colour, s.background) for s in photos} == set(photo_pairs())
    assert 0.22 < 1 - len(photos) / len(scenes) < 0.28
    assert all(s.colour is None and s.background is None for s in scenes if s.style == SKETCH)


# --------------------------------------------------------------------------- captions


def test_canonical_captions():
    assert caption(Scene("star", "red", "blue")) == "a photo of a red star on a blue background"
    assert caption(Scene("arrow", "orange", "grass")) == "a photo of an orange arrow on grass"
    assert caption(Scene("star", None, None, SKETCH)) == "a pencil sketch of a star"


def test_random_captions_name_the_scene_and_nothing_else():
    colour_words = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
    for example in render_examples(400, seed=5, size=16):
        scene, text = example.scene, example.caption
        colour = f"({scene.colour} )?" if scene.colour else ""
        assert re.search(rf"\b(a|an) {colour}{scene.object}\b", text), text
        named_colours = set(colour_words.findall(text))
        background = world.BACKGROUND_PHRASES.get(scene.background)
        if scene.style == SKETCH:
            assert "sketch" in text and not named_colours, text
        else:
            assert "sketch" not in text, text
            # the object's colour, and the background's name when it is a colour word
            assert named_colours <= {scene.colour, scene.background}, text
            if " on " in text:
                assert text.endswith(f" on {background}"), text


# --------------------------------------------------------------------------- datasets


def test_written_examples_read_back_as_a_concept_folder(tmp_path):
    examples = render_examples(3, seed=0, size=16, objects=[HELD_OUT])
    folder = write_examples(examples, tmp_path / "heart")
    found = discover_examples(folder, token="<Vheart>")
    assert [e.caption for e in found] == [e.caption for e in examples]
    assert Image.open(found[0].image_path).tobytes() == examples[0].image.tobytes()
