"""Reliability of a training run: resuming as people do it, the lr plan across a resume, what
the latent cache drops, memory figures per run, train mode, and faults while writing.

Real tiny diffusers/peft models, real files, real processes where a process must die.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from sai_diffusion import cli, config
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.training import recipe
from sai_diffusion.training.schedule import LRSchedule
from tests.helpers import make_concept, run_train

FAST = ["--resolution", "64", "--set", "validation_seeds=[]"]


@pytest.fixture()
def concept(tmp_path: Path) -> Path:
    return make_concept(tmp_path / "concept")


def _args(concept: Path, base: Path, out: Path, *extra: str) -> list[str]:
    return ["--concept", str(concept), "--base-model", str(base), "--output-dir", str(out),
            *FAST, *extra]  # fmt: skip


def _exit_code(argv: list[str], capsys) -> tuple[int, str]:
    code = cli._run(cli.train_main, argv)
    return code, capsys.readouterr().err.strip()


# --------------------------------------------------------------------------------- resume
def test_resume_appended_to_the_original_command_is_accepted(concept, tiny_pipeline_dir, tmp_path,
                                                             capsys):  # fmt: skip
    """Guards "only --max-steps may be given": re-running the command that started the run
    with --resume appended continues it; a setting that differs from run.yaml is refused with
    exit 2, naming each setting with both values; nothing of the run changes."""
    out = tmp_path / "run"
    first = _args(concept, tiny_pipeline_dir, out, "--max-steps", "2", "--rank", "4",
                  "--set", "lr_scheduler=constant", "--set", "mixed_precision=no")  # fmt: skip
    assert cli.train_main(first) == 0
    capsys.readouterr()
    code, err = _exit_code([*first, "--rank", "8", "--set", "lr_scheduler=linear",
                            "--resume", str(out)], capsys)  # fmt: skip
    assert code == 2 and len(err.splitlines()) == 1
    assert "lora.rank (rank): 4 in run.yaml, 8 given" in err
    assert "optimizer.schedule (lr_scheduler): 'constant' in run.yaml, 'linear' given" in err
    assert RunDir(out).latest_checkpoint()[0] == 2

    code, err = _exit_code([*first, "--resume", str(out), "--max-steps", "3"], capsys)
    assert code == 0, err
    assert RunDir(out).latest_checkpoint()[0] == 3
    assert [r["step"] for r in RunDir(out).read_metrics()] == [1, 2, 3]

    code, err = _exit_code(["--resume", str(out), "--output-dir", str(tmp_path / "x")], capsys)
    assert code == 2 and "give one folder" in err
    code, err = _exit_code(["--resume", str(out), "--max-steps", "2"], capsys)
    assert code == 2 and "at step 3, past --max-steps 2" in err


# -------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("kind", ["constant", "linear", "cosine"])
def test_lr_schedule_equals_diffusers_then_continues_without_a_jump(kind):
    """Reference: diffusers' get_scheduler (constant_with_warmup, linear, cosine) for a run of
    one length, factor by factor (exact). Re-planned at step r for a longer run, the factor
    at r is unchanged, the rest follows the shape to 0 at the new end, and it never rises."""
    warmup, total, r, longer = 3, 10, 6, 20
    name = {"constant": "constant_with_warmup"}.get(kind, kind)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    ours = LRSchedule(kind, warmup_steps=warmup, max_steps=total)
    assert [ours(s) for s in range(total + 1)] == [
        theirs.lr_lambdas[0](s) for s in range(total + 1)
    ]

    at_r = ours(r)
    ours.replan(r, longer)
    assert ours(r) == at_r
    after = [ours(s) for s in range(r, longer + 1)]
    if kind == "constant":
        assert after == [1.0] * len(after)
    else:
        assert after[-1] == 0.0 and all(a >= b for a, b in zip(after, after[1:], strict=False))
        halfway = (r + longer) // 2
        expected = 0.5 * at_r if kind == "linear" else at_r * 0.5 * (1 + math.cos(math.pi / 2))
        assert ours(halfway) == pytest.approx(expected, rel=1e-12)


def test_resuming_with_more_steps_keeps_the_lr_continuous(concept, tiny_pipeline_dir, tmp_path):
    """Guards the lr jump at a resume with a new --max-steps (a linear schedule of 4 steps
    resumed at step 4 for 8 used to restart near the full lr): the run keeps its lr at the
    resume point and decays from there to 0 at the new end."""
    out = tmp_path / "run"
    base = _args(concept, tiny_pipeline_dir, out, "--set", "lr_scheduler=linear",
                 "--set", "warmup_steps=0", "--checkpoint-every", "2")  # fmt: skip
    assert cli.train_main([*base, "--max-steps", "4"]) == 0
    # stop the first plan one step short of its end: the lr is then 1/4 of the peak
    shutil.rmtree(RunDir(out).checkpoint(4).path)
    assert cli.train_main(["--resume", str(out), "--max-steps", "8"]) == 0
    lrs = [r["lr"]["unet"] for r in RunDir(out).read_metrics()]  # lr after each step
    peak = 0.05  # the concept's SGD-SaI lr
    # steps 1-2 of the 4-step plan, then from step 2 (factor 1/2) down to 0 at step 8
    want = [peak * 3 / 4, peak * 2 / 4] + [peak * 0.5 * (8 - s) / 6 for s in range(3, 9)]
    assert lrs == pytest.approx(want, rel=1e-12)


# ---------------------------------------------------------------------------- data, cache
def test_the_latent_cache_says_once_which_crops_it_drops(concept, tiny_pipeline_dir, tmp_path,
                                                         capsys):  # fmt: skip
    """Guards the silent centre crop: with cache_latents (the default) and random crops, the
    non-square images are named once; center_crop=true (or no cache) says nothing."""
    for extra, noted in ((["cache_latents=true"], True), (["center_crop=true"], False),
                         (["cache_latents=false"], False)):  # fmt: skip
        cfg, c = config.resolve(
            str(concept),
            {"base_model": str(tiny_pipeline_dir), "max_steps": 1, "resolution": 64},
            ["validation_seeds=[]", *extra],
        )
        recipe.setup(cfg, c, tmp_path / "run")
        out = capsys.readouterr().out
        assert out.count("note: cache_latents=true") == int(noted), extra
        if noted:
            assert "3 non-square image(s) (of 3, e.g. img0.png)" in out


# --------------------------------------------------------------------- modes and memory
def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while ``fn`` runs (what checkpointing removes)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_text_encoder_checkpointing_lowers_activation_memory_with_the_same_gradients(
    concept, tiny_pipeline_dir, tmp_path
):
    """Guards the no-op: every module was in eval() and transformers checkpoints only in
    train mode. Now the trained modules train; checkpointing the text encoder keeps fewer
    activations for backward, and the LoRA gradients are the same (rtol 1e-5)."""
    grads, saved = [], []
    for checkpointing in (False, True):
        cfg, c = config.resolve(
            str(concept),
            {"base_model": str(tiny_pipeline_dir), "max_steps": 1, "resolution": 64},
            ["validation_seeds=[]", "text_encoder_lora=true",
             f"gradient_checkpointing={str(checkpointing).lower()}"],
        )  # fmt: skip
        run = recipe.setup(cfg, c, tmp_path / f"run{checkpointing}")
        assert run.unet.training and run.text_encoder.training and not run.pipe.vae.training
        captions = [e.caption for e in run.inputs.images.examples]
        holder = {}

        def encode(run=run, captions=captions, holder=holder):
            holder["h"] = run.text(captions)

        saved.append(_saved_bytes(encode))
        holder["h"].square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in run.trainable.items() if "text_encoder" in n})
    assert saved[1] < 0.7 * saved[0], saved
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-8)


def test_validation_samples_are_drawn_in_eval_mode_and_training_resumes_in_train_mode(
    concept, tiny_pipeline_dir, tmp_path
):
    cfg, c = config.resolve(
        str(concept),
        {"base_model": str(tiny_pipeline_dir), "max_steps": 1, "resolution": 64},
        ["validation_seeds=[1]", "sample_steps=1", "text_encoder_lora=true"],
    )
    run = recipe.setup(cfg, c, tmp_path / "run")
    modes = []
    hook = run.unet.register_forward_pre_hook(lambda m, a: modes.append(m.training))
    recipe.validate_samples(run, tag="check")
    hook.remove()
    assert modes and not any(modes)
    assert run.unet.training and run.text_encoder.training


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="no clear_refs")
def test_peak_memory_is_the_runs_own_not_the_process_lifetime_peak(
    concept, tiny_pipeline_dir, tmp_path
):
    """Guards ru_maxrss: a run trained after a 1.5 GB tensor was freed in the same process
    (the app, a sweep) reported that earlier peak as its own."""
    # a tensor 1.5 GB larger than this process's peak so far, touched: the lifetime peak then
    # lies 1.5 GB above today's resident set, however much earlier tests used and however much
    # of that the allocator keeps resident for reuse (a smaller tensor may fit in it)
    now_mb = (
        int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    )
    before_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    big = torch.ones(int((max(before_mb, now_mb) + 1536) * 2**20) // 4)
    del big
    lifetime_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert lifetime_mb > now_mb + 1536
    out = tmp_path / "run"
    assert cli.train_main(_args(concept, tiny_pipeline_dir, out, "--max-steps", "2")) == 0
    peaks = [r["peak_mem_mb"] for r in RunDir(out).read_metrics()]
    assert all(0 < p < lifetime_mb - 1024 for p in peaks), (peaks, lifetime_mb)


def test_the_lora_is_written_before_the_final_samples(concept, tiny_pipeline_dir, tmp_path,
                                                      monkeypatch):  # fmt: skip
    """Guards final sampling first: at SD 1.5 size on a CPU it takes minutes in which an
    interruption left no LoRA. Interrupted while sampling, the run has its files."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "write_samples", interrupted)
    out = tmp_path / "run"
    argv = [*_args(concept, tiny_pipeline_dir, out, "--max-steps", "1"), "--set",
            "validation_seeds=[1]"]  # fmt: skip
    assert cli._run(cli.train_main, argv) == 130
    run = RunDir(out)
    assert run.is_finished and run.kohya.is_file() and run.embeddings.is_file()


