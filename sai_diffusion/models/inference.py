"""One way to load finished runs for drawing images: the base model once, each run's adapter.

    model = RunModels([load_run_info(d) for d in run_dirs])   # base + every run's adapter
    with model.active(model.runs[0].name, weight=0.7) as pipe:
        image = generate(pipe, "a pencil sketch of <Vpotter>", seed, settings)

    words = load_run(pipe, "RUN")                # one run's files into any diffusers pipeline

A run is its words' vectors (``embeddings.safetensors``) or, for ED-LoRA, its layer-wise vectors
(``edlora.safetensors``), and its LoRA (``lora.safetensors``, through diffusers'
``load_lora_weights``; a DoRA run's text-encoder magnitudes restored, ``files.lora_files``), at
a LoRA weight (0 gives the base model's UNet and text encoder with the run's words). Each run is
its own peft adapter, switched on by ``active``; runs of one concept share the words' names, so
their rows are overwritten with the run's vectors before its images. ``active(None)`` is the
base model itself.

sai-sample, sai-compare, the app and sai-eval all draw through here; training draws its
validation samples from its live modules (``models.sampling``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import re
import threading
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch

from ..errors import UserError, first_line
from ..files.lora_files import read_embeddings, restore_text_encoder_magnitudes
from ..files.mix_of_show import read_edlora
from ..files.run_dir import RunDir, RunInfo
from . import edlora
from .base import load_base
from .family import family_of
from .tokens import set_token_embeddings

BASE_NAME = "base"  # no run may be called so: the base model's name where runs are named
RESTORE = "train the run again or restore the file"  # the fix for a run file that is damaged


@dataclass
class RunWords:
    """A loaded run's words: the vectors of its tokens (plain words, or ED-LoRA's layer
    tokens) and, for ED-LoRA, the layer-wise words."""

    vectors: dict[str, torch.Tensor]
    layerwise: edlora.LayerWords | None = None


@dataclass(frozen=True)
class RunFiles:
    """A run's word files, read: its words' vectors, or ED-LoRA's (vectors, layer names)."""

    run: RunDir
    vectors: dict[str, torch.Tensor]
    layerwise: tuple | None

    @classmethod
    def read(cls, run_dir: Path) -> RunFiles:
        """Raises UserError for a missing or unreadable embeddings or edlora file."""
        run = RunDir(run_dir)
        if (
            run.is_run
            and run.is_finished
            and not run.embeddings.is_file()
            and not run.edlora.is_file()
        ):
            # every run writes its words' vectors; without them its images lack the concept
            edlora_run = run.is_run and run.read_config()[0].embeddings.edlora
            missing = run.edlora if edlora_run else run.embeddings
            raise UserError(f"{missing} not found: it holds the vectors of the run's words, "
                            f"without which its images lack the concept; {RESTORE}")  # fmt: skip
        return cls(run, read_embeddings(run.path), read_edlora(run.path))


def check_lora_file(path: Path) -> None:
    """A run's LoRA file, read as far as its header: whole, and every module's two factors
    there, of one rank (down (r, in, ...), up (out, r, ...)). What only the model can tell (a
    factor of the wrong width) is ``add_run_adapter``'s to find.

    Raises:
        UserError: a file cut short or unreadable, a factor without its pair, or a pair whose
            ranks differ.
    """
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            keys = f.keys()  # safe_open has no __iter__
            shapes = {key: f.get_slice(key).get_shape() for key in keys}
    except (safetensors.SafetensorError, OSError) as e:
        raise UserError(
            f"{path} is not a readable LoRA file ({first_line(e)}); {RESTORE}"
        ) from None
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, shape in shapes.items():
        for side in ("down", "up"):
            if key.endswith(f".{side}.weight"):
                pairs.setdefault(key[: -len(f".{side}.weight")], {})[side] = shape
    for module, pair in pairs.items():
        if len(pair) < 2:  # peft would leave the other one empty and fail when it is used
            (has,) = pair
            raise UserError(f"{path}: {module} has its {has} factor but not its "
                            f"{'up' if has == 'down' else 'down'} one; {RESTORE}")  # fmt: skip
        if pair["down"][0] != pair["up"][1]:
            raise UserError(f"{path}: the factors of {module} do not fit together (down "
                            f"{tuple(pair['down'])}, up {tuple(pair['up'])}); {RESTORE}")  # fmt: skip


