"""The paper's robustness experiment (its Table 2): every metric's Peak and Avg over an lr grid.

    python scripts/bench_quality.py                      # 4 optimizers x 5 lrs x 3 seeds
    python scripts/bench_quality.py --lrs 1e-2,1e-1 --seeds 0 --optimizers sgd-sai  # a slice
    python scripts/bench_quality.py --lrs-for sgd-sai=1e-3,1e-2,1e-1,1,10 \
        --lrs-for adamw=1e-5,1e-4,1e-3,1e-2,1e-1 ...       # each optimizer over its own range
    python scripts/bench_quality.py --concept potter --base-model chilloutmix.safetensors \
        --clip-model openai/clip-vit-base-patch32 --dino-model facebook/dino-vits16  # a GPU's job

A concept of the miniature world is scored by the judge (concept_fidelity, prompt_fidelity;
with --clip-model, also CLIP-T, CLIP-I and DINO); any other concept by CLIP-T, CLIP-I and DINO
(``sai-eval``'s figures, ``sai_diffusion.evaluation``).

Every (optimizer, lr, seed) trains the demo concept (configs/concepts/demo.yaml, on the
built-in miniature model) with its shipped settings, only the optimizer, lr and seed changed,
and is scored by ``sai-eval``'s judge (concept_fidelity, prompt_fidelity). The base model's
scores are measured once. Like Table 2 of "No More Adam", each optimizer gets a Peak (best lr,
mean over seeds, +- std over seeds) and an Avg (mean over the whole lr grid, +- std over
seeds of the grid averages): Peak says how good it can be, Avg how forgiving it is.

Runs go to ``--out`` (one folder each, plus results.jsonl with one line per finished run); a
second call skips the runs already in results.jsonl, so an interrupted benchmark resumes, and
scores again (without training) any finished run whose line lacks a figure this version
measures, such as the shape fits added after a grid was trained.
``--workers`` processes train side by side with one torch thread each. Writes results.md
(table) and quality.png (fidelity against lr) next to them.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

# Torch-free imports only up here: the workers are forked, and each sets its one thread before
# it loads torch (train_and_score imports the training parts itself).
from sai_diffusion import config
from sai_diffusion.errors import TrainingDiverged, UserError
from sai_diffusion.files.run_dir import RunDir
from sai_diffusion.fsutil import atomic_write_text
from sai_diffusion.miniature.concept import judged_object, judges
from sai_diffusion.optim import OPTIMIZERS

DEFAULT_OPTIMIZERS = tuple(o for o in OPTIMIZERS if o != "scaled-sgd")  # the paper's four
JUDGE_METRICS = ("concept_fidelity", "prompt_fidelity")
# the shape fits (miniature/evaluate.py): how heart-like the drawn objects are, by geometry
SHAPE_METRICS = ("shape_iou", "class_shape_iou", "shape_share")
# recorded per run but given no Peak / Avg: a lower class-shape fit is not "worse"
UNRANKED = ("class_shape_iou",)
SHORT = {"concept_fidelity": "concept", "prompt_fidelity": "prompt", "shape_iou": "shape IoU",
         "class_shape_iou": "class-shape IoU", "shape_share": "shape share", "clip_t": "CLIP-T",
         "clip_i": "CLIP-I", "dino": "DINO"}  # fmt: skip


def metrics_of(args) -> tuple[str, ...]:
    """The judge's figures for a miniature-world concept, CLIP's (and DINO's) when asked."""
    clip = ("clip_t", "clip_i") if args.clip_model else ()
    dino = ("dino",) if args.clip_model and (args.dino_model or "").lower() != "none" else ()
    return (*(JUDGE_METRICS + SHAPE_METRICS if args.judged else ()), *clip, *dino)


def scorer_of(args) -> dict | None:
    if not args.clip_model:
        return None
    dino = args.dino_model or "facebook/dino-vits16"
    # the judge reads a miniature-world concept's own prompts; CLIP scores the same images
    return {"clip": args.clip_model, "dino": None if dino.lower() == "none" else dino,
            "prompts": None if args.judged else args.prompts}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concept", default="demo")
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS))
    p.add_argument("--lrs", default="1e-4,1e-3,1e-2,1e-1,1", help="comma-separated grid")
    p.add_argument("--lrs-for", dest="lrs_for", action="append", default=[],
                   metavar="OPTIMIZER=LRS", help="one optimizer's own grid instead of --lrs, "
                   "e.g. --lrs-for sgd-sai=1e-3,1e-2,1e-1,1,10")  # fmt: skip
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=None, help="default: the concept's max_steps")
    p.add_argument("--eval-seeds", default=None, help="default: the concept's evaluation seeds")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--base-model", help="default: the concept's (the miniature for demo)")
    p.add_argument("--clip-model", help="CLIP hub id or folder: adds CLIP-T / CLIP-I")
    p.add_argument("--dino-model", help="DINO hub id or folder (default with --clip-model: "
                   "facebook/dino-vits16; 'none': skip)")  # fmt: skip
    p.add_argument("--prompts", help="sai-eval --prompts: a file or person / object / style")
    p.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                   help="a training setting for every run, e.g. --set edlora=true")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench/quality"))
    p.add_argument("--plot", type=Path, default=None, help="default: OUT/quality.png")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    optimizers = args.optimizers.split(",")
    try:  # before any run: a sweep must not train for an hour and then fail on its settings
        concept = config.load_concept(args.concept)
        args.judged = judges(concept)
        if args.judged:
            judged_object(concept)
        elif not args.clip_model:
            raise UserError(
                f"{concept.path} is not a concept of the miniature world (no evaluation section "
                "naming a world object): give --clip-model (and --base-model) to score it "
                "with CLIP-T, CLIP-I and DINO"
            )
        config.resolve(args.concept, {}, args.set_items)  # the settings, checked once
        unknown = [o for o in optimizers if o not in OPTIMIZERS]
        if unknown:
            raise UserError(f"--optimizers: unknown {unknown}; choose from {', '.join(OPTIMIZERS)}")
        grids = lr_grids(args, optimizers)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seeds = [int(v) for v in args.seeds.split(",")]
    eval_seeds = None if args.eval_seeds is None else [int(v) for v in args.eval_seeds.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    done = {_key(r) for r in _read_results(results_path)}
    jobs = [(o, lr, s) for o in optimizers for lr in grids[o] for s in seeds
            if _key({"optimizer": o, "lr": lr, "seed": s}) not in done]  # fmt: skip
    metrics = metrics_of(args)
    stale = [r for r in _read_results(results_path) if not r.get("diverged")
             and any(m not in r for m in metrics) and Path(r["run"]).is_dir()]  # fmt: skip
    print(f"{len(jobs)} runs to train, {len(stale)} to score again ({len(done)} already in "
          f"{results_path})", flush=True)  # fmt: skip

    started = time.perf_counter()
    if stale:
        _rescore(args, stale, eval_seeds, metrics, results_path)
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_one_thread) as pool:
        futures = [pool.submit(train_and_score, args.concept, *job, args.steps, args.out,
                               eval_seeds, args.set_items, args.base_model, scorer_of(args),
                               metrics_of(args)) for job in jobs]  # fmt: skip
        for i, future in enumerate(as_completed(futures), 1):
            result = future.result()
            with results_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
            elapsed = time.perf_counter() - started
            eta = elapsed / i * (len(jobs) - i)
            print(f"[{i}/{len(jobs)}] {_describe(result, metrics_of(args))}  ({elapsed:.0f} s, "
                  f"ETA {eta:.0f} s)",
                  flush=True)  # fmt: skip

    results = [r for r in _read_results(results_path)
               if r["optimizer"] in optimizers and r["lr"] in grids[r["optimizer"]]
               and r["seed"] in seeds]  # fmt: skip
    base = _base_scores(args, results, eval_seeds)
    table = summarise(results, optimizers, metrics)
    markdown = render_markdown(table, results, base, args, time.perf_counter() - started, metrics)
    (args.out / "results.md").write_text(markdown, encoding="utf-8")
    plot(results, optimizers, base, args.plot or args.out / "quality.png", metrics)
    print(markdown)
    return 0


