"""sai-train-lora end to end on a tiny SD-1.5-architecture pipeline (CPU).

Real processes for the CLI, real files, real diffusers/peft modules; the model is tiny so that
a run is a few seconds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from sai_diffusion import cli, config
from sai_diffusion.errors import TrainingDiverged
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.training import recipe
from sai_diffusion.training.resume import resume_dir
from tests.helpers import TRAIN_COMMAND, make_concept, run_train

FAST = [
    "--resolution",
    "64",
    "--set",
    "sample_steps=2",
    "--set",
    "validation_seeds=[1]",
    "--set",
    "log_every=1",
]


@pytest.fixture()
def concept(tmp_path: Path) -> Path:
    return make_concept(tmp_path / "concept")


@pytest.mark.slow  # a real training process and sai-sample: ~10 s
def test_cli_trains_and_writes_the_run_folder(concept, tiny_pipeline_dir, tmp_path):
    """A real `sai-train-lora` process writes every file of the run-directory contract."""
    out = tmp_path / "run"
    proc = run_train(
        "--concept",
        str(concept),
        "--base-model",
        str(tiny_pipeline_dir),
        "--max-steps",
        "3",
        "--checkpoint-every",
        "2",
        "--output-dir",
        str(out),
        *FAST,
    )
    assert proc.returncode == 0, proc.stderr
    for name in (
        "lora.safetensors",
        "lora_kohya.safetensors",
        "embeddings.safetensors",
        "run.yaml",
        "metrics.jsonl",
        "gsnr.json",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    assert (out / "samples" / "final" / "p01-s1.png").is_file()
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["loss"] > 0 and m["step_time"] > 0 and "unet" in m["lr"] for m in metrics)
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["config"]["optimizer"]["name"] == "sgd-sai" and run["lr"] == 0.05
    with safe_open(str(out / "lora_kohya.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["ss_optimizer"] == "sgd-sai" and meta["ss_network_alpha"] in ("1", "1.0")
    assert (
        "it/s" in proc.stderr or "step/s" in proc.stderr or "s/step" in proc.stderr
    )  # progress bar
    rows = json.loads((out / "gsnr.json").read_text())
    assert rows and all(0 < r["scale"] <= 1 for r in rows if r["initialised"])

    # sai-sample generates with the trained run: same seed, same image; other seed, another
    args = ["--run", str(out), "--prompt", "a pencil sketch of {token}", "--steps", "2"]
    assert cli.sample_main([*args, "--seed", "1", "--seed", "2", "--out", str(tmp_path / "s")]) == 0
    assert cli.sample_main([*args, "--seed", "1", "--out", str(tmp_path / "t")]) == 0
    s1, s2, t1 = (
        Image.open(tmp_path / d / f"p00-s{k}.png") for d, k in (("s", 1), ("s", 2), ("t", 1))
    )
    assert s1.size == (64, 64) and s1.tobytes() == t1.tobytes() and s1.tobytes() != s2.tobytes()


@pytest.mark.parametrize("optimizer", ["sgd-sai", "scaled-adamw"])
def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(
    optimizer, concept, tiny_pipeline_dir, tmp_path
):
    """A NaN loss raises TrainingDiverged naming the step and checkpoint; no checkpoint or
    LoRA file is written from the poisoned weights. scaled-AdamW's preconditioner fails on the
    NaN gradient inside the step, before the loss is read: the same TrainingDiverged."""
    cfg, c = config.resolve(
        str(concept),
        {
            "base_model": str(tiny_pipeline_dir),
            "max_steps": 4,
            "resolution": 64,
            "checkpoint_every": 1,
            "optimizer": optimizer,
        },
        ["validation_seeds=[]"],
    )
    run_dir = tmp_path / "run"
    run = recipe.setup(cfg, c, run_dir)
    run_dir.mkdir()
    cfg.max_steps = 2
    recipe.train(run)
    cfg.max_steps = 4
    next(p for n, p in run.trainable.items() if "lora_B" in n).data.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="step 3.*step-000002"):
        recipe.train(run)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "step-000001",
        "step-000002",
    ]
    assert not (run_dir / "lora.safetensors").exists()


EXTRAS = {
    "scaled-adamw": ["--set", "mixed_precision=bf16", "--set", "vae_fp32=true"],
    "adamw": [
        "--set",
        "gradient_checkpointing=true",
        "--set",
        "min_snr_gamma=5",
        "--set",
        "noise_offset=0.05",
        "--set",
        "lr_scheduler=cosine",
        "--set",
        "warmup_steps=1",
    ],
    "sgd": ["--batch-size", "2", "--set", "grad_accum=2", "--set", "use_masks=false"],
    "scaled-sgd": ["--set", "lora_targets=to_q,to_v", "--rank", "2"],
}


# the optimizer state each one keeps per trained tensor (torch's AdamW and SGD, peft's scaled
# pair built on them)
STATE = {"scaled-adamw": {"exp_avg", "exp_avg_sq", "step"}, "adamw": {"exp_avg", "exp_avg_sq", "step"},
         "scaled-sgd": {"momentum_buffer"}, "sgd": {"momentum_buffer"}}  # fmt: skip


@pytest.mark.parametrize("optimizer", ["scaled-adamw", "scaled-sgd", "adamw", "sgd"])
def test_each_optimizer_trains(optimizer, concept, tiny_pipeline_dir, tmp_path):
    """Every optimizer name runs through the same recipe, each with some of the recipe's
    options on (bf16 autocast, gradient checkpointing, min-SNR, noise offset, cosine warmup,
    batches with gradient accumulation): its checkpoint holds that optimizer's state for every
    trained tensor at the configured group lrs, and the Adam family's first step moved each
    up factor (zero at the start, its gradient non-zero) by exactly lr, as Adam's first update
    is lr * g / |g| (bias-corrected, eps 1e-8 beside |g|)."""
    out = tmp_path / optimizer
    steps = 1 if optimizer == "scaled-adamw" else 2  # adamw warms up: its first lr is 0
    args = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir), "--optimizer",
            optimizer, "--max-steps", str(steps), "--output-dir", str(out), "--set",
            "validation_seeds=[]", "--lr", "0.001", *FAST[:2], *EXTRAS[optimizer]]  # fmt: skip
    assert cli.train_main(args) == 0
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["config"]["optimizer"]["name"] == optimizer
    ckpt = RunDir(out).latest_checkpoint()[1]
    state = torch.load(ckpt.optimizer, weights_only=True)
    trained = load_file(str(ckpt.trainable))
    assert len(state["state"]) == len(trained)
    assert all(set(s) == STATE[optimizer] for s in state["state"].values())
    assert {g["name"]: g["initial_lr"] for g in state["param_groups"]} == {"unet": 0.001}
    ups = {n: p for n, p in trained.items() if ".lora_B." in n}
    assert ups and any(p.abs().sum() > 0 for p in ups.values())
    if optimizer == "scaled-adamw":
        moved = torch.cat([p.flatten() for p in ups.values()]).abs()
        moved = moved[moved > 0]
        assert moved.max() <= 0.001 * (1 + 1e-5)
        assert moved.median() == pytest.approx(0.001, rel=1e-3)


def _kill_after_checkpoint(args: list[str], checkpoint: Path) -> None:
    proc = subprocess.Popen(
        [*TRAIN_COMMAND, *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not checkpoint.exists():
        assert proc.poll() is None, "the run ended before its checkpoint appeared"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.slow  # two real training processes, one killed: ~10 s
def test_resume_after_sigkill_is_bitwise_identical(concept, tiny_pipeline_dir, tmp_path):
    """Killed with SIGKILL after a checkpoint and resumed, a run ends bitwise equal to the
    same run uninterrupted (CPU), including augmentation, noise, momentum and g-SNR state."""
    common = [
        "--concept",
        str(concept),
        "--base-model",
        str(tiny_pipeline_dir),
        "--max-steps",
        "6",
        "--checkpoint-every",
        "2",
        "--resolution",
        "64",
        "--set",
        "validation_seeds=[]",
        "--set",
        "cache_latents=false",
        "--set",
        "text_encoder_lora=true",
        "--set",
        "train_embeddings=true",
        "--set",
        "lr_scheduler=linear",
    ]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    # both runs in fresh processes: bitwise equality holds for the same torch thread count
    assert run_train(*common, "--output-dir", str(whole)).returncode == 0
    _kill_after_checkpoint([*common, "--output-dir", str(cut)], cut / "checkpoints" / "step-000002")
    assert not (cut / "lora.safetensors").exists()
    assert resume_dir("latest", str(tmp_path)) == cut  # the newest run with checkpoints
    proc = run_train("--resume", str(cut))
    assert proc.returncode == 0, proc.stderr
    a, b = load_file(str(whole / "lora.safetensors")), load_file(str(cut / "lora.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ea, eb = (
        load_file(str(whole / "embeddings.safetensors")),
        load_file(str(cut / "embeddings.safetensors")),
    )
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_trained_run_loads_into_stock_diffusers(concept, tiny_pipeline_dir, tmp_path):
    """Stock diffusers (load_textual_inversion + load_lora_weights) reproduces the trained
    model's text embedding and UNet output."""
    cfg, c = config.resolve(
        str(concept),
        {"base_model": str(tiny_pipeline_dir), "max_steps": 2, "resolution": 64},
        ["validation_seeds=[]", "text_encoder_lora=true"],
    )
    run = recipe.setup(cfg, c, tmp_path / "run")
    (tmp_path / "run").mkdir()
    recipe.train(run)
    recipe.save_outputs(run)

    tok = run.pipe.tokenizer
    ids = tok(
        ["a pencil sketch of <Vthing>"],
        padding="max_length",
        max_length=tok.model_max_length,
        return_tensors="pt",
    ).input_ids
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ctx = run.text_encoder(ids)[0]
        want = run.unet(latents, torch.tensor([500]), ctx).sample

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir)
    pipe.load_textual_inversion(str(tmp_path / "run" / "embeddings.safetensors"), token="<Vthing>")
    pipe.load_lora_weights(str(tmp_path / "run"), weight_name="lora.safetensors")
    ids2 = pipe.tokenizer(
        ["a pencil sketch of <Vthing>"],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
    assert torch.equal(ids, ids2)
    with torch.no_grad():
        ctx2 = pipe.text_encoder(ids2)[0]
        got = pipe.unet(latents, torch.tensor([500]), ctx2).sample
    torch.testing.assert_close(ctx2, ctx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_single_file_checkpoint_and_mix_of_show_layout(
    tiny_pipeline_dir, tiny_single_file, tmp_path
):
    """A single-file .safetensors base (through --base-config) and Mix-of-Show data train."""
    concept = make_concept(tmp_path / "c", layout="mix")
    out = tmp_path / "run"
    rc = cli.train_main(
        [
            "--concept",
            str(concept),
            "--base-model",
            str(tiny_single_file),
            "--base-config",
            str(tiny_pipeline_dir),
            "--max-steps",
            "1",
            "--output-dir",
            str(out),
            "--set",
            "validation_seeds=[]",
            *FAST[:2],
        ]
    )
    assert rc == 0 and (out / "lora.safetensors").is_file()


# ------------------------------------------------------------------------------ bad input
def _bad(args: list[str], capsys) -> str:
    rc = cli._run(cli.train_main, args)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("error: ") and err.count("\n") == 1
    return err


def test_bad_inputs_exit_2_with_one_clear_message(concept, tiny_pipeline_dir, tmp_path, capsys):
    base = ["--base-model", str(tiny_pipeline_dir), "--output-dir", str(tmp_path / "out")]
    err = _bad(["--concept", str(concept), *base, "--set", "max_step=10"], capsys)
    assert "max_step" in err and "did you mean 'max_steps'" in err
    err = _bad(["--concept", str(concept), *base, "--set", "learning_rate=0.1"], capsys)
    assert "did you mean 'lr'" in err
    err = _bad(["--concept", str(concept), *base, "--lr", "0"], capsys)
    assert "lr" in err and "(0, 10]" in err
    err = _bad(["--concept", str(concept), *base, "--resolution", "100001"], capsys)
    assert "resolution" in err
    err = _bad(["--concept", str(concept), *base, "--set", "sai_eps=-1"], capsys)
    assert "sai_eps" in err and "[0, 1]" in err
    err = _bad(["--concept", str(tmp_path / "missing.yaml"), *base], capsys)
    assert "missing.yaml" in err
    err = _bad(["--concept", "pottr", *base], capsys)
    assert "potter" in err
    err = _bad(
        [
            "--concept",
            str(concept),
            "--base-model",
            str(tmp_path / "nope"),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert "nope" in err
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"not really a pickle")
    err = _bad(
        [
            "--concept",
            str(concept),
            "--base-model",
            str(ckpt),
            "--output-dir",
            str(tmp_path / "out"),
        ],
        capsys,
    )
    assert "allow_pickle" in err
    # a corrupt image is named
    (concept.parent / "data" / "img1.png").write_bytes(b"\x89PNG broken")
    err = _bad(["--concept", str(concept), *base], capsys)
    assert "img1.png" in err
    # nothing half-written: no run folder was left behind by any of these
    assert not (tmp_path / "out").exists()


def test_empty_data_folder_and_orphan_caption(tmp_path, tiny_pipeline_dir, capsys):
    concept = make_concept(tmp_path / "c", n=1)
    (concept.parent / "data" / "stray.txt").write_text("a caption without an image")
    err = _bad(["--concept", str(concept), "--base-model", str(tiny_pipeline_dir)], capsys)
    assert "stray.txt" in err
    for f in (concept.parent / "data").iterdir():
        f.unlink()
    err = _bad(["--concept", str(concept), "--base-model", str(tiny_pipeline_dir)], capsys)
    assert "data" in err


def test_sgd_sai_gets_the_configured_g_snr_eps_and_old_runs_keep_theirs(
    concept, tiny_pipeline_dir, tmp_path
):
    """sai_eps (default 0) reaches SGD-SaI's param groups; a run.yaml written before the
    setting existed resumes with the paper's 1e-8."""
    flags = {"base_model": str(tiny_pipeline_dir), "resolution": 64}
    cfg, c = config.resolve(str(concept), flags, [])
    assert cfg.optimizer.sai_eps == 0.0
    run = recipe.setup(cfg, c, tmp_path / "run")
    assert {g["eps"] for g in run.optimizer.optimizer.param_groups} == {0.0}

    # a run.yaml of a version before sections and before sai_eps: flat, without the key
    data = {"config": {f: cfg.get(p) for f, p in config.FLAT.items() if p != "optimizer.sai_eps"},
            "concept": yaml.safe_load(yaml.safe_dump(RunDir(tmp_path).path and {}))}  # fmt: skip
    RunDir(tmp_path).write_config(cfg, c, {})
    data["concept"] = yaml.safe_load((tmp_path / "run.yaml").read_text())["concept"]
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    old = RunDir(tmp_path).read_config()[0]
    assert old.optimizer.sai_eps == 1e-8
    old.optimizer.sai_eps = 0.0
    assert old == cfg  # every other setting read back from its flat name


def test_a_two_word_concept_trains_samples_and_loads(tiny_pipeline_dir, tmp_path):
    """token "<Vthing1>+<Vthing2>" from "<rand-0.013>+dog": the captions' <TOK> and the
    prompts' {token} become both words; embeddings.safetensors holds one vector per word, and
    a stock pipeline that loads the run reads each word as its trained vector."""
    from sai_diffusion.models.inference import load_run

    concept = make_concept(tmp_path / "concept")
    data = yaml.safe_load(concept.read_text())
    data.update(token="<Vthing1>+<Vthing2>", class_word="<rand-0.013>+dog")
    concept.write_text(yaml.safe_dump(data))
    cfg, c = config.resolve(str(concept), {"resolution": 64}, [])
    images, _ = recipe.concept_data(cfg, c)
    assert images.examples[0].caption == "a photo of <Vthing1> <Vthing2> number 0"
    assert c.prompts()[1] == "a pencil sketch of <Vthing1> <Vthing2>"
    run = tmp_path / "run"
    args = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir), "--max-steps",
            "2", "--resolution", "64", "--output-dir", str(run), "--set",
            "validation_seeds=[]", "--set", "train_embeddings=true"]  # fmt: skip
    assert cli.train_main(args) == 0
    vectors = load_file(str(run / "embeddings.safetensors"))
    assert list(vectors) == ["<Vthing1>", "<Vthing2>"]
    assert not torch.equal(vectors["<Vthing1>"], vectors["<Vthing2>"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    load_run(pipe, run)
    rows = pipe.text_encoder.get_input_embeddings().weight
    for word in c.words:
        (token_id,) = pipe.tokenizer(word, add_special_tokens=False).input_ids
        torch.testing.assert_close(rows[token_id].detach(), vectors[word][0])

    out = tmp_path / "s"
    args = ["--run", str(run), "--prompt", "a pencil sketch of {token}", "--steps", "2",
            "--seed", "1", "--out", str(out)]  # fmt: skip
    assert cli.sample_main(args) == 0
    assert (out / "p00-s1.png").is_file()

    from sai_diffusion.compare import Comparer, load_run_info

    info = load_run_info(run)
    assert (info.token, info.class_word) == ("<Vthing1> <Vthing2>", "dog")
    comparer = Comparer([info], device="cpu")
    assert comparer.base_prompt("a pencil sketch of {token}") == "a pencil sketch of dog"
    shown = comparer.compare("a pencil sketch of {token}", [1], steps=2, with_base=True)
    assert len(shown.rows) == 2


def test_a_setting_a_yaml_sets_that_cannot_act_is_warned_once_and_the_run_trains(
    concept, tiny_pipeline_dir, tmp_path, capsys
):
    """A shared preset may set what one optimizer ignores (potter.yaml's scaled_reg under
    SGD-SaI): the run says so in one line naming both settings, and trains."""
    data = yaml.safe_load(concept.read_text())
    concept.write_text(yaml.safe_dump({**data, "train": {"scaled_reg": 0.0, "keep_tokens": 2}}))
    out = tmp_path / "run"
    args = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir), "--max-steps",
            "1", "--output-dir", str(out), "--set", "validation_seeds=[]", *FAST[:2]]  # fmt: skip
    assert cli.train_main(args) == 0
    printed = capsys.readouterr().out
    warnings = [line for line in printed.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2
    assert "optimizer.scaled_reg (scaled_reg) = 0.0 acts only with optimizer.name" in warnings[0]
    assert "'sgd-sai'; it is ignored" in warnings[0]
    assert "captions.keep_tokens" in warnings[1] and "captions.shuffle" in warnings[1]
    assert RunDir(out).is_finished
