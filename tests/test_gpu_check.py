"""scripts/gpu_check.sh, the one prepared GPU run, as its CPU dry run (``DEVICE=cpu``): a real
process running every part at tiny sizes, its files in a temporary OUT. What a GPU machine
brings back is at most 8 files, and whoever runs the check gets one try: the dry run must pass
every part and write every record the GPU run will."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # 55-120 s on 2 shared cores: every part starts its own processes

REPO = Path(__file__).resolve().parents[1]
PARTS = ("setup", "versions", "parity", "pytest_gpu", "bench_optimizer", "inputs",
         "train_plain", "train_presets")  # fmt: skip
FILES = {"versions.txt", "parity.json", "pytest_gpu.txt", "bench_optimizer.json",
         "bench_train.json", "summary.md", "log.txt"}  # fmt: skip
OPTIMIZERS = {"sgd-sai", "sgd-sai-foreach", "adamw-fused", "adamw-foreach", "sgd-foreach"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("out")
    env = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path_factory.mktemp("work"))}  # fmt: skip
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    return proc, out


def parts_table(summary: str) -> dict[str, str]:
    """summary.md's parts table: part -> result."""
    rows = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) >= 2 and cells[0] in PARTS:
            rows[cells[0]] = cells[1]
    return rows


def test_every_part_passes_and_the_exit_code_says_so(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + (out / "log.txt").read_text()[-3000:]
    assert parts_table((out / "summary.md").read_text()) == dict.fromkeys(PARTS, "passed")


def test_out_holds_the_seven_records_within_the_eight_files_that_come_back(dry_run):
    _, out = dry_run
    written = {p.name for p in out.iterdir()}
    assert written == FILES and len(written) <= 8
    assert all((out / name).is_file() and (out / name).stat().st_size > 0 for name in written)


def test_versions_name_what_the_gpu_report_needs(dry_run):
    _, out = dry_run
    names = {line.split(":")[0] for line in (out / "versions.txt").read_text().splitlines()}
    assert {"python", "torch", "torch CUDA", "device", "triton", "diffusers", "peft",
            "transformers", "accelerate"} <= names  # fmt: skip


def test_parity_steps_every_path_and_dtype_within_tolerance(dry_run):
    """On the CPU the fused path is the C++ kernel (CUDA's Triton kernel has no CPU form)."""
    _, out = dry_run
    parity = json.loads((out / "parity.json").read_text())
    assert parity["passed"] and parity["device"] == "cpu"
    ran = {(r["path"], r["dtype"]) for r in parity["results"]}
    assert ran == {
        (p, d) for p in ("fused", "default", "foreach") for d in ("fp32", "bf16", "fp16")
    }
    for r in parity["results"]:
        assert "skipped" in r or r["max_err_over_tol"] <= 1, r


def test_optimizer_benchmark_holds_every_set_optimizer_state_and_floor(dry_run):
    _, out = dry_run
    report = json.loads((out / "bench_optimizer.json").read_text())
    assert report["copy_bandwidth_bytes_per_s"] > 0
    assert [s["name"] for s in report["sets"]] == ["lora4", "lora64", "gpt2xl"]
    for param_set in report["sets"]:
        assert {r["key"] for r in param_set["results"]} == OPTIMIZERS
        for r in param_set["results"]:
            assert r["state_bytes"] > 0 and r["step_s"] > 0 and r["floor_s"] > 0


def test_training_benchmark_holds_the_plain_and_preset_loops_with_their_data_wait(dry_run):
    _, out = dry_run
    runs = json.loads((out / "bench_train.json").read_text())["runs"]
    loops = {(run["name"], r["loop"]) for run in runs for r in run["results"]}
    assert loops == {("11-plain-fp16-b2", "reference"), ("11-plain-fp16-b2", "ours-sgd-sai"),
                     ("21-potter-edlora-bf16", "ours-preset")}  # fmt: skip
    for run in runs:
        for r in run["results"]:
            assert r["steps_per_s"] > 0 and r["peak_mib"] > 0 and r["data_wait_s"] >= 0, r
    preset = runs[-1]["results"][0]["settings"]
    # the preset's own settings, with the benchmark's precision, size and batch
    assert preset["data_workers"] is None  # not given: the recipe chooses
    assert (preset["edlora"], preset["use_masks"], preset["cache_latents"], preset["grad_accum"],
            preset["augmentation"], preset["mixed_precision"], preset["resolution"]) == (
        True, True, False, 2, "resize-crop-pad", "bf16", 64)  # fmt: skip