def lr_grids(args, optimizers: list[str]) -> dict[str, list[float]]:
    """Each optimizer's lrs: ``--lrs``, or its own ``--lrs-for OPTIMIZER=LRS``.

    Raises:
        UserError: a malformed ``--lrs-for``, one for an optimizer not swept, or a bad number.
    """
    grids = dict.fromkeys(optimizers, args.lrs)
    for item in args.lrs_for:
        name, sep, values = item.partition("=")
        if not sep or name not in optimizers:
            raise UserError(f"--lrs-for {item!r}: write OPTIMIZER=LR,LR,... for one of "
                            f"{', '.join(optimizers)}")  # fmt: skip
        grids[name] = values
    try:
        return {o: [float(v) for v in text.split(",")] for o, text in grids.items()}
    except ValueError as exc:
        raise UserError(f"--lrs / --lrs-for: {exc}; write comma-separated numbers") from None


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


# ------------------------------------------------------------------------------ one run
def train_and_score(
    concept_name: str,
    optimizer: str,
    lr: float,
    seed: int,
    steps: int | None,
    out: Path,
    eval_seeds: list[int] | None = None,
    set_items: list[str] = (),
    base_model: str | None = None,
    scorer: dict | None = None,
    metrics: tuple[str, ...] = JUDGE_METRICS,
) -> dict:
    """Train one run in this process (``set_items``: more settings) and score it without the
    base model: the judge for a miniature-world concept, CLIP / DINO (``scorer``) besides or
    instead."""
    from sai_diffusion.training.recipe import run_training

    flags = {"optimizer": optimizer, "lr": lr, "seed": seed, "max_steps": steps,
             "base_model": base_model}  # fmt: skip
    cfg, concept = config.resolve(concept_name, flags, ["checkpoint_every=0", *set_items])
    run_dir = out / f"{optimizer}-lr{lr:g}-seed{seed}"
    if run_dir.exists():  # a run killed before it reached results.jsonl starts over
        shutil.rmtree(run_dir)
    result = {"optimizer": optimizer, "lr": lr, "seed": seed, "steps": cfg.max_steps,
              "run": str(run_dir)}  # fmt: skip
    t0 = time.perf_counter()
    try:
        run_training(cfg, concept, run_dir)
    except TrainingDiverged as exc:  # a diverged run captured nothing
        return {**result, "diverged": str(exc).splitlines()[0], **dict.fromkeys(metrics, 0.0),
                "train_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
    train_s = time.perf_counter() - t0
    report = _score(run_dir, concept, scorer, eval_seeds, with_base=False)
    return {**result, "diverged": None, **{m: report[m] for m in metrics},
            "final_loss": _final_loss(run_dir), "train_s": round(train_s, 1)}  # fmt: skip


@functools.lru_cache(maxsize=1)
def _scorers(clip: str, dino: str | None):
    """The CLIP / DINO models, loaded once per worker process (every run of it scores with them)."""
    from sai_diffusion.evaluation.alignment import AlignmentModels

    return AlignmentModels.load(clip, dino)


def _score(run_dir: Path, concept, scorer: dict | None, eval_seeds, *, with_base: bool) -> dict:
    """sai-eval's report of one run (not written: the sweep keeps its own results)."""
    from sai_diffusion.evaluation.evaluator import evaluate
    from sai_diffusion.miniature.evaluate import scorers_for

    models = _scorers(scorer["clip"], scorer["dino"]) if scorer else None
    prompts = scorer["prompts"] if scorer else None
    scorers = scorers_for(concept, alignment=models, prompts=prompts)
    return evaluate(run_dir, scorers, prompts=prompts, seeds=eval_seeds, with_base=with_base,
                    write=False)  # fmt: skip


def score_again(result: dict, eval_seeds, scorer: dict | None, metrics) -> dict:
    """``result`` with every figure of ``metrics`` measured anew from its run folder."""
    _, concept, _ = RunDir(result["run"]).read_config()
    report = _score(Path(result["run"]), concept, scorer, eval_seeds, with_base=False)
    return {**result, **{m: report[m] for m in metrics}}


def _rescore(args, stale: list[dict], eval_seeds, metrics, results_path: Path) -> None:
    """Score ``stale`` runs again in the workers and rewrite their lines of results.jsonl."""
    fresh = {}
    with ProcessPoolExecutor(max_workers=args.workers, initializer=_one_thread) as pool:
        futures = [pool.submit(score_again, r, eval_seeds, scorer_of(args), metrics)
                   for r in stale]  # fmt: skip
        for i, future in enumerate(as_completed(futures), 1):
            result = future.result()
            fresh[_key(result)] = result
            print(f"[scored again {i}/{len(stale)}] {_describe(result, metrics)}", flush=True)
    lines = [fresh.get(_key(r), r) for r in _read_results(results_path)]
    atomic_write_text(results_path, "".join(json.dumps(r) + "\n" for r in lines))


def _final_loss(run_dir: Path) -> float | None:
    """Mean loss over the last 50 logged steps."""
    losses = [r["loss"] for r in RunDir(run_dir).read_metrics()[-50:] if "loss" in r]
    return round(statistics.fmean(losses), 5) if losses else None


def _base_scores(args, results: list[dict], eval_seeds: list[int] | None) -> dict | None:
    """The base model's fidelities, measured once per set of evaluation seeds (cached in OUT)."""
    path = args.out / "base.json"
    if path.is_file():
        cached = json.loads(path.read_text(encoding="utf-8"))
        if cached.get("eval_seeds") == eval_seeds and all(m in cached for m in metrics_of(args)):
            return cached
    finished = [r for r in results if not r.get("diverged")]
    if not finished:
        return None
    run = Path(finished[0]["run"])
    _, concept, _ = RunDir(run).read_config()
    report = _score(run, concept, scorer_of(args), eval_seeds, with_base=True)
    base = {m: report.get(f"base_{m}") for m in metrics_of(args)}
    path.write_text(json.dumps({**base, "eval_seeds": eval_seeds}) + "\n", encoding="utf-8")
    return base


# ------------------------------------------------------------------------------ summary
def summarise(
    results: list[dict], optimizers: list[str], metrics: tuple[str, ...] = JUDGE_METRICS
) -> dict[str, dict]:
    """Per optimizer and metric: Peak (best lr's seed mean, its seed std, that lr) and Avg
    (mean over lrs of the seed means; std over seeds of each seed's grid average)."""
    table = {}
    for opt in optimizers:
        mine = [r for r in results if r["optimizer"] == opt]
        if not mine:
            continue
        lrs = sorted({r["lr"] for r in mine})
        seeds = sorted({r["seed"] for r in mine})
        row = {"runs": len(mine), "diverged": sum(bool(r.get("diverged")) for r in mine)}
        for metric in (m for m in metrics if m not in UNRANKED):
            by_lr = {lr: _figures(mine, metric, lr=lr) for lr in lrs}
            means = {lr: statistics.fmean(v) for lr, v in by_lr.items() if v}
            if not means:
                continue
            best = max(means, key=lambda lr: (means[lr], -lr))
            per_seed = [statistics.fmean(v) for s in seeds if (v := _figures(mine, metric, seed=s))]
            row[metric] = {
                "peak": means[best],
                "peak_std": _std(by_lr[best]),
                "peak_lr": best,
                "avg": statistics.fmean(means.values()),
                "avg_std": _std(per_seed),
                "by_lr": means,
            }
        table[opt] = row
    return table


def _ranked(metrics: tuple[str, ...], table: dict | None = None) -> tuple[str, ...]:
    """The metrics with a Peak and Avg (in every row of ``table``, when given)."""
    return tuple(m for m in metrics if m not in UNRANKED
                 and (table is None or all(m in row for row in table.values())))  # fmt: skip


def _figures(results: list[dict], metric: str, *, lr=None, seed=None) -> list[float]:
    """``metric`` of the runs at ``lr`` (or of ``seed``): 0 for a diverged run, none for a run
    that did not measure it (a line from before the figure existed, its folder gone)."""
    out = []
    for r in results:
        if (lr is not None and r["lr"] != lr) or (seed is not None and r["seed"] != seed):
            continue
        value = 0.0 if r.get("diverged") else r.get(metric)
        if value is not None:
            out.append(value)
    return out


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def render_markdown(
    table: dict, results: list[dict], base: dict | None, args, wall: float,
    metrics: tuple[str, ...] = JUDGE_METRICS,
) -> str:  # fmt: skip
    from sai_diffusion.machine import describe_machine  # torch: only once the workers are done

    machine = describe_machine()
    metrics = _ranked(metrics, table)
    first = metrics[0]
    heads = "".join(f" Peak {SHORT[m]} | Avg {SHORT[m]} |" for m in metrics)
    lines = [
        f"| optimizer |{heads} best lr ({SHORT[first]}) | diverged |",
        "|---|" + "---:|---:|" * len(metrics) + "---:|---:|",
    ]
    for opt, row in table.items():
        cells = "".join(
            f" {row[m]['peak']:.3f} ± {row[m]['peak_std']:.3f} | {row[m]['avg']:.3f} ± "
            f"{row[m]['avg_std']:.3f} |"
            for m in metrics
        )
        lines.append(
            f"| {opt} |{cells} {row[first]['peak_lr']:g} | {row['diverged']}/{row['runs']} |"
        )
    if base:
        cells = "".join(f" {base[m]:.3f} | |" if base.get(m) is not None else " | |"
                        for m in metrics)  # fmt: skip
        lines.append(f"| base model (no LoRA) |{cells} | |")
    lrs = sorted({r["lr"] for r in results})
    lines += ["", f"{SHORT[first]} per lr (mean over seeds):", "",
              "| optimizer | " + " | ".join(f"{lr:g}" for lr in lrs) + " |",
              "|---|" + "---:|" * len(lrs)]  # fmt: skip
    for opt, row in table.items():
        by_lr = row[first]["by_lr"]
        cells = [f"{by_lr[lr]:.2f}" if lr in by_lr else "" for lr in lrs]
        lines.append(f"| {opt} | " + " | ".join(cells) + " |")
    train_s = [r["train_s"] for r in results if r.get("train_s")]
    command = "python " + shlex.join(["scripts/bench_quality.py", *sys.argv[1:]])
    lines += [
        "",
        f"Command: `{command}`; {len(results)} runs; this call's wall time {wall:.0f} s with "
        f"{args.workers} workers of 1 thread; median training {statistics.median(train_s):.0f} s "
        f"per run. Machine: {machine['platform']}, {machine['cpu_count']} x {machine['cpu']}.",
    ]
    return "\n".join(lines) + "\n"


def plot(
    results: list[dict], optimizers: list[str], base: dict | None, path: Path,
    metrics: tuple[str, ...] = JUDGE_METRICS,
) -> None:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = _ranked(metrics)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    axes = axes[0]
    for ax, metric in zip(axes, metrics, strict=True):
        for opt in optimizers:
            mine = [r for r in results if r["optimizer"] == opt]
            lrs = sorted({r["lr"] for r in mine})
            if not lrs:
                continue
            lrs = [lr for lr in lrs if _figures(mine, metric, lr=lr)]
            values = [_figures(mine, metric, lr=lr) for lr in lrs]
            if not lrs:
                continue
            ax.errorbar(lrs, [statistics.fmean(v) for v in values],
                        yerr=[_std(v) for v in values], marker="o", capsize=3, label=opt)  # fmt: skip
        if base and base.get(metric) is not None:
            ax.axhline(base[metric], color="grey", linestyle="--", label="base model")
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title(metric.replace("_", " ") if metric in JUDGE_METRICS else SHORT[metric])
        if metric in JUDGE_METRICS + SHAPE_METRICS:
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel({"shape_iou": "best-fit IoU", "shape_share": "share of measured images"}
                          .get(metric, "share of judged images") + " (mean ± std over seeds)")  # fmt: skip
        else:
            ax.set_ylabel("cosine (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    axes[-1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ helpers
def _read_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of an interrupted call
    return out


def _key(result: dict) -> tuple[str, float, int]:
    return result["optimizer"], float(result["lr"]), int(result["seed"])


def _describe(result: dict, metrics: tuple[str, ...] = JUDGE_METRICS) -> str:
    head = f"{result['optimizer']} lr {result['lr']:g} seed {result['seed']}"
    if result.get("diverged"):
        return f"{head}: diverged"
    scores = ", ".join(f"{SHORT[m]} {result[m]:.2f}" for m in metrics
                       if result.get(m) is not None)  # fmt: skip
    return f"{head}: {scores}, loss {result['final_loss']}, {result['train_s']:.0f} s"


if __name__ == "__main__":
    sys.exit(main())