# ------------------------------------------------------------------------------- faults
# A training process that kills itself with SIGKILL at a point of the checkpoint of step AT:
# "before" (nothing written), "during" (trainable.safetensors written, optimizer not yet),
# "renamed" (the new folder in place, the old one not yet pruned; keep_checkpoints=1).
_KILLER = """
import os, signal, sys
import torch
from sai_diffusion import cli
from sai_diffusion.training import checkpoints, recipe

point, at = sys.argv[1], int(sys.argv[2])
armed = []
save = recipe.save_checkpoint
torch_save, rmtree = torch.save, checkpoints.shutil.rmtree

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_checkpoint(run_dir, step, *args, **kwargs):
    if step == at:
        if point == "before":
            die()
        armed.append(step)
    return save(run_dir, step, *args, **kwargs)

def killing(original):
    def wrapper(*args, **kwargs):
        if armed:
            die()
        return original(*args, **kwargs)
    return wrapper

recipe.save_checkpoint = save_checkpoint
if point == "during":
    checkpoints.torch.save = killing(torch_save)
if point == "renamed":
    checkpoints.shutil.rmtree = killing(rmtree)
sys.argv = ["sai-train-lora", *sys.argv[3:]]
cli.train_entry()
"""


@pytest.mark.slow  # seven real training processes: ~40 s
def test_sigkill_at_each_point_of_a_checkpoint_write_resumes_bitwise(
    concept, tiny_pipeline_dir, tmp_path
):
    """Killed before, during, or just after the rename of the step-4 checkpoint, a run
    resumes from its last complete checkpoint and ends bitwise equal to the uninterrupted run
    (CPU, fresh processes with the same thread count)."""
    common = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir), *FAST,
              "--max-steps", "5", "--checkpoint-every", "2", "--set", "keep_checkpoints=1",
              "--set", "text_encoder_lora=true"]  # fmt: skip
    whole = tmp_path / "whole"
    assert run_train(*common, "--output-dir", str(whole)).returncode == 0
    want = load_file(str(whole / "lora.safetensors"))
    for point, last_complete in (("before", 2), ("during", 2), ("renamed", 4)):
        cut = tmp_path / point
        killed = subprocess.run(
            [sys.executable, "-c", _KILLER, point, "4", *common, "--output-dir", str(cut)],
            capture_output=True, text=True, timeout=240,
        )  # fmt: skip
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        run = RunDir(cut)
        assert not run.lora.exists()
        assert run.latest_checkpoint()[0] == last_complete, point
        resumed = run_train(*common, "--output-dir", str(cut), "--resume", str(cut))
        assert resumed.returncode == 0, resumed.stderr
        got = load_file(str(run.lora))
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want), point
        leftovers = [p.name for p in run.checkpoints_dir.iterdir()]
        assert leftovers == ["step-000005"], (point, leftovers)  # temp folders gone, pruned


