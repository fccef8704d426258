"""Several processes on accelerate (DDP over gloo on the CPU): N processes x batch b train what
one process x batch N*b does, write one set of files, resume, and stop together.

Real processes: ``accelerate launch`` with the installed ``sai-train-lora``, one torch thread
each (two processes share the two cores of CI).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sai_diffusion.files.run_dir import RunDir
from tests.helpers import make_concept

BIN = Path(sys.executable).parent
TRAIN = shutil.which("sai-train-lora", path=str(BIN)) or shutil.which("sai-train-lora")
ACCELERATE = shutil.which("accelerate", path=str(BIN)) or shutil.which("accelerate")
pytestmark = pytest.mark.skipif(
    not (TRAIN and ACCELERATE), reason="sai-train-lora / accelerate not installed as scripts"
)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# fp32 sums of the same gradients in another order (all-reduce vs one batch) differ by ~1e-7
# relative per step; three steps of SGD-SaI stay far below this
RTOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, *args: str) -> subprocess.CompletedProcess:
    """``accelerate launch --multi_gpu --num_processes N sai-train-lora ...`` (on a machine
    without GPUs, accelerate's multi-process launcher gives DDP over gloo; its ``--cpu``
    flag would run a single process)."""
    cmd = [TRAIN, *args]
    if processes > 1:
        cmd = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), *cmd]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.slow  # four launches of real processes: ~40 s on 2 cores
def test_two_processes_train_what_one_process_with_twice_the_batch_does(
    tiny_pipeline_dir, tmp_path
):
    concept = make_concept(tmp_path / "concept", n=5)
    common = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir),
              "--resolution", "64", "--checkpoint-every", "2", "--set", "validation_seeds=[]",
              "--set", "grad_accum=2", "--set", "text_encoder_lora=true",
              "--set", "train_embeddings=true"]  # fmt: skip
    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    single = _launch(1, *common, "--batch-size", "2", "--max-steps", "3", "--output-dir", str(one))
    assert single.returncode == 0, single.stderr
    double = _launch(2, *common, "--batch-size", "1", "--max-steps", "3", "--output-dir", str(two))
    assert double.returncode == 0, double.stderr[-3000:]

    # the same LoRA, token vector and SGD-SaI scales (every rank checked it holds the same)
    for name in ("lora.safetensors", "embeddings.safetensors"):
        a, b = load_file(str(two / name)), load_file(str(one / name))
        assert a.keys() == b.keys()
        worst = max(_relative_error(a[k], b[k]) for k in a)
        assert worst <= RTOL, (name, worst)
    gsnr_two, gsnr_one = (json.loads((d / "gsnr.json").read_text()) for d in (two, one))
    scales = [(r["scale"], s["scale"]) for r, s in zip(gsnr_two, gsnr_one, strict=True)]
    assert all(x == pytest.approx(y, rel=RTOL) for x, y in scales if y is not None)
    # one set of files, one log, each note and the final line once
    run = RunDir(two)
    assert [r["step"] for r in run.read_metrics()] == [1, 2, 3]
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-000002", "step-000003"]
    assert not [p for p in two.rglob("*.tmp")]
    assert double.stdout.count("done: ") == 1
    # one progress bar (rank 0's): its first frame, before any loss is shown, once
    assert double.stderr.count("| 0/3 [00:00<?, ?step/s]") == 1
    assert double.stdout.count("note: cache_latents=true") == 1
    # the global loss is logged: the mean over ranks equals the one-process batch's loss
    losses_two = [r["loss"] for r in run.read_metrics()]
    losses_one = [r["loss"] for r in RunDir(one).read_metrics()]
    assert losses_two == pytest.approx(losses_one, rel=1e-5)

    # two processes resume (from step 2) and end bitwise where the uninterrupted run did
    first = _launch(2, *common, "--batch-size", "1", "--max-steps", "2", "--output-dir",
                    str(resumed))  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    again = _launch(2, *common, "--batch-size", "1", "--max-steps", "3", "--output-dir",
                    str(resumed), "--resume", str(resumed))  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    a, b = load_file(str(resumed / "lora.safetensors")), load_file(str(two / "lora.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in b)


# Rank 1's loss turns NaN at step 2; the others' stays finite.
_POISON_RANK_1 = """
import sys
import torch
from sai_diffusion import cli
from sai_diffusion.training import objective
from accelerate import PartialState

