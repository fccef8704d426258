"""Aspect-ratio buckets, prior preservation and DoRA / LoCon in training (issue 18), on the
tiny model: what each batch holds, what the loss adds, what is trained and saved, and that a
run with all of them resumes bitwise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sai_diffusion import config
from sai_diffusion.errors import UserError
from sai_diffusion.files.mix_of_show import export_mix_of_show
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.models.inference import load_run
from sai_diffusion.training import recipe
from tests.helpers import load_pipe, make_concept, run_train

FAST = ["validation_seeds=[]", "checkpoint_every=0"]
LOCON = "lora_targets=to_q,to_k,to_v,to_out.0,conv1,conv2"


def _portraits(concept: Path, n: int = 2) -> None:
    """Replace the concept's first n images by 60 x 100 portraits, red on top, blue below."""
    for i in range(n):
        image = Image.new("RGB", (60, 100), (30, 40, 200))
        image.paste((220, 30, 30), (0, 0, 60, 20))
        image.save(concept.parent / "data" / f"img{i}.png")


def _setup(concept, base, out, *settings, steps=3, batch=2):
    flags = {"base_model": str(base), "resolution": 64, "max_steps": steps, "batch_size": batch}
    cfg, c = config.resolve(str(concept), flags, [*FAST, *settings])
    return recipe.setup(cfg, c, out)


def _class_folder(root: Path, n: int = 3) -> Path:
    folder = root / "dogs"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (10 + 60 * i, 120, 40)).save(folder / f"dog{i}.png")
    return folder


# ------------------------------------------------------------------------------- buckets
@pytest.mark.parametrize("cache", ["true", "false"])
def test_buckets_batch_one_bucket_at_a_time_and_keep_a_portraits_top(
    cache, tiny_pipeline_dir, tmp_path
):
    concept = make_concept(tmp_path / "c", n=4)
    _portraits(concept)
    run = _setup(concept, tiny_pipeline_dir, tmp_path / "run", "buckets=true", "bucket_step=16",
                 f"cache_latents={cache}", steps=6)  # fmt: skip
    images = run.inputs.images
    assert images.sizes == [(48, 80), (48, 80), (64, 64), (64, 64)]
    shapes = set()
    for step in range(6):
        inputs = run.inputs(run.batches.batch(step, 0))
        shapes.add(tuple(inputs.latents.shape[-2:]))
        assert inputs.latents.shape[0] == 2
    assert shapes == {(40, 24), (32, 32)}  # the tiny VAE halves: 80 x 48 and 64 x 64
    # the portrait trains whole: its latents are those of the resized image, red top included
    item = images.load(0, geometry=np.random.default_rng(0), flip=False)
    assert item["pixel_values"].shape == (3, 80, 48)
    assert (item["pixel_values"][0, :8] > 0.5).float().mean() > 0.9  # red rows on top
    recipe.train(run)
    recipe.save_outputs(run)
    load_run(load_pipe(tiny_pipeline_dir), tmp_path / "run")


def test_bucket_settings_are_checked(tiny_pipeline_dir, tmp_path):
    concept = make_concept(tmp_path / "c", n=2)
    flags = {"base_model": str(tiny_pipeline_dir), "resolution": 64}
    for bad, message in [
        (["buckets=true", "bucket_step=48"], "multiple of data.bucket_step"),
        (["buckets=true", "bucket_step=12"], "bucket_step\\) must be a multiple of 8"),
        (["buckets=true", "augmentation=resize-crop-pad", "cache_latents=false"], "pastes"),
    ]:
        with pytest.raises(UserError, match=message):
            config.resolve(str(concept), flags, bad)


