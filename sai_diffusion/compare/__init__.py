"""Runs side by side: one base model, the same prompts, seeds and sampler for every run
(``comparer``), the labelled grid (``grid``, ``labels``), the HTML report beside it (``report``),
and the views of how each run trained (``views``: loss curves, g-SNR per block, cost).

The names below are the library API that ``sai-compare`` and the app are built on:

    from sai_diffusion.compare import Comparer, find_runs, load_run_info, make_grid, write_report
"""

from ..files.run_dir import EVAL_FILE, RunInfo, find_runs, load_run_info
from ..models.sampling import SCHEDULER
from .comparer import SEED_LIMIT, Comparer, Comparison, check_seeds
from .grid import TITLE_LINES, GridLayout, grid_layout, make_grid
from .labels import BASE_ROW, row_labels
from .report import write_report

__all__ = [
    "BASE_ROW", "EVAL_FILE", "SCHEDULER", "SEED_LIMIT", "TITLE_LINES", "Comparer", "Comparison",
    "GridLayout", "RunInfo", "check_seeds", "find_runs", "grid_layout", "load_run_info", "make_grid",
    "row_labels", "write_report",
]  # fmt: skip