def test_a_corrupt_checkpoint_is_skipped_with_its_name_and_the_older_one_used(
    concept, tiny_pipeline_dir, tmp_path, capsys
):
    out = tmp_path / "run"
    assert cli.train_main(_args(concept, tiny_pipeline_dir, out, "--max-steps", "4",
                                "--checkpoint-every", "2")) == 0  # fmt: skip
    run = RunDir(out)
    newest = run.checkpoint(4)
    newest.trainable.write_bytes(newest.trainable.read_bytes()[:100])  # truncated
    cfg, c, _ = run.read_config()
    resumed = recipe.setup(cfg, c, out, resume=True)
    err = capsys.readouterr().err
    assert resumed.step == 2
    assert f"warning: skipping {newest.path}: unreadable" in err
    # set aside, so that it never counts as a checkpoint again (pruning, --resume)
    assert not newest.path.exists() and (run.checkpoints_dir / ".step-000004.unreadable").is_dir()
    assert run.latest_checkpoint()[0] == 2
    run.checkpoint(2).optimizer.write_bytes(b"not a checkpoint")
    code, err = _exit_code(["--resume", str(out)], capsys)
    assert code == 2
    assert "no complete checkpoint to resume from (unreadable: step-000002)" in err


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


@pytest.mark.slow  # real training processes: ~10 s
def test_a_checkpoint_write_that_fails_exits_2_and_keeps_the_previous_one(
    concept, tiny_pipeline_dir, tmp_path
):
    """A full disk, reproduced with a per-file size limit (a real failing write, also as
    root): exit 2 naming the checkpoint, the previous checkpoint intact, no temp folder."""
    out = tmp_path / "run"
    assert cli.train_main(_args(concept, tiny_pipeline_dir, out, "--max-steps", "2",
                                "--checkpoint-every", "2")) == 0  # fmt: skip
    run = RunDir(out)
    previous = run.checkpoint(2)
    before = {p.name: p.read_bytes() for p in previous.path.iterdir()}
    limit = min(len(before[name]) for name in ("trainable.safetensors", "optimizer.pt")) - 1
    assert limit > run.run_yaml.stat().st_size + 4096  # run.yaml and metrics still fit
    proc = run_train("--resume", str(out), "--max-steps", "4",
                          preexec=_file_size_limit(limit))  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: cannot write the checkpoint {run.checkpoint(4).path}")
    assert f"{previous.path} is intact" in lines[-1] and "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in previous.path.iterdir()} == before
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-000002"]


