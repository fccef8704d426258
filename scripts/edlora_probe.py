"""What the concept words' vectors do during a run: per-row gradient and update norms, SGD-SaI's
scales, and where each row ends up. The measurement behind docs/benchmarks.md's "ED-LoRA under
SGD-SaI" (why layer-wise rows lose the concept there).

    python scripts/edlora_probe.py --out bench/edlora-probe        # the four runs, seed 0
    python scripts/edlora_probe.py --out bench/edlora-tie --runs sgd-sai:edlora \\
        --tie-rows 0.378 --score                                   # the experiment (below)
    python scripts/edlora_probe.py --out bench/edlora-swap \\
        --swap bench/edlora-probe/sgd-sai-plain bench/edlora-probe/sgd-sai-edlora

Each run trains a concept (default: the demo, configs/concepts/demo.yaml) with the recipe
itself, as ``sai-train-lora`` does; global optimizer step hooks record, on every step, each row
of the words' vectors (one row per word, or per word and cross-attention layer with ED-LoRA):
its gradient norm before the step and how far the step moved it. At the end they record every
block's SGD-SaI scale and g-SNR (which block holds the max), and each row's distance from its
initial vector and its cosine to the other rows. Writes OUT/probe.json and OUT/probe.png.

``--tie-rows C`` is the experiment that tests the explanation: before every step, each row's
gradient gets C x the sum of the rows' gradients added, as if every row were a shared vector
plus a row of its own (v_l = s + d_l: s takes the summed gradient, as the one row of a plain
run does). ``--score`` adds sai-eval's figures (judge and shape fits) of every run.
``--swap PLAIN_RUN EDLORA_RUN`` trains nothing: it scores the ED-LoRA run with its rows
replaced (``swap``), to tell whether the rows or the UNet's LoRA lost the concept.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from sai_diffusion import config
from sai_diffusion.training.recipe import run_training

RUNS = ("sgd-sai:plain", "sgd-sai:edlora", "scaled-adamw:plain", "scaled-adamw:edlora")


class Recorder:
    """Global optimizer hooks that follow the embeddings group's tensors, step by step."""

    def __init__(self, tie_rows: float = 0.0) -> None:
        self.optimizer, self.tie_rows = None, tie_rows
        self.grad_norms: list[list[float]] = []  # per step, per row
        self.update_norms: list[list[float]] = []
        self.initial: torch.Tensor | None = None
        self._before: torch.Tensor | None = None
        self._handles = [
            register_optimizer_step_pre_hook(self._pre),
            register_optimizer_step_post_hook(self._post),
        ]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()

    def vectors(self, optimizer) -> torch.Tensor | None:
        groups = [g for g in optimizer.param_groups if g.get("name") == "embeddings"]
        return groups[0]["params"][0] if groups and groups[0]["params"] else None

    def _pre(self, optimizer, args, kwargs) -> None:
        self.optimizer = optimizer
        p = self.vectors(optimizer)
        if p is None or p.grad is None:
            return
        if self.tie_rows:  # every row also takes the rows' summed gradient (module docstring)
            p.grad.add_(p.grad.sum(0, keepdim=True), alpha=self.tie_rows)
        if self.initial is None:
            self.initial = p.detach().clone()
        self._before = p.detach().clone()
        self.grad_norms.append(p.grad.detach().norm(dim=-1).tolist())

    def _post(self, optimizer, args, kwargs) -> None:
        p = self.vectors(optimizer)
        if p is None or self._before is None:
            return
        self.update_norms.append((p.detach() - self._before).norm(dim=-1).tolist())
        self._before = None

    def summary(self) -> dict:
        opt = self.optimizer
        out: dict = {"steps": len(self.grad_norms)}
        p = self.vectors(opt)
        if p is not None and self.initial is not None:
            final = p.detach()
            moved = (final - self.initial).norm(dim=-1)
            unit = torch.nn.functional.normalize(final - self.initial, dim=-1)
            out |= {
                "rows": final.shape[0],
                "initial_norm": self.initial.norm(dim=-1).tolist(),
                "final_norm": final.norm(dim=-1).tolist(),
                "moved": moved.tolist(),
                "direction_cosine": (unit @ unit.T).tolist(),
            }
        blocks = []
        for group in opt.param_groups:
            for q in group["params"]:
                state = opt.state.get(q, {})
                if "scale" in state:
                    blocks.append({"group": group.get("name"), "shape": list(q.shape),
                                   "gsnr": float(state["gsnr"]), "scale": float(state["scale"])})  # fmt: skip
        if blocks:
            top = max(blocks, key=lambda b: b["gsnr"])
            out["blocks"] = blocks
            out["max_block"] = top
            out["vectors_scale"] = [b["scale"] for b in blocks if b["group"] == "embeddings"]
        return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--concept", default="demo")
    p.add_argument("--runs", default=",".join(RUNS), help="optimizer:plain|edlora, comma-separated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("bench/edlora-probe"))
    p.add_argument("--tie-rows", type=float, default=0.0, metavar="C",
                   help="the experiment: add C x the rows' summed gradient to every row's")  # fmt: skip
    p.add_argument("--score", action="store_true", help="sai-eval's figures of every run")
    p.add_argument("--swap", nargs=2, type=Path, metavar=("PLAIN_RUN", "EDLORA_RUN"),
                   help="train nothing: score an ED-LoRA run with its rows replaced (see above)")  # fmt: skip
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.swap:
        swapped = swap(*args.swap, args.out)
        (args.out / "swap.json").write_text(json.dumps(swapped, indent=1) + "\n", encoding="utf-8")
        return 0
    results = {}
    for spec in args.runs.split(","):
        optimizer, variant = spec.split(":")
        items = ["checkpoint_every=0", f"edlora={'true' if variant == 'edlora' else 'false'}",
                 *args.set_items]  # fmt: skip
        cfg, concept = config.resolve(args.concept, {"optimizer": optimizer, "seed": args.seed},
                                      items)  # fmt: skip
        run_dir = args.out / spec.replace(":", "-")
        shutil.rmtree(run_dir, ignore_errors=True)
        recorder = Recorder(args.tie_rows)
        try:
            run_training(cfg, concept, run_dir)
        finally:
            recorder.close()
        results[spec] = {**recorder.summary(), "grad_norms": recorder.grad_norms,
                         "update_norms": recorder.update_norms}  # fmt: skip
        if args.score:
            results[spec]["scores"] = score(run_dir, concept)
        print(spec, json.dumps({k: v for k, v in results[spec].items()
                                if k in ("moved", "vectors_scale", "max_block", "scores")}))  # fmt: skip
    (args.out / "probe.json").write_text(json.dumps(results) + "\n", encoding="utf-8")
    plot(results, args.out / "probe.png")
    return 0


def score(run_dir: Path, concept) -> dict:
    """The judge's and the shape fits' headline figures of the run (not written to it)."""
    from sai_diffusion.evaluation.evaluator import evaluate
    from sai_diffusion.miniature.evaluate import scorers_for

    report = evaluate(run_dir, scorers_for(concept), with_base=False, write=False)
    keys = ("concept_fidelity", "prompt_fidelity", "shape_iou", "class_shape_iou", "shape_share")
    return {k: report[k] for k in keys}


def swap(plain: Path, edlora: Path, out: Path) -> dict:
    """Score the ED-LoRA run with its rows as trained, every row set to the rows' mean, to the
    plain run's vector, and to each one row (the ED-LoRA run's UNet LoRA kept throughout)."""
    import safetensors
    from safetensors.torch import load_file, save_file

    from sai_diffusion.files.run_dir import RunDir

    _, concept, _ = RunDir(edlora).read_config()
    with safetensors.safe_open(edlora / "edlora.safetensors", framework="pt") as f:
        meta = f.metadata()
    rows = load_file(edlora / "edlora.safetensors")
    token = load_file(plain / "embeddings.safetensors")
    variants = {
        "as trained": rows,
        "every row the rows' mean": {
            w: r.mean(0, keepdim=True).expand_as(r).contiguous() for w, r in rows.items()
        },  # fmt: skip
        "every row the plain run's vector": {
            w: token[w].expand_as(r).contiguous() for w, r in rows.items()
        },  # fmt: skip
    }
    layers = next(iter(rows.values())).shape[0]
    for k in range(layers):  # does any one row draw the concept in every layer?
        variants[f"every row row {k}"] = {
            w: r[k : k + 1].expand_as(r).contiguous() for w, r in rows.items()
        }
    report = {}
    for name, vectors in variants.items():
        copy = out / name.replace(" ", "-").replace("'", "")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(edlora, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
        save_file(vectors, copy / "edlora.safetensors", metadata=meta)
        report[name] = score(copy, concept)
        print(name, report[name], flush=True)
    return report


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(4.2 * len(results), 6.5), squeeze=False)
    for col, (spec, r) in enumerate(results.items()):
        for row, (key, title) in enumerate((("grad_norms", "gradient norm per row"),
                                            ("update_norms", "cumulative distance per row"))):  # fmt: skip
            ax = axes[row][col]
            values = torch.tensor(r[key]) if r[key] else torch.zeros(0, 1)
            if key == "update_norms":
                values = values.cumsum(0)
            for i in range(values.shape[1]):
                ax.plot(values[:, i].numpy(), lw=0.8, label=f"row {i}")
            ax.set_title(f"{spec}: {title}", fontsize=9)
            ax.set_xlabel("step")
            if key == "grad_norms":
                ax.set_yscale("log")
        axes[1][col].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