loss = objective.Objective.__call__
calls = []

def poisoned(self, unet, text, inputs, **kwargs):
    value = loss(self, unet, text, inputs, **kwargs)
    calls.append(1)
    if PartialState().process_index == 1 and len(calls) == 2:  # its second step
        return value * torch.tensor(float("nan"))
    return value

objective.Objective.__call__ = poisoned
sys.argv = ["sai-train-lora", *sys.argv[1:]]
cli.train_entry()
"""


@pytest.mark.slow  # two real training processes: ~10 s
def test_a_nan_on_one_rank_ends_every_rank_with_exit_3_and_the_same_message(
    tiny_pipeline_dir, tmp_path
):
    """Guards the hang: the poisoned rank used to stop alone while the others waited in the
    next all-reduce. Two processes started as a launcher starts them (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR/PORT); both exit 3 with one identical error line naming rank 1."""
    concept = make_concept(tmp_path / "concept")
    args = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir), "--resolution",
            "64", "--max-steps", "4", "--set", "validation_seeds=[]", "--output-dir",
            str(tmp_path / "run")]  # fmt: skip
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _POISON_RANK_1, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )  # fmt: skip
        )
    results = [p.communicate(timeout=240) for p in procs]
    codes = [p.returncode for p in procs]
    errors = [
        [line for line in err.splitlines() if line.startswith("error:")] for _, err in results
    ]
    assert codes == [3, 3], (codes, [err[-2000:] for _, err in results])
    assert errors[0] == errors[1] and len(errors[0]) == 1
    assert "at step 2 (on rank 1 of 2)" in errors[0][0]
    assert "Traceback" not in results[0][1] + results[1][1]


@pytest.mark.slow  # two launches of real processes: ~20 s on 2 cores
def test_buckets_prior_and_held_out_images_work_over_two_processes(tiny_pipeline_dir, tmp_path):
    """With buckets a batch is one bucket's chunk, numbered over ranks and micro-batches: two
    processes at batch 1 train what one process does with grad_accum 2, class examples and
    validation loss included."""
    from tests.training.test_kohya_settings import _class_folder, _portraits

    concept = make_concept(tmp_path / "concept", n=5)
    _portraits(concept)
    dogs = _class_folder(tmp_path, n=1)  # and 3 more drawn by the base model
    common = ["--concept", str(concept), "--base-model", str(tiny_pipeline_dir),
              "--resolution", "64", "--batch-size", "1", "--max-steps", "3"]  # fmt: skip
    for setting in ("validation_seeds=[]", "buckets=true", "bucket_step=16", "sample_steps=2",
                    f"class_data={dogs}", "num_class_images=4", "validation_split=0.2",
                    "validation_loss_every=1"):  # fmt: skip
        common += ["--set", setting]
    one, two = tmp_path / "one", tmp_path / "two"
    # the two processes draw the class images first, two seeds each
    double = _launch(2, *common, "--output-dir", str(two))
    assert double.returncode == 0, double.stderr[-3000:]
    assert sorted(p.name for p in dogs.glob("class-*.png")) == [
        f"class-0000{i}.png" for i in range(3)
    ]
    single = _launch(1, *common, "--set", "grad_accum=2", "--output-dir", str(one))
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = load_file(str(two / "lora.safetensors")), load_file(str(one / "lora.safetensors"))
    assert a.keys() == b.keys()
    assert max(_relative_error(a[k], b[k]) for k in a) <= RTOL
    val = [[r["val_loss"] for r in RunDir(d).read_metrics()] for d in (two, one)]
    assert len(val[0]) == 3 and val[0] == pytest.approx(val[1], rel=RTOL)