def test_extending_a_run_whose_decay_reached_zero_is_refused(concept, tiny_pipeline_dir, tmp_path,
                                                             capsys):  # fmt: skip
    """A finished linear run resumed for more steps would re-plan from its lr of 0 and train
    nothing: exit 2 saying so (found in review)."""
    out = tmp_path / "run"
    assert cli.train_main(_args(concept, tiny_pipeline_dir, out, "--max-steps", "2",
                                "--set", "lr_scheduler=linear")) == 0  # fmt: skip
    capsys.readouterr()
    code, err = _exit_code(["--resume", str(out), "--max-steps", "4"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "reached 0 at step 2" in errors[0]
    assert err.strip().splitlines()[-1] == errors[0]


def test_resume_compares_the_concept_file_with_the_one_the_run_started_from(
    concept, tiny_pipeline_dir, tmp_path, capsys
):
    """The concept's train: values are not "given" by the command (found in review: a run
    started with --set rank=8 over a concept saying rank 4 was refused on resume); an edited
    concept file is named as such."""
    data = yaml.safe_load(concept.read_text())
    data["train"] = {"rank": 4}
    concept.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    first = _args(concept, tiny_pipeline_dir, out, "--max-steps", "2", "--set", "rank=8")
    assert cli.train_main(first) == 0
    capsys.readouterr()
    assert _exit_code([*first, "--resume", str(out), "--max-steps", "3"], capsys)[0] == 0
    data["train"] = {"rank": 16}
    concept.write_text(yaml.safe_dump(data))
    code, err = _exit_code([*first, "--resume", str(out), "--max-steps", "4"], capsys)
    assert code == 2 and "train.rank: 4 when the run started, 16 now" in err


@pytest.mark.slow  # real training processes under a file-size limit: ~10 s
def test_a_full_disk_while_logging_is_one_line_with_exit_2(concept, tiny_pipeline_dir, tmp_path):
    """Any write that fails for lack of space (here the metrics or run.yaml, past a per-file
    size limit) ends with exit 2 naming the file, not a traceback (found in review)."""
    out = tmp_path / "run"
    assert cli.train_main(_args(concept, tiny_pipeline_dir, out, "--max-steps", "2",
                                "--checkpoint-every", "0")) == 0  # fmt: skip
    run = RunDir(out)
    # run.yaml and the metrics are rewritten on resume and still fit; the log outgrows them
    limit = max(run.run_yaml.stat().st_size, run.metrics.stat().st_size) + 100
    proc = run_train("--resume", str(out), "--max-steps", "200",
                          preexec=_file_size_limit(limit))  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot write {out}{os.sep}") and "File too large" in last
    assert "Traceback" not in proc.stderr
