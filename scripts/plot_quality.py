"""Several quality grids on one plot: scripts/bench_quality.py's results.jsonl files, each
under a label of its own (the same optimizer measured under other settings, side by side).

    python scripts/plot_quality.py --out docs/quality/sai-scale.png \\
        paper=bench/demo-grid/results.jsonl released=bench/demo-released/results.jsonl \\
        sqrt-numel=bench/demo-sqrt-numel/results.jsonl --optimizer sgd-sai

Each LABEL=FILE draws the runs of ``--optimizer`` in FILE as one line per metric panel
(mean ± std over seeds against the lr), as bench_quality.py's own plot does; a base model's
line comes from base.json beside the first file when it is there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import JUDGE_METRICS, SHAPE_METRICS, _read_results, plot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("grids", nargs="+", metavar="LABEL=FILE")
    p.add_argument("--optimizer", default="sgd-sai")
    p.add_argument("--metrics", default=",".join((*JUDGE_METRICS[:1], *SHAPE_METRICS[2:])))
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    results, labels = [], []
    for item in args.grids:
        label, _, path = item.partition("=")
        if not path or not Path(path).is_file():
            print(
                f"error: {item!r}: give LABEL=FILE with an existing results.jsonl", file=sys.stderr
            )
            return 2
        labels.append(label)
        results += [{**r, "optimizer": label} for r in _read_results(Path(path))
                    if r["optimizer"] == args.optimizer]  # fmt: skip
    base_path = Path(args.grids[0].partition("=")[2]).with_name("base.json")
    base = json.loads(base_path.read_text(encoding="utf-8")) if base_path.is_file() else None
    plot(results, labels, base, args.out, tuple(args.metrics.split(",")))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
