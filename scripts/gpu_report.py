"""The records of scripts/gpu_check.sh: what the machine runs (``versions``) and, at the end, one
``bench_train.json`` from the training benchmarks' files and a ``summary.md`` of every part
with its headline figures (``summary``).

    python scripts/gpu_report.py versions --device cuda --out OUT/versions.txt
    python scripts/gpu_report.py summary --device cuda --out OUT --parts parts.tsv \\
        --train WORK/train --budget 470

``parts.tsv`` holds one line per part, as the shell script writes it: name, result ("passed",
"failed (exit N)", "timed out", "skipped: why"), seconds taken, seconds budgeted, a note.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("triton", "diffusers", "peft", "transformers", "accelerate", "huggingface_hub",
            "safetensors", "numpy", "pillow", "pytest", "sai-diffusion")  # fmt: skip
REPO = Path(__file__).resolve().parents[1]


# -------------------------------------------------------------------------------- versions
def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "MISSING"


def versions(device: str) -> list[str]:
    """``name: value`` lines: Python, torch and its CUDA, the device, the driver, the packages
    the check uses, and where sai_diffusion is imported from."""
    import torch

    lines = [f"python: {platform.python_version()} ({sys.executable})",
             f"torch: {torch.__version__}", f"torch CUDA: {torch.version.cuda or 'none'}",
             f"cuDNN: {torch.backends.cudnn.version() or 'none'}"]  # fmt: skip
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"device: {props.name} (compute capability {props.major}.{props.minor}, "
                     f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs)")  # fmt: skip
        lines.append(f"driver: {nvidia_driver()}")
    else:
        from sai_diffusion.machine import describe_machine

        machine = describe_machine("cpu")
        lines.append(f"device: cpu ({machine['cpu']}, {machine['cpu_count']} cores; "
                     f"CUDA available: {torch.cuda.is_available()})")  # fmt: skip
    lines += [f"{name}: {package_version(name)}" for name in PACKAGES]
    import sai_diffusion

    lines.append(f"sai_diffusion imported from: {Path(sai_diffusion.__file__).parent}")
    lines.append(f"checkout commit: {git_commit()}")
    return lines


def nvidia_driver() -> str:
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
    proc = subprocess.run(query, capture_output=True, text=True, timeout=20)
    return proc.stdout.strip() or f"unknown ({proc.stderr.strip()})"


def git_commit() -> str:
    """The checkout's commit, with ``+changes`` when its files differ from it; ``unknown``
    where the copy has no history (the GPU machine gets the files alone)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return "unknown (no git history here)"

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True,
                              text=True, timeout=20).stdout.strip()  # fmt: skip

    commit = git("rev-parse", "--short", "HEAD")
    return commit + (" +changes" if git("status", "--porcelain", "--untracked-files=no") else "")


# --------------------------------------------------------------------------------- summary
def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_parts(path: Path) -> list[dict]:
    parts = []
    for line in path.read_text().splitlines():
        name, result, seconds, budget, note = (line.split("\t") + [""] * 5)[:5]
        parts.append(dict(name=name, result=result, seconds=seconds, budget=budget, note=note))
    return parts


def merge_train(train_dir: Path) -> dict:
    """Every training benchmark's file (one ``bench_train.py --json`` each), by name: the
    shell script numbers them in the order it runs them."""
    files = sorted(train_dir.glob("*.json"))
    runs = [dict(name=f.stem, **(read_json(f) or {"error": "unreadable"})) for f in files]
    return dict(runs=runs)


