"""miniature.judge: the shipped judge reads fresh world images, refuses bad input.

The accuracy tests run real inference on images rendered here from seeds the judge never saw
(training used seed 0, its report seed 10,000; these use 20,000+).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from sai_diffusion.errors import UserError
from sai_diffusion.miniature import world
from sai_diffusion.miniature.judge import (
    FORMAT,
    HEADS,
    NOTHING,
    Judge,
    JudgeNet,
    accuracy,
    default_judge_path,
    world_labels,
)

# The shipped judge scores >= 0.99 per head on 2,000 fresh images (configs/judge/report.json);
# 0.9 on 200 leaves room for sampling noise while still catching a broken judge or world.
MIN_ACCURACY = 0.9


@pytest.fixture(scope="module")
def judge():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Judge.load()
    torch.set_num_threads(threads)  # leave the process as it was for later tests


def rendered(scenes, size=64, seed=0):
    rng = np.random.default_rng(seed)
    return [world.render(s, size, rng) for s in scenes]


def test_the_shipped_judge_is_small_and_knows_the_world(judge):
    assert default_judge_path().stat().st_size < 1_000_000
    assert judge.labels == world_labels()


def test_the_shipped_judge_reads_fresh_world_images(judge):
    scenes = world.sample_scenes(200, seed=20_000)
    predictions = judge.predict(rendered(scenes, 64, seed=20_001))
    scores = accuracy(predictions, scenes)
    assert all(scores[head] >= MIN_ACCURACY for head in HEADS), scores


def test_the_shipped_judge_recognises_the_held_out_object(judge):
    scenes = world.sample_scenes(60, seed=20_002, objects=[world.HELD_OUT])
    predictions = judge.predict(rendered(scenes, 32, seed=20_003))
    assert accuracy(predictions, scenes)["object"] >= MIN_ACCURACY


def test_a_sketch_has_no_colour_or_background(judge):
    sketch = world.render(world.Scene("moon", None, None, world.SKETCH), 64)
    photo = world.render(world.Scene("moon", "yellow", "black"), 64)
    as_sketch, as_photo = judge.predict([sketch, photo])
    assert as_sketch["style"] == world.SKETCH and as_sketch["object"] == "moon"
    assert as_sketch["colour"] is None and as_sketch["background_prob"] is None
    read = (as_photo["object"], as_photo["colour"], as_photo["background"])
    assert read == ("moon", "yellow", "black")
    assert 0.5 < as_photo["colour_prob"] <= 1.0


def test_an_image_without_object_is_judged_nothing(judge):
    rng = np.random.default_rng(20_004)
    paper, grass = world.render_empty(None, 64, rng), world.render_empty("grass", 64, rng)
    on_paper, on_grass = judge.predict([paper, grass])
    assert on_paper["object"] == on_grass["object"] == NOTHING
    assert on_grass["colour"] is None and on_grass["background"] == "grass"


def test_scores_are_probabilities_over_every_label(judge):
    scores = judge.scores([world.render(world.Scene("star", "red", "blue"), 32)])
    for head in HEADS:
        assert scores[head].shape == (1, len(judge.labels[head]))
        assert torch.allclose(scores[head].sum(dim=1), torch.ones(1))


def test_any_mode_and_square_size_from_16_px_is_read(judge):
    image = world.render(world.Scene("cross", "red", "white"), 48)
    inputs = [image, image.convert("RGBA"), image.resize((16, 16)), image.convert("L")]
    predictions = judge.predict(inputs)
    assert [p["object"] for p in predictions[:3]] == ["cross"] * 3
    assert judge.predict([]) == []


def test_wrong_input_is_refused_with_the_fix(judge):
    image = world.render(world.Scene("star", "red", "blue"), 32)
    with pytest.raises(TypeError, match=r"list of images, e.g. judge.predict\(\[image\]\)"):
        judge.predict(image)
    with pytest.raises(TypeError, match=r"images\[1\]: .*got ndarray.*Image.fromarray"):
        judge.predict([image, np.asarray(image)])
    with pytest.raises(ValueError, match=r"images\[0\]: .*square.*64x48"):
        judge.predict([Image.new("RGB", (64, 48))])
    with pytest.raises(ValueError, match="at least 16 px"):
        judge.predict([Image.new("RGB", (8, 8))])


# --------------------------------------------------------------------------- files


def test_save_and_load_round_trip(tmp_path):
    labels = world_labels()
    torch.manual_seed(0)
    net = JudgeNet({h: len(labels[h]) for h in HEADS}, widths=(4, 8, 8))
    original = Judge(net, labels)
    loaded = Judge.load(original.save(tmp_path / "judge.safetensors"))
    images = [world.render(s, 32) for s in world.sample_scenes(4, seed=0)]
    for head, probs in original.scores(images).items():
        assert torch.equal(probs, loaded.scores(images)[head])


def test_loading_a_missing_or_foreign_file_says_how_to_rebuild(tmp_path):
    with pytest.raises(UserError, match="does not exist; re-create it with"):
        Judge.load(tmp_path / "nope.safetensors")
    foreign = tmp_path / "lora.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign), metadata={"format": "pt"})
    with pytest.raises(UserError, match="is not a judge file"):
        Judge.load(foreign)
    no_labels = tmp_path / "no_labels.safetensors"
    save_file({"w": torch.zeros(2)}, str(no_labels), metadata={"format": FORMAT})
    with pytest.raises(UserError, match="does not match its network"):
        Judge.load(no_labels)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        Judge.load(garbage)
