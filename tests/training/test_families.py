"""SDXL-class and SD 2.x runs through the real recipe, on tiny pipelines built from configs.

SDXL: the UNet is conditioned exactly as diffusers' own ``StableDiffusionXLPipeline``
conditions it (both encoders' penultimate states, the pooled embedding, the size ids of each
example's crop); a run trains LoRA and words on both text encoders, writes kohya's te1/te2 files
and SDXL's clip_l/clip_g embedding, resumes bitwise and samples; settings defined on SD 1.x only
are refused. SD 2.x: a v-prediction model trains on the velocity, never on the noise.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file

from sai_diffusion import cli
from sai_diffusion.files.concept_data import discover_examples
from sai_diffusion.models.family import STABLE_DIFFUSION_XL, family_of
from sai_diffusion.training import recipe
from sai_diffusion.training.augment import ConceptImages
from sai_diffusion.training.streams import geometry_rng
from tests.helpers import make_concept, run_train, setup_run, train_tiny

XL_SETTINGS = ("--set", "text_encoder_lora=true", "--set", "train_embeddings=true",
               "--set", "sample_steps=2", "--set", "validation_seeds=[1]")  # fmt: skip


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    return make_concept(tmp_path_factory.mktemp("concept"))


@pytest.fixture(scope="module")
def xl_run(concept, tiny_sdxl_dir, tmp_path_factory):
    """A finished 2-step SDXL run: LoRA on the UNet and both text encoders, trained words."""
    out = tmp_path_factory.mktemp("xl") / "run"
    return train_tiny(concept, tiny_sdxl_dir, out, "sgd-sai", *XL_SETTINGS, steps=2)


def _examples(concept):
    return discover_examples(concept.parent / "data", token="<Vthing>")


@torch.no_grad()
def test_the_sdxl_unet_gets_the_conditioning_diffusers_pipeline_gives_it(concept, tiny_sdxl_dir):
    """For a training image (80 x 72, randomly cropped and flipped to 64 x 64) and its caption,
    the hidden states, pooled embedding and time ids our recipe passes equal what
    ``StableDiffusionXLPipeline`` passes for that prompt, original size, crop and target."""
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    family = family_of(pipe)
    assert family is STABLE_DIFFUSION_XL
    examples = _examples(concept)
    item = ConceptImages(examples, resolution=64).load(1, geometry=geometry_rng(5, 0, 1), flip=True)
    height, width, top, left, th, tw = (int(v) for v in item["time_ids"])
    assert (height, width, th, tw) == (72, 80, 64, 64)

    seen = {}

    def grab(module, args, kwargs):
        seen["hidden"] = kwargs["encoder_hidden_states"]
        seen.update(kwargs["added_cond_kwargs"])

    pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    pipe(examples[1].caption, num_inference_steps=1, guidance_scale=1.0, height=64, width=64,
         original_size=(height, width), crops_coords_top_left=(top, left), target_size=(64, 64),
         output_type="latent")  # fmt: skip

    context = family.encode(family.text_encoders(pipe), [examples[1].caption], device="cpu")
    assert context.hidden.shape == (1, 77, 32 + 48)  # both encoders' widths side by side
    assert torch.equal(context.hidden, seen["hidden"])
    assert torch.equal(context.pooled, seen["text_embeds"])
    assert torch.equal(item["time_ids"][None], seen["time_ids"])


def test_a_flip_mirrors_the_crop_in_the_size_conditioning(concept):
    """The 80 x 72 image covers 64 x 64 at 71 x 64: a crop at left x of the unflipped image
    is at 71 - 64 - x of the mirrored one; the original and target sizes do not change."""
    images = ConceptImages(_examples(concept), resolution=64)
    for seed in range(4):
        item = images.load(0, geometry=geometry_rng(seed, 0, 0), flip=False)
        plain = item["time_ids"]
        mirrored = images.load(0, geometry=geometry_rng(seed, 0, 0), flip=True)["time_ids"]
        assert torch.equal(item["time_ids_mirrored"], mirrored)  # what the latent cache keeps
        assert plain[3] + mirrored[3] == 71 - 64
        assert torch.equal(plain[[0, 1, 2, 4, 5]], mirrored[[0, 1, 2, 4, 5]])


def test_an_sdxl_run_trains_both_text_encoders_and_writes_sdxl_files(xl_run):
    losses = [
        json.loads(line)["loss"] for line in (xl_run / "metrics.jsonl").read_text().splitlines()
    ]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    with safe_open(str(xl_run / "lora_kohya.safetensors"), "pt") as f:
        keys, header = list(f.keys()), f.metadata()
    prefixes = {k.split("_text_model")[0] if "_text_model" in k else k[:10] for k in keys}
    assert prefixes == {"lora_te1", "lora_te2", "lora_unet_"}
    assert header["ss_base_model_version"] == "sdxl_base_v1-0"
    words = load_file(str(xl_run / "embeddings.safetensors"))
    assert {k: tuple(v.shape) for k, v in words.items()} == {"clip_l": (1, 32), "clip_g": (1, 48)}
    gsnr = {row["name"].split(".")[0] for row in json.loads((xl_run / "gsnr.json").read_text())}
    assert {"unet", "text_encoder", "text_encoder_2"} <= gsnr
    assert len(list((xl_run / "samples" / "final").glob("*.png"))) == 2


def test_an_sdxl_run_resumes_bitwise(concept, tiny_sdxl_dir, tmp_path):
    """Stopped at step 2 and resumed to step 4, an SDXL run equals the run that went straight
    through (random crops and flips, so the size ids vary from step to step)."""
    more = ("--set", "cache_latents=false", "--set", "validation_seeds=[]",
            "--checkpoint-every", "2")  # fmt: skip
    whole = train_tiny(concept, tiny_sdxl_dir, tmp_path / "whole", "sgd-sai", *XL_SETTINGS,
                       *more, steps=4)  # fmt: skip
    cut = train_tiny(concept, tiny_sdxl_dir, tmp_path / "cut", "sgd-sai", *XL_SETTINGS, *more,
                     steps=2)  # fmt: skip
    for name in ("lora.safetensors", "lora_kohya.safetensors", "embeddings.safetensors"):
        (cut / name).unlink()
    assert cli.train_main(["--resume", str(cut), "--max-steps", "4"]) == 0
    for name in ("lora.safetensors", "embeddings.safetensors"):
        a, b = load_file(str(whole / name)), load_file(str(cut / name))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_settings_defined_on_sd1_are_refused_for_sdxl_with_one_line(concept, tiny_sdxl_dir,
                                                                     tmp_path):  # fmt: skip
    proc = run_train("--concept", str(concept), "--base-model", str(tiny_sdxl_dir),
                     "--max-steps", "1", "--resolution", "64", "--output-dir",
                     str(tmp_path / "run"), "--set", "edlora=true", "--set",
                     "augmentation=resize-crop-pad", "--set", "cache_latents=false")  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "embeddings.edlora" in errors[0] and "data.augmentation" in errors[0]
    assert not (tmp_path / "run").exists()


def test_sai_sample_draws_an_sdxl_run(xl_run, tmp_path):
    out = tmp_path / "samples"
    args = ["--run", str(xl_run), "--prompt", "a pencil sketch of {token}", "--steps", "2",
            "--resolution", "64", "--out", str(out)]  # fmt: skip
    assert cli.sample_main(args) == 0
    assert len(list(out.glob("*.png"))) == 1


def test_the_mix_of_show_export_refuses_an_sdxl_run(xl_run, tmp_path, capsys):
    code = cli._run(cli.export_main, [str(xl_run), "--format", "mix-of-show", "--out",
                                      str(tmp_path / "x.pth")])  # fmt: skip
    assert code == 2
    assert "sdxl_base_v1-0" in capsys.readouterr().err
    assert not (tmp_path / "x.pth").exists()


@torch.no_grad()
def test_a_v_prediction_model_trains_on_the_velocity(concept, tiny_sd2_dir, tmp_path):
    """The objective of an SD 2.x v-model is the MSE to v = sqrt(a) * noise - sqrt(1 - a) * x0,
    re-derived here in float64 from the scheduler's alphas, and not the MSE to the noise."""
    run = setup_run(concept, tiny_sd2_dir, tmp_path / "run", steps=1, batch=2)
    assert run.objective.scheduler.config.prediction_type == "v_prediction"
    inputs = run.inputs(run.batches.batch(0, 0))
    loss = run.objective(run.unet, run.text, inputs).item()

    a = run.objective.scheduler.alphas_cumprod.double()[inputs.timesteps].view(-1, 1, 1, 1)
    x0, noise = inputs.latents.double(), inputs.noise.double()
    noisy = (a.sqrt() * x0 + (1 - a).sqrt() * noise).float()
    context = run.text(inputs.captions)
    pred = run.unet(noisy, inputs.timesteps, context).sample.double()
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert loss == pytest.approx(((pred - velocity) ** 2).mean().item(), rel=1e-5)
    assert loss != pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-2)