def add_run_words(pipe, run: Path | RunFiles) -> RunWords:
    """A run's words into ``pipe`` (a token it lacks is added, one it has gets the run's row).
    Before any adapter: resizing the embedding table must not meet peft's wrappers.

    Raises:
        UserError: an unreadable embeddings or edlora file, or one of another base model.
    """
    files = run if isinstance(run, RunFiles) else RunFiles.read(run)
    set_token_embeddings(pipe, files.vectors)
    if files.layerwise is None:
        return RunWords(files.vectors)
    words = edlora.apply_layerwise(pipe, *files.layerwise, where=str(files.run.edlora))
    return RunWords(edlora.vectors_by_token(files.layerwise[0]), words)


def add_run_adapter(pipe, run_dir: Path, adapter: str) -> None:
    """A run's LoRA into ``pipe`` as peft adapter ``adapter`` (a DoRA run's text-encoder
    magnitudes restored: diffusers 0.42 leaves them at their initial values).

    Raises:
        UserError: no lora.safetensors, a damaged one (``check_lora_file``), or one that does
            not load onto this model.
    """
    lora = RunDir(run_dir).lora
    if not lora.is_file():
        raise UserError(f"{lora} not found: is {run_dir} a finished sai-train-lora run folder?")
    check_lora_file(lora)
    # Several adapters per model are the point here, and a run without text-encoder LoRA
    # is normal: silence the warnings diffusers and peft give for both.
    lora_log = logging.getLogger("diffusers.loaders.lora_base")
    level = lora_log.level
    lora_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            pipe.load_lora_weights(lora.parent, weight_name=lora.name, adapter_name=adapter)
        for part in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, part, None) is not None:
                restore_text_encoder_magnitudes(getattr(pipe, part), lora, adapter, part=part)
    except Exception as e:  # diffusers/peft raise ValueError, KeyError, OSError, ...
        raise UserError(
            f"Could not load {lora} onto this base model ({_misfit(e, adapter)}): the file was "
            f"changed or is of another base model; {RESTORE}"
        ) from e
    finally:
        lora_log.setLevel(level)


def _misfit(error: Exception, adapter: str) -> str:
    """What did not load: the first size mismatch of a state-dict error (whose first line
    names only the model), else the error's first line."""
    found = re.search(r"size mismatch for (\S+): .*?(\[[\d, ]*\]).*?(\[[\d, ]*\])", str(error))
    if found is None:
        return first_line(error)
    name, theirs, ours = found.groups()
    return f"{name.replace(f'.{adapter}', '')} is {theirs} in the file, {ours} in the model"


def load_run(pipe, run_dir: Path, *, adapter: str = "run", weight: float = 1.0) -> RunWords:
    """One run's files into a diffusers pipeline of its base model (``add_run_words``, then
    ``add_run_adapter``), its LoRA active at ``weight``; returns its words (ED-LoRA runs: the
    layer-wise words are the UNet's words in use).

    Raises:
        UserError: see ``add_run_words`` and ``add_run_adapter``.
    """
    words = add_run_words(pipe, Path(run_dir))
    add_run_adapter(pipe, Path(run_dir), adapter)
    pipe.set_adapters([adapter], adapter_weights=[weight])
    return words


