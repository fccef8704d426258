"""training.feed: examples prepared ahead by worker processes train exactly what the training
thread alone trains; a worker's bad image is the run's one-line error; each step records how
long it waited for its inputs; a resumed run may change the number of workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from sai_diffusion import cli
from sai_diffusion.errors import UserError
from sai_diffusion.training import recipe
from tests.helpers import TRAIN_COMMAND, make_concept, setup_run, train_tiny

# every random draw of the host pipeline on: random crops of non-square images, flips, masks
# from resize-crop-pad's paste, caption shuffling, two micro-batches per step
UNCACHED = ("cache_latents=false", "augmentation=resize-crop-pad", "shuffle_captions=true",
            "grad_accum=2")  # fmt: skip


@pytest.fixture(scope="module")
def concept(tmp_path_factory):
    return make_concept(tmp_path_factory.mktemp("concept"), n=4)


def _train(concept, base, out, workers: int, steps: int = 3):
    run = setup_run(concept, base, out, *UNCACHED, f"data_workers={workers}", steps=steps,
                    batch=2)  # fmt: skip
    out.mkdir(exist_ok=True)
    recipe.train(run)
    return run


@pytest.mark.slow
def test_zero_one_and_two_workers_train_bitwise_the_same(concept, tiny_pipeline_dir, tmp_path):
    """The guarantee that lets a GPU run use workers: every draw is keyed by the example's
    global number, so the trained tensors are equal (torch.equal) whoever prepared them."""
    runs = {n: _train(concept, tiny_pipeline_dir, tmp_path / f"w{n}", n) for n in (0, 1, 2)}
    want = runs[0].trainable
    for n in (1, 2):
        got = runs[n].trainable
        assert all(torch.equal(got[k], want[k]) for k in want), f"{n} workers differ"
    records = runs[2].run_dir.read_metrics()
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["data_wait"] >= 0 for r in records)


def test_the_feed_starts_over_wherever_it_is_asked(concept, tiny_pipeline_dir, tmp_path):
    """Out of order (a resumed run, a benchmark): the workers start again at the micro-batch
    asked for, and give what the training thread itself makes of it."""
    run = setup_run(concept, tiny_pipeline_dir, tmp_path / "run", *UNCACHED, "data_workers=2",
                    batch=2)  # fmt: skip
    try:
        for step, micro in [(0, 0), (0, 1), (3, 1), (1, 0), (1, 1)]:
            got = run.feed.inputs(step, micro)
            want = run.inputs(run.batches.batch(step, micro))
            assert torch.equal(got.latents, want.latents) and torch.equal(got.mask, want.mask)
            assert torch.equal(got.noise, want.noise) and got.captions == want.captions
            assert run.feed.waited >= 0
    finally:
        run.feed.close()


def test_a_bad_image_found_by_a_worker_is_one_line(concept, tiny_pipeline_dir, tmp_path):
    """An image damaged after the run started is read by a worker process: the run stops
    with the same UserError the training thread would raise, not a worker's traceback."""
    images = make_concept(tmp_path / "c", n=4).parent / "data"
    run = setup_run(images.parent / "thing.yaml", tiny_pipeline_dir, tmp_path / "run",
                    *UNCACHED, "data_workers=1", batch=2)  # fmt: skip
    for image in images.glob("*.png"):
        image.write_bytes(b"not a png")
    with pytest.raises(UserError) as err:
        run.feed.inputs(0, 0)
    assert "Traceback" not in str(err.value) and ".png" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_resumed_run_may_change_the_number_of_workers(concept, tiny_pipeline_dir, tmp_path):
    """data_workers changes how fast a run goes, never what it trains: --resume accepts
    another value (and refuses other settings as before)."""
    extra = [a for item in UNCACHED for a in ("--set", item)]
    out = train_tiny(concept, tiny_pipeline_dir, tmp_path / "run", "sgd-sai", *extra,
                     "--set", "validation_seeds=[]", "--set", "data_workers=0")  # fmt: skip
    assert cli.train_main(["--resume", str(out), "--max-steps", "3",
                           "--set", "data_workers=1"]) == 0  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]


@pytest.mark.slow  # one real training process: ~10 s
def test_ctrl_c_in_a_terminal_stops_the_run_with_its_workers_alive(concept, tiny_pipeline_dir,
                                                                  tmp_path):  # fmt: skip
    """A terminal's Ctrl-C reaches the whole process group, workers included: they ignore it
    (they would otherwise run the handler they inherited, or die with a KeyboardInterrupt), so
    the step in flight gets its remaining micro-batches, the run writes its checkpoint and exits
    130 without a traceback, saying so once, and no worker is left behind."""
    out = tmp_path / "run"
    # eight micro-batches a step, two prepared ahead: a signal in a step leaves most of it to
    # the worker
    sets = [a for item in (*UNCACHED, "grad_accum=8", "validation_seeds=[]", "data_workers=1")
            for a in ("--set", item)]  # fmt: skip
    proc = subprocess.Popen(
        [*TRAIN_COMMAND, "--concept", str(concept), "--base-model", str(tiny_pipeline_dir),
         "--resolution", "64", "--max-steps", "400", "--checkpoint-every", "2",
         "--output-dir", str(out), *sets],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    metrics, deadline = out / "metrics.jsonl", time.time() + 240
    while not metrics.is_file():  # written with the first checkpoint
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Resume with: " in err
    assert err.count("stopping after this step") == 1, err  # said by the training process alone
    step = max(json.loads(line)["step"] for line in metrics.read_text().splitlines())
    assert (out / "checkpoints" / f"step-{step:06d}" / "state.json").is_file()
    time.sleep(1)  # the workers' own exit
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # nobody of the group is left


def test_the_default_worker_count_shares_the_cores_among_the_gpus(monkeypatch):
    """Unset, data_workers is 0 on the CPU and, on a GPU, up to 4 per training process with the
    machine's cores divided among the processes of the machine (one left to each)."""
    from sai_diffusion.training.feed import default_workers

    cuda = torch.device("cuda")
    assert default_workers(torch.device("cpu"), cpus=64) == 0
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers(cuda, cpus=16) == 4 and default_workers(cuda, cpus=3) == 2
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert default_workers(cuda, cpus=16) == 1 and default_workers(cuda, cpus=32) == 3
    assert default_workers(cuda, cpus=4) == 1  # never none on a GPU