# ------------------------------------------------------------------- prior preservation
def test_class_images_are_drawn_once_per_base_and_prompt(tiny_pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAI_CACHE_DIR", str(tmp_path / "cache"))
    concept = make_concept(tmp_path / "c", n=2)
    run = _setup(concept, tiny_pipeline_dir, tmp_path / "a", "num_class_images=3",
                 "class_prompt=a photo of a dog", "sample_steps=2")  # fmt: skip
    classes = run.inputs.class_images.examples
    folder = classes[0].image_path.parent
    assert folder.parent == tmp_path / "cache" / "class-images"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"class-0000{i}.png" for i in range(3)]
    assert {e.caption for e in classes} == {"a photo of a dog"}
    assert len(run.inputs.images) == 2  # the class images are not the concept's
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*.png")}
    again = _setup(concept, tiny_pipeline_dir, tmp_path / "b", "num_class_images=3",
                   "class_prompt=a photo of a dog", "sample_steps=2", "seed=5")  # fmt: skip
    assert again.inputs.class_images.examples == classes  # re-used, not redrawn
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*.png")} == stamps
    other = _setup(concept, tiny_pipeline_dir, tmp_path / "c2", "num_class_images=1",
                   "class_prompt=a photo of a cat", "sample_steps=2")  # fmt: skip
    assert other.inputs.class_images.examples[0].image_path.parent != folder
    # a class_data folder with too few images is filled up, seed by seed
    dogs = _class_folder(tmp_path, n=1)
    filled = _setup(concept, tiny_pipeline_dir, tmp_path / "d", f"class_data={dogs}",
                    "num_class_images=3", "sample_steps=2")  # fmt: skip
    assert len(filled.inputs.class_images) == 3 and (dogs / "class-00001.png").is_file()
    # in the Mix-of-Show layout the drawn images go beside the others, in image/
    cats = _class_folder(tmp_path / "mix", n=1)
    (cats / "image").mkdir()
    (cats / "dog0.png").rename(cats / "image" / "dog0.png")
    mixed = _setup(concept, tiny_pipeline_dir, tmp_path / "e", f"class_data={cats}",
                   "num_class_images=2", "sample_steps=2")  # fmt: skip
    assert len(mixed.inputs.class_images) == 2 and (cats / "image" / "class-00000.png").is_file()


def test_a_class_prompt_is_checked_before_the_model_loads(tiny_pipeline_dir, tmp_path):
    concept = make_concept(tmp_path / "c", n=2)
    dogs = _class_folder(tmp_path)
    random_word = concept.read_text().replace("class_word: dog", "class_word: <rand-0.01>")
    (tmp_path / "c" / "rand.yaml").write_text(random_word)
    flags = {"base_model": str(tmp_path / "no-model-needed"), "resolution": 64}
    for yaml_file, settings, message in [
        (tmp_path / "c" / "rand.yaml", [f"class_data={dogs}"], "names no class; set class_prompt"),
        (concept, [f"class_data={dogs}", "class_prompt=a {dog}"], "holds braces"),
    ]:
        with pytest.raises(UserError, match=message):  # by the settings' check, no model yet
            config.resolve(str(yaml_file), flags, settings)


def test_prior_adds_class_examples_with_their_own_draws_and_weighted_loss(
    tiny_pipeline_dir, tmp_path
):
    concept = make_concept(tmp_path / "c", n=3)
    dogs = _class_folder(tmp_path)
    plain = _setup(concept, tiny_pipeline_dir, tmp_path / "a")
    with_prior = _setup(concept, tiny_pipeline_dir, tmp_path / "b", f"class_data={dogs}",
                        "class_prompt=a photo of a dog")  # fmt: skip
    a = plain.inputs(plain.batches.batch(0, 0))
    b = with_prior.inputs(with_prior.batches.batch(0, 0))
    assert b.prior_from == 2 and b.captions[2:] == ["a photo of a dog"] * 2
    for key in ("latents", "noise", "timesteps"):  # the concept's draws are unchanged
        assert torch.equal(getattr(a, key), getattr(b, key)[:2]), key
    assert not torch.equal(b.noise[:2], b.noise[2:])  # the class draws are their own
    objective = with_prior.objective
    with torch.no_grad():
        concept_only = objective(with_prior.unet, with_prior.text, a).item()
        total = objective(with_prior.unet, with_prior.text, b).item()
        objective.prior_loss_weight = 3.0
        heavier = objective(with_prior.unet, with_prior.text, b).item()
        objective.prior_loss_weight = 1.0
    class_part = (heavier - total) / 2  # the class examples' mean MSE
    assert class_part > 0
    assert total == pytest.approx(concept_only + class_part, rel=1e-5)
    recipe.train(with_prior)