class RunModels:
    """One base model with every run's LoRA loaded as its own adapter.

    ``runs`` are the given runs, in order; a run whose folder name repeats another's (or is
    "base") is renamed ``parent/name``, and that name is what ``active`` takes. ``active``
    holds a lock: the pipeline's active adapter, its weight and the words' rows are shared
    state, so threads sharing one model (app requests) never draw one run with another's.
    ``scheduler``: "dpm-solver" (DPM-Solver++ from the model's noise schedule, as comparisons
    draw) or "native" (the model's own, as sai-sample draws).

    Raises:
        UserError: no runs, an unfinished run, a run given twice, runs on different base
            models, or files that do not load.
    """

    def __init__(
        self,
        runs: Sequence[RunInfo],
        *,
        device: str | torch.device | None = None,
        scheduler: str = "dpm-solver",
    ) -> None:
        self.runs = checked_runs(runs)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self._lock = threading.Lock()
        # files first: a bad one fails before the model loads
        files = {r.name: RunFiles.read(r.path) for r in self.runs}
        for run in self.runs:
            check_lora_file(run.files.lora)
        cfg, _, _ = _base_source(self.runs).files.read_config()
        base = load_base(cfg)
        self.family = family_of(base)
        self.pipe = self.family.sampling_pipeline(base, scheduler=scheduler)
        # every run's words before any adapter (add_run_words), then the adapters
        self._words = {name: add_run_words(self.pipe, read) for name, read in files.items()}
        edlora.set_layer_words(self.pipe.unet, None)
        self._adapters = {r.name: f"r{i}_" + re.sub(r"\W", "_", r.name)  # peft: no "."
                          for i, r in enumerate(self.runs)}  # fmt: skip
        for run in self.runs:
            add_run_adapter(self.pipe, run.path, self._adapters[run.name])
        self.pipe.to(self.device)

    @contextlib.contextmanager
    def active(self, run_name: str | None, weight: float = 1.0) -> Iterator:
        """Hold the pipeline with run ``run_name``'s LoRA (at ``weight``) and words switched on,
        or with LoRA off for None (the base model)."""
        with self._lock:
            if run_name is None:
                edlora.set_layer_words(self.pipe.unet, None)
                self.pipe.disable_lora()
                try:
                    yield self.pipe
                finally:
                    self.pipe.enable_lora()
                return
            words = self._words[run_name]
            set_token_embeddings(self.pipe, words.vectors)
            edlora.set_layer_words(self.pipe.unet, words.layerwise)
            self.pipe.set_adapters([self._adapters[run_name]], adapter_weights=[weight])
            yield self.pipe


def checked_runs(runs: Sequence[RunInfo]) -> list[RunInfo]:
    """``runs`` checked to be drawable side by side, each under a name of its own.

    Raises:
        UserError: no runs, a run given twice, an unfinished run, runs on different bases.
    """
    if not runs:
        raise UserError("No runs given: pass one or more run folders of sai-train-lora.")
    twice = [str(p) for p, n in Counter(r.path for r in runs).items() if n > 1]
    if twice:
        raise UserError(f"Run {twice[0]} is given twice; give each run folder once.")
    unfinished = [r for r in runs if not r.has_lora]
    if unfinished:
        r = unfinished[0]
        raise UserError(
            f"{r.path} has no {r.files.lora.name}: the run has not finished. Resume it with "
            f"`sai-train-lora --resume {r.path}`, or leave it out."
        )
    first = runs[0]
    for run in runs[1:]:
        if run.base_identity != first.base_identity:
            raise UserError(
                f"Runs on different base models cannot be drawn side by side: {first.name} was "
                f"trained on {first.base_model} ({first.base_model_hash}), {run.name} on "
                f"{run.base_model} ({run.base_model_hash}). A LoRA only means something on its "
                "own base model; compare the runs of each base model separately."
            )
    names = Counter(r.name for r in runs)
    out, taken = [], set()
    for run in runs:
        name = run.name
        if names[name] > 1 or name == BASE_NAME:
            name = f"{run.path.parent.name}/{run.name}"
        unique, k = name, 2
        while unique in taken:
            unique, k = f"{name} ({k})", k + 1
        taken.add(unique)
        out.append(dataclasses.replace(run, name=unique))
    return out


def _base_source(runs: list[RunInfo]) -> RunInfo:
    """The first run whose base model is still where it was (runs may name copies of one
    model); else the first run, whose loader error then names the missing path."""
    for run in runs:
        if run.base_model and Path(run.base_model).expanduser().exists():
            return run
    return runs[0]