def test_the_base_model_is_described_before_it_loads(tiny_pipeline_dir, tiny_sd2_dir,
                                                     tiny_sdxl_dir, tmp_path):  # fmt: skip
    """Family and native size from configs and headers alone: a folder's own configs; a single
    file's family from its names, its size from the shipped config folder of that family
    (1024 px for SDXL, 768 for SD 2.x-v) unless base_config names another."""
    from diffusers import StableDiffusionPipeline

    from sai_diffusion.config import TrainConfig
    from sai_diffusion.files.ldm import save_single_file
    from sai_diffusion.models.base import describe_base

    def describe(model, config=None):
        cfg = TrainConfig()
        cfg.base.model, cfg.base.config = str(model), config and str(config)
        info = describe_base(cfg)
        return info.family, info.native_resolution

    assert describe(tiny_pipeline_dir) == ("sd1", 64)
    assert describe(tiny_sd2_dir) == ("sd2", 64)
    assert describe(tiny_sdxl_dir) == ("sdxl", 64)
    xl = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    sd2 = StableDiffusionPipeline.from_pretrained(tiny_sd2_dir, local_files_only=True)
    xl_file = save_single_file(xl, tmp_path / "xl.safetensors")
    sd2_file = save_single_file(sd2, tmp_path / "sd2.safetensors")
    assert describe(xl_file) == ("sdxl", 1024)
    assert describe(sd2_file) == ("sd2", 768)
    assert describe(xl_file, tiny_sdxl_dir) == ("sdxl", 64)