# ----------------------------------------------------------------------------- DoRA, LoCon
def test_a_dora_locon_run_trains_its_magnitudes_and_its_files_load(
    tiny_pipeline_dir, tmp_path, capsys
):
    concept = make_concept(tmp_path / "c", n=2)
    out = tmp_path / "run"
    run = _setup(concept, tiny_pipeline_dir, out, "use_dora=true", LOCON, "lr=0.2")
    magnitudes = {n: p.detach().clone() for n, p in run.trainable.items() if "magnitude" in n}
    assert any(".conv1." in n for n in magnitudes) and any(".to_q." in n for n in magnitudes)
    recipe.train(run)
    moved = [n for n, p in magnitudes.items() if not torch.equal(p, run.trainable[n])]
    assert len(moved) == len(magnitudes)
    capsys.readouterr()
    recipe.save_outputs(run)
    said = capsys.readouterr().out  # once, which tools read a DoRA file wrongly
    assert said.count("not read right by every tool") == 1 and "kohya sd-scripts" in said
    kohya = load_file(RunDir(out).kohya)
    assert any(k.endswith("_resnets_0_conv1.dora_scale") for k in kohya)
    pipe = load_pipe(tiny_pipeline_dir)
    load_run(pipe, out)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = run.pipe.unet(latents, 500, context).sample
        got = pipe.unet(latents, 500, context).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="Mix-of-Show's loader merges plain"):
        export_mix_of_show(out, tmp_path / "x.pth")
    capsys.readouterr()
    _setup(concept, tiny_pipeline_dir, tmp_path / "s", "optimizer=scaled-adamw", LOCON)
    assert (
        "those of the conv layers (LoCon), like DoRA's magnitudes, take" in capsys.readouterr().out
    )


# ------------------------------------------------------------------------------- resume
@pytest.mark.slow  # three training processes: ~10 s each way
@pytest.mark.parametrize("cache", ["true", "false"])
def test_a_run_with_every_kohya_setting_resumes_bitwise(cache, tiny_pipeline_dir, tmp_path):
    concept = make_concept(tmp_path / "c", n=5)
    _portraits(concept)
    dogs = _class_folder(tmp_path)
    common = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir), "--resolution",
              "64", "--batch-size", "2", "--checkpoint-every", "2"]  # fmt: skip
    for setting in ("validation_seeds=[]", "buckets=true", "bucket_step=16",
                    f"cache_latents={cache}", f"class_data={dogs}", "use_dora=true", LOCON,
                    "validation_split=0.2", "validation_loss_every=1", "ema_decay=0.9"):  # fmt: skip
        common += ["--set", setting]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = run_train(*common, "--max-steps", "4", "--output-dir", str(whole))
    assert done.returncode == 0, done.stderr[-2000:]
    assert run_train(*common, "--max-steps", "2", "--output-dir", str(cut)).returncode == 0
    resumed = run_train(*common, "--max-steps", "4", "--output-dir", str(cut), "--resume", str(cut))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("lora.safetensors", "lora_kohya.safetensors", "ema/lora.safetensors"):
        want, got = load_file(whole / name), load_file(cut / name)
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want), name
    val = [[r["val_loss"] for r in RunDir(d).read_metrics()] for d in (whole, cut)]
    assert val[0] == val[1] and len(val[0]) == 4


def test_attention_maps_of_any_bucket_are_placed_on_their_true_grid():
    """The attention penalty finds each UNet level's grid from its cell count; for a bucket of
    SD 1.5 at bucket_step 8 (a 127 x 34 latent) the rounding of a square-root ratio is off by
    one where stride-2 convs are not."""
    from sai_diffusion.training.attention import _level_size

    weight = torch.zeros(1, 1, 3, 3)
    for latent in [(127, 34), (62, 17), (40, 24), (64, 64), (8, 128)]:
        x = torch.zeros(1, 1, *latent)
        for _ in range(3):  # SD 1.5's three downsamplings
            x = torch.nn.functional.conv2d(x, weight, stride=2, padding=1)
            h, w = x.shape[-2:]
            assert _level_size(latent, h * w) == (h, w), latent