def _f(value, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def parity_lines(report: dict | None) -> list[str]:
    if report is None:
        return ["not written: see log.txt"]
    lines = [f"{report['device']}, {report['steps']} steps, against {report['reference']}; "
             f"tolerance factor {report['tolerance_factor']:.1f} (gpu_parity.py)", "",
             "| path | dtype | params max rel err | scales max rel err | worst / tolerance "
             "| result |", "|---|---|---:|---:|---:|---|"]  # fmt: skip
    for r in report["results"]:
        if "max_rel_err" in r:
            result = "ok" if r["passed"] else "FAILED"
            lines.append(f"| {r['path']} | {r['dtype']} | {r['max_rel_err']:.2e} "
                         f"| {r['max_scale_rel_err']:.2e} | {r['max_err_over_tol']:.2f} "
                         f"| {result} |")  # fmt: skip
        else:
            lines.append(f"| {r['path']} | {r['dtype']} | | | | "
                         f"{r.get('error') or 'skipped: ' + r.get('skipped', '')} |")  # fmt: skip
    return lines


def optimizer_lines(report: dict | None) -> list[str]:
    if report is None:
        return ["not written: see log.txt"]
    lines = [f"copy bandwidth {report['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s; medians of "
             f"{report['settings']['repeats']} steps", "",
             "| set | optimizer | state MiB | step ms | step / AdamW(foreach) | floor ms |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for s in report["sets"]:
        for r in s["results"]:
            lines.append(f"| {s['name']} ({s['numel'] / 1e6:,.1f} M) | {r['label']} "
                         f"| {r['state_bytes'] / 2**20:,.1f} | {r['step_s'] * 1e3:.3g} "
                         f"| {_f(r.get('step_vs_adamw'), '.2f')} | {r['floor_s'] * 1e3:.3g} |")  # fmt: skip
    return lines


def train_lines(merged: dict) -> list[str]:
    if not merged["runs"]:
        return ["no results: see log.txt"]
    lines = ["| run | loop | precision | batch x accum | steps/s | vs reference "
             "| data wait ms | peak MiB |", "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for run in merged["runs"]:
        results = run.get("results", [])
        ref = next((r for r in results if r["loop"] == "reference" and "error" not in r), None)
        for r in results:
            if "error" in r:
                lines.append(f"| {run['name']} | {r['loop']} | failed: "
                             f"{r['error'].strip().splitlines()[-1][:160]} |")  # fmt: skip
                continue
            accum = (r.get("settings") or {}).get("grad_accum", 1)
            vs = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
            lines.append(f"| {run['name']} | {r['loop']} | {run['precision']} "
                         f"| {run['batch_size']} x {accum} | {r['steps_per_s']:.2f} | {vs} "
                         f"| {_f(r['data_wait_s'], '.1f', 1e3)} | {r['peak_mib']:,.0f} |")  # fmt: skip
        if not results:
            lines.append(f"| {run['name']} | no loop finished | | | | | | |")
    return lines


def pytest_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return "not written: see log.txt"
    return lines[-1].strip("= ") if lines else "empty"


def summary(args: argparse.Namespace) -> str:
    parts = read_parts(args.parts)
    merged = merge_train(args.train)
    (args.out / "bench_train.json").write_text(json.dumps(merged, indent=1) + "\n")
    versions_file = args.out / "versions.txt"
    seen = dict(line.split(": ", 1) for line in versions_file.read_text().splitlines()
                if ": " in line) if versions_file.is_file() else {}  # fmt: skip
    total = sum(int(p["seconds"]) for p in parts if p["seconds"].isdigit())
    failed = [p["name"] for p in parts if p["result"] != "passed"]
    lines = [
        f"# GPU check on {seen.get('device', args.device)}",
        "",
        f"`DEVICE={args.device} bash scripts/gpu_check.sh`, {time.strftime('%Y-%m-%d %H:%M %Z')}: "
        f"{total} s of the {args.budget} s budget; "
        + ("every part passed." if not failed else f"not passed: {', '.join(failed)}."),
        f"torch {seen.get('torch', '?')} (CUDA {seen.get('torch CUDA', '?')}), triton "
        f"{seen.get('triton', '?')}, diffusers {seen.get('diffusers', '?')}, peft "
        f"{seen.get('peft', '?')}, transformers {seen.get('transformers', '?')}, accelerate "
        f"{seen.get('accelerate', '?')}; commit {seen.get('checkout commit', '?')}.",
        "",
        "## Parts",
        "",
        "| part | result | seconds | budget s | note |",
        "|---|---|---:|---:|---|",
        *[
            f"| {p['name']} | {p['result']} | {p['seconds']} | {p['budget']} | {p['note']} |"
            for p in parts
        ],
        "",
        "## SGD-SaI against the float64 reference (parity.json)",
        "",
        *parity_lines(read_json(args.out / "parity.json")),
        "",
        "## pytest -m gpu (pytest_gpu.txt)",
        "",
        pytest_line(args.out / "pytest_gpu.txt"),
        "",
        "## Optimizer step (bench_optimizer.json)",
        "",
        *optimizer_lines(read_json(args.out / "bench_optimizer.json")),
        "",
        "## Training throughput (bench_train.json)",
        "",
        *train_lines(merged),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    v = commands.add_parser("versions", help="write versions.txt")
    v.add_argument("--device", default="cuda")
    v.add_argument("--out", type=Path, required=True)
    s = commands.add_parser("summary", help="write bench_train.json and summary.md")
    s.add_argument("--device", default="cuda")
    s.add_argument("--out", type=Path, required=True, help="the OUT folder")
    s.add_argument("--parts", type=Path, required=True)
    s.add_argument("--train", type=Path, required=True, help="the bench_train.py JSON files")
    s.add_argument("--budget", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "versions":
        text = "\n".join(versions(args.device)) + "\n"
        args.out.write_text(text)
        print(text, end="")
    else:
        (args.out / "summary.md").write_text(summary(args))


if __name__ == "__main__":
    main()