def test_without_a_resolution_a_run_trains_at_the_models_own(concept, tiny_sdxl_dir, tmp_path):
    args = ["--concept", str(concept), "--base-model", str(tiny_sdxl_dir), "--max-steps", "1",
            "--output-dir", str(tmp_path / "run"), "--set", "validation_seeds=[]"]  # fmt: skip
    assert cli.train_main(args) == 0
    cfg, _, _ = recipe.RunDir(tmp_path / "run").read_config()
    assert cfg.resolution == 64  # the tiny SDXL's UNet sample size 32 x the VAE's factor 2


def test_sai_compare_draws_sdxl_runs_and_refuses_runs_of_two_families(
    concept, xl_run, tiny_sdxl_dir, tiny_pipeline_dir, tmp_path, capsys
):
    other = train_tiny(concept, tiny_sdxl_dir, tmp_path / "adamw", "adamw", "--set",
                       "validation_seeds=[]", steps=1)  # fmt: skip
    grid = tmp_path / "grid.png"
    args = [str(xl_run), str(other), "--prompt", "a pencil sketch of {token}", "--seeds", "1",
            "--steps", "2", "--resolution", "64", "--with-base", "--out", str(grid)]  # fmt: skip
    assert cli._run(cli.compare_main, args) == 0
    assert grid.is_file() and grid.with_suffix(".html").is_file()

    sd = train_tiny(concept, tiny_pipeline_dir, tmp_path / "sd", "sgd-sai", "--set",
                    "validation_seeds=[]", steps=1)  # fmt: skip
    capsys.readouterr()
    code = cli._run(cli.compare_main, [str(xl_run), str(sd), "--prompt", "a {token}",
                                       "--out", str(tmp_path / "mixed.png")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "different base models" in err
    assert not (tmp_path / "mixed.png").exists()


def test_sai_eval_scores_an_sdxl_run(xl_run, scorer_dirs, tmp_path):
    clip, dino = scorer_dirs
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {token}\na pencil sketch of {token}\n")
    args = [str(xl_run), "--clip-model", str(clip), "--dino-model", str(dino), "--prompts",
            str(prompts), "--seeds", "1", "--steps", "2", "--no-base"]  # fmt: skip
    assert cli._run(cli.eval_main, args) == 0
    report = json.loads((xl_run / "eval.json").read_text())
    assert report["images"] == 2 and report["settings"]["resolution"] == 64


@pytest.mark.parametrize(("settings", "parts"), [
    (("text_encoder_lora=true",), {"unet", "text_encoder", "text_encoder_2"}),
    (("text_encoder_lora=true", "lora.text_encoder_2=false"), {"unet", "text_encoder"}),
    (("lora.text_encoder_2=true",), {"unet", "text_encoder_2"}),
])  # fmt: skip
def test_text_encoder_lora_goes_on_either_or_both_sdxl_encoders(concept, tiny_sdxl_dir,
                                                                 tmp_path, settings, parts):  # fmt: skip
    run = setup_run(concept, tiny_sdxl_dir, tmp_path / "run", *settings, steps=1, batch=1)
    assert {name.split(".")[0] for name in run.trainable} == parts
    trained = {type(m).__name__ for m in run.trained_modules()}
    assert len(run.trained_modules()) == len(parts)
    assert "UNet2DConditionModel" in trained


def test_the_second_encoders_setting_is_refused_on_a_model_with_one(concept, tiny_pipeline_dir,
                                                                    tmp_path):  # fmt: skip
    from sai_diffusion.errors import UserError

    with pytest.raises(UserError, match="lora.text_encoder_2"):
        setup_run(concept, tiny_pipeline_dir, tmp_path / "run", "lora.text_encoder_2=true")


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_a_single_file_of_each_family_trains_and_samples(concept, tiny_sd2_dir, tiny_sdxl_dir,
                                                         tmp_path, family):  # fmt: skip
    """The file as users have it (one original-layout .safetensors), with its architecture's
    config folder (the tiny one here; the shipped configs/sd2 and configs/sdxl by default)."""
    from diffusers import StableDiffusionPipeline

    from sai_diffusion.files.ldm import save_single_file

    folder = tiny_sdxl_dir if family == "sdxl" else tiny_sd2_dir
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    single = save_single_file(cls.from_pretrained(folder, local_files_only=True),
                              tmp_path / f"{family}.safetensors")  # fmt: skip
    run = train_tiny(concept, single, tmp_path / "run", "sgd-sai", "--base-config", str(folder),
                     "--set", "validation_seeds=[]", steps=1)  # fmt: skip
    args = ["--run", str(run), "--prompt", "a photo of {token}", "--steps", "2", "--out",
            str(tmp_path / "samples")]  # fmt: skip
    assert cli.sample_main(args) == 0
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1
    with safe_open(str(run / "lora_kohya.safetensors"), "pt") as f:
        version = f.metadata()["ss_base_model_version"]
    assert version == {"sd2": "sd_v2_v", "sdxl": "sdxl_base_v1-0"}[family]
