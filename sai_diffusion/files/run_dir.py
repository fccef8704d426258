"""A run folder: the name of every file and folder ``sai-train-lora`` writes, and reading one back.

    RUN/
      run.yaml                  resolved settings and concept     RunDir.write_config, read_config
      metrics.jsonl             one JSON record per logged step   append_metrics, read_metrics
      lora.safetensors          the LoRA, diffusers keys          files.lora_files
      lora_kohya.safetensors    the LoRA, kohya / A1111 keys      files.lora_files
      embeddings.safetensors    concept-token vectors (TI format) files.lora_files
      edlora.safetensors        ED-LoRA runs: layer-wise vectors  files.mix_of_show
                                (instead of embeddings.safetensors)
      gsnr.json                 SGD-SaI's g-SNR and scale         write_gsnr, read_gsnr
      ema/                      ema_decay > 0: the same LoRA and  RunDir.ema
                                token files, of the averages
      eval.json                 sai-eval's scores                 write_scores, read_scores
      eval/                     the images sai-eval scored:       RunDir.eval_images
                                pNN-sS.png, base/pNN-sS.png
      samples/<tag>/            pNN-sS.png (prompt NN, seed S)    sample_name, read_samples
                                and prompts.txt
      checkpoints/step-NNNNNN/  trainable.safetensors,            RunDir.checkpoint, Checkpoint
                                optimizer.pt, lr_scheduler.pt,
                                scaler.pt (fp16), state.json
                                (written last: complete)
      tensorboard/

This module is the only one that spells these names. A run may still be training while it is
read, so the readers treat a missing file or a torn last line as "not there yet".
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from ..config import Concept, TrainConfig, apply_overrides, yaml_problem
from ..config.loading import read_yaml_file
from ..config.settings import flat_settings
from ..errors import UserError
from ..fsutil import atomic_write_text, naming, write_json

RUN_FILE = "run.yaml"
METRICS_FILE = "metrics.jsonl"
LORA_FILE = "lora.safetensors"
KOHYA_FILE = "lora_kohya.safetensors"
EMBEDDINGS_FILE = "embeddings.safetensors"
EDLORA_FILE = "edlora.safetensors"
GSNR_FILE = "gsnr.json"
EVAL_FILE = "eval.json"
EMA_DIR = "ema"  # ema_decay > 0: the averaged LoRA and token files, named as in the run
EVAL_DIR = "eval"  # the images sai-eval scored; the base model's in eval/base
SAMPLES_DIR = "samples"
FINAL_SAMPLES = "final"  # samples/final: drawn when training ends
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_PREFIX = "step-"
TENSORBOARD_DIR = "tensorboard"
PROMPTS_FILE = "prompts.txt"  # in a samples folder: line NN is the prompt of pNN-*.png

# settings older runs stored that no longer exist (they never changed what a run did)
_RETIRED_SETTINGS = ("concept", "output_dir", "num_workers")
_SAMPLE_NAME = re.compile(r"p(\d+)-s(-?\d+)\.png")


# ---------------------------------------------------------------------------- checkpoints
@dataclass(frozen=True)
class Checkpoint:
    """``checkpoints/step-NNNNNN/``: what resuming needs. ``state.json`` is written last, so
    a folder without it is incomplete."""

    path: Path

    @property
    def trainable(self) -> Path:  # the trained tensors by name (LoRA factors, token vectors)
        return self.path / "trainable.safetensors"

    @property
    def optimizer(self) -> Path:
        return self.path / "optimizer.pt"

    @property
    def lr_scheduler(self) -> Path:
        return self.path / "lr_scheduler.pt"

    @property
    def scaler(self) -> Path:  # fp16's GradScaler
        return self.path / "scaler.pt"

    @property
    def state(self) -> Path:
        return self.path / "state.json"

    def write_state(self, step: int) -> None:
        self.state.write_text(json.dumps({"step": step}), encoding="utf-8")

    def step(self) -> int | None:
        """The step it was taken after; None for an incomplete or unreadable checkpoint."""
        try:
            return int(json.loads(self.state.read_text(encoding="utf-8"))["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None


# ------------------------------------------------------------------------------ the folder
@dataclass(frozen=True)
class RunDir:
    """The files of one run folder (which need not exist yet)."""

    path: Path

    def __post_init__(self) -> None:  # accept a str or any path-like
        object.__setattr__(self, "path", Path(self.path))

    # -- paths
    @property
    def run_yaml(self) -> Path:
        return self.path / RUN_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def lora(self) -> Path:
        return self.path / LORA_FILE

    @property
    def kohya(self) -> Path:
        return self.path / KOHYA_FILE

    @property
    def embeddings(self) -> Path:
        return self.path / EMBEDDINGS_FILE

    @property
    def edlora(self) -> Path:
        """ED-LoRA runs' layer-wise embeddings (one (L, D) tensor per word)."""
        return self.path / EDLORA_FILE

    @property
    def gsnr(self) -> Path:
        return self.path / GSNR_FILE

    @property
    def scores(self) -> Path:  # eval.json
        """sai-eval's report."""
        return self.path / EVAL_FILE

    @property
    def ema(self) -> RunDir:
        """``ema/``: the exponential moving average's file set, named as the run's own."""
        return RunDir(self.path / EMA_DIR)

    def eval_images(self, *, base: bool = False) -> Path:
        """``eval/`` (the run's images that sai-eval scored) or ``eval/base``."""
        return self.path / EVAL_DIR / ("base" if base else "")

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD_DIR

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def samples(self, tag: str = FINAL_SAMPLES) -> Path:
        """``samples/<tag>``: ``final``, ``step-000250`` (validation during training), or
        ``sai-sample``."""
        return self.path / SAMPLES_DIR / tag

    @property
    def is_run(self) -> bool:
        return self.run_yaml.is_file()

    @property
    def is_finished(self) -> bool:
        return self.lora.is_file()

    # -- run.yaml
    def write_config(self, cfg: TrainConfig, concept: Concept, extra: dict[str, Any]) -> None:
        """run.yaml: ``config`` (every setting, in its sections), ``concept`` (as loaded) and
        ``extra`` entries."""
        concept_entry = dataclasses.asdict(concept)
        concept_entry["path"], concept_entry["data"] = str(concept.path), str(concept.data)
        data = {"config": cfg.to_dict(), "concept": concept_entry, **extra}
        atomic_write_text(self.run_yaml, yaml.safe_dump(data, sort_keys=False))

    def read_config(self) -> tuple[TrainConfig, Concept, dict[str, Any]]:
        """The run's settings, its concept, and the whole file (``lr``, ``base_model_hash``,
        ``token_ids`` beside them). A run.yaml of an earlier version, its settings flat, reads
        the same way (``config.settings.FLAT``).

        Raises:
            UserError: the folder has no run.yaml, or an unreadable one.
        """
        if not self.is_run:
            raise UserError(
                f"{self.path} is not a run directory (no {RUN_FILE}); pass the folder that "
                "sai-train-lora wrote"
            )
        try:
            data = read_yaml_file(self.run_yaml)  # bounded, UTF-8 checked, one UserError
            saved = {k: v for k, v in data["config"].items() if k not in _RETIRED_SETTINGS}
            if flat_settings(saved):  # written before sections existed
                saved.setdefault("sai_eps", 1e-8)  # and before sai_eps existed: 1e-8 then
            cfg = apply_overrides(TrainConfig(), saved, str(self.run_yaml))
            c = dict(data["concept"])
            concept = Concept(**{**c, "path": Path(c["path"]), "data": Path(c["data"])})
        except (yaml.YAMLError, KeyError, TypeError, AttributeError) as exc:
            raise UserError(
                f"{self.run_yaml}: unreadable run file ({yaml_problem(exc)}); it was not "
                "written by this version of sai-train-lora"
            ) from None
        return cfg, concept, data

    # -- metrics.jsonl
    def append_metrics(self, record: dict[str, Any]) -> None:
        with naming(self.metrics), self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records in step order; unreadable lines are skipped (a line being written while
        we read is torn)."""
        try:
            text = self.metrics.read_text(encoding="utf-8")
        except (FileNotFoundError, UnicodeDecodeError):
            return []
        records = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                records.append(record)
        return sorted(records, key=lambda r: r["step"])

    def truncate_metrics(self, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run writes the later ones again)."""
        if self.metrics.is_file():
            kept = [r for r in self.read_metrics() if r["step"] <= step]
            atomic_write_text(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # -- gsnr.json and eval.json
    def write_gsnr(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_text(self.gsnr, json.dumps(rows, indent=1))

    def read_gsnr(self) -> list[dict[str, Any]]:
        """One row per trained tensor (name, numel, scale, ...); [] when the run did not use
        SGD-SaI or has not finished."""
        rows = _read_json(self.gsnr)
        if not isinstance(rows, list):
            return []
        return [r for r in rows if isinstance(r, dict) and "name" in r]

    def write_scores(self, report: dict[str, Any]) -> None:
        write_json(self.scores, report)

    def read_scores(self) -> dict[str, Any] | None:
        scores = _read_json(self.scores)
        return scores if isinstance(scores, dict) else None

    # -- checkpoints
    def checkpoint(self, step: int) -> Checkpoint:
        return Checkpoint(self.checkpoints_dir / step_tag(step))

    def checkpoint_folders(self) -> list[Checkpoint]:
        """Every ``step-*`` folder, complete or not, oldest first."""
        return [Checkpoint(p) for p in sorted(self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*"))]

    def stale_checkpoint_temps(self) -> list[Path]:
        """Temporary checkpoint folders a killed write left (``fsutil.atomic_dir`` names)."""
        return sorted(self.checkpoints_dir.glob(f".{CHECKPOINT_PREFIX}*.tmp"))

    def complete_checkpoints(self) -> list[tuple[int, Checkpoint]]:
        """The complete checkpoints (``state.json`` written last), newest first, with steps."""
        complete = [(step, c) for c in self.checkpoint_folders() if (step := c.step()) is not None]
        return sorted(complete, key=lambda sc: sc[0], reverse=True)

    def latest_checkpoint(self) -> tuple[int, Checkpoint] | None:
        """The complete checkpoint of the highest step, with that step."""
        complete = self.complete_checkpoints()
        return complete[0] if complete else None


def step_tag(step: int) -> str:
    """``step-000250``: the name of a step's checkpoint and of its validation samples."""
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------------- samples
def sample_name(prompt_index: int, seed: int) -> str:
    """``p02-s7.png``: prompt 2 of the folder's prompts.txt, seed 7."""
    return f"p{prompt_index:02d}-s{seed}.png"


def write_prompts(folder: Path, prompts: list[str]) -> None:
    (Path(folder) / PROMPTS_FILE).write_text("\n".join(prompts) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Sample:
    path: Path
    prompt: str  # from prompts.txt; the file name when it is not there
    seed: int | None


def read_samples(folder: Path) -> list[Sample]:
    """The images of a samples folder with their prompts and seeds, sorted by file name."""
    folder = Path(folder)
    try:
        prompts = (folder / PROMPTS_FILE).read_text(encoding="utf-8").splitlines()
    except OSError:
        prompts = []
    samples = []
    for path in sorted(folder.glob("p*-s*.png")):
        m = _SAMPLE_NAME.fullmatch(path.name)
        index = int(m.group(1)) if m else -1
        prompt = prompts[index] if 0 <= index < len(prompts) else path.stem
        samples.append(Sample(path, prompt, int(m.group(2)) if m else None))
    return samples


# ------------------------------------------------------------------------------- run info
@dataclass
class RunInfo:
    """What comparisons and the app show about one run folder (from run.yaml, the LoRA header,
    eval.json)."""

    path: Path
    name: str  # the folder name; also the key of the run's images
    concept: str
    token: str
    optimizer: str
    lr: float
    steps: int  # steps trained (the LoRA's header), or logged so far when unfinished
    rank: int
    alpha: float
    base_model: str | None
    base_model_hash: str | None
    resolution: int
    validation_prompts: list[str]  # with the token filled in
    scores: dict[str, Any] | None  # eval.json, when sai-eval has scored the run
    has_lora: bool  # False: an unfinished run
    class_word: str = ""
    edlora: bool = False  # layer-wise embeddings (edlora.safetensors)

    @property
    def files(self) -> RunDir:
        return RunDir(self.path)

    @property
    def base_identity(self) -> str:
        """The base model's content hash where known, else its path: runs with the same
        identity can share a comparison (a LoRA only means something on its base model)."""
        return self.base_model_hash or f"path:{self.base_model}"


def load_run_info(run_dir: str | os.PathLike[str]) -> RunInfo:
    """Read a folder written by ``sai-train-lora``.

    Raises:
        UserError: the folder has no run.yaml or an unreadable one.
    """
    run = RunDir(Path(run_dir).expanduser().resolve())
    cfg, concept, data = run.read_config()
    lr = data.get("lr")
    return RunInfo(
        path=run.path,
        name=run.path.name,
        concept=concept.name,
        token=concept.text,  # as prompts say it: the words joined by spaces
        optimizer=cfg.optimizer.name,
        lr=float(lr) if isinstance(lr, int | float) else cfg.resolved_lr(concept),
        steps=_trained_steps(run),
        rank=cfg.lora.rank,
        alpha=cfg.lora.alpha,
        base_model=cfg.base.model,
        base_model_hash=data.get("base_model_hash"),
        resolution=cfg.resolution,
        validation_prompts=concept.prompts(),
        scores=run.read_scores(),
        has_lora=run.is_finished,
        class_word=concept.class_text,
        edlora=cfg.embeddings.edlora,
    )


def find_runs(root: str | os.PathLike[str]) -> list[RunInfo]:
    """Every run folder under ``root`` (itself included), sorted by path.

    Unfinished runs are listed with ``has_lora`` False; folders whose run.yaml does not parse
    are left out. A run's own subfolders (checkpoints, samples) are not searched.
    """
    runs = []
    for folder, subdirs, files in os.walk(Path(root).expanduser()):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))  # .tmp: atomic writes
        if RUN_FILE not in files:
            continue
        subdirs[:] = []
        try:
            runs.append(load_run_info(Path(folder)))
        except Exception:  # anything unreadable is not a run to offer
            continue
    return sorted(runs, key=lambda r: str(r.path))


def index_runs(root: str | os.PathLike[str]) -> dict[str, RunInfo]:
    """Every run under ``root`` keyed by its path relative to ``root`` (``potter/sgd-sai-...``),
    which stays unique where folder names repeat across concepts."""
    root = Path(root).expanduser().resolve()
    index = {}
    for info in find_runs(root):
        try:
            key = info.path.relative_to(root).as_posix()
        except ValueError:  # a run reached through a symlink out of root: keep its name
            key = info.name
        index[key if key != "." else info.name] = info
    return index


def latest_run(root: str | os.PathLike[str]) -> RunDir | None:
    """The run under ``root`` whose run.yaml changed last, among those with checkpoints."""
    runs = sorted(Path(root).rglob(RUN_FILE), key=lambda p: p.stat().st_mtime)
    resumable = [RunDir(p.parent) for p in runs if RunDir(p.parent).checkpoints_dir.is_dir()]
    return resumable[-1] if resumable else None


def _trained_steps(run: RunDir) -> int:
    """The LoRA header's step count; for an unfinished run, the last logged step."""
    try:
        with safe_open(str(run.lora), framework="pt") as f:
            return int((f.metadata() or {})["max_train_steps"])
    except Exception:  # no LoRA yet (or an odd one): count the logged steps instead
        pass
    return max((r["step"] for r in run.read_metrics()), default=0)
