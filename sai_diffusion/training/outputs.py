"""The files a finished run leaves, and the moving average that may go with them.

lora.safetensors, lora_kohya.safetensors   the LoRA (files.lora_files, named by the family)
embeddings.safetensors                     the concept words' vectors (textual inversion)
edlora.safetensors                         instead, for ED-LoRA: (L, D) per word
gsnr.json                                  SGD-SaI's per-tensor g-SNR and scale
ema/...                                    the same LoRA and word files, of the averages
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Concept, TrainConfig
from ..errors import first_line
from ..files.lora_files import FileKeys, save_embeddings, save_lora
from ..files.mix_of_show import save_edlora
from ..files.run_dir import RunDir
from ..models import edlora
from ..optim import SGDSaI
from .adapters import Adapters


class MetricsLog:
    """A run's log: each record appended to metrics.jsonl and its loss, validation loss and
    learning rates to TensorBoard (when it imports: a run must not die for a log). Use it as a
    context manager; only the main process writes."""

    def __init__(self, run_dir: RunDir, *, enabled: bool = True) -> None:
        self.run_dir, self.enabled = run_dir, enabled
        self.writer = None
        if enabled:
            try:  # the one optional import: tensorboard is a dependency, but only a log
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                SummaryWriter = None  # noqa: N806
            if SummaryWriter is not None:
                self.writer = SummaryWriter(str(run_dir.tensorboard))

    def __enter__(self) -> MetricsLog:
        # TensorBoard writes from a thread of its own; a failed write there (a full disk) must
        # not print a traceback beside the run's one-line error: one warning, then quiet
        self._hook, self._warned = threading.excepthook, False
        threading.excepthook = self._background_failure
        return self

    def __exit__(self, *exc) -> None:
        try:
            if self.writer is not None:
                with contextlib.suppress(OSError):  # the same full disk, at the final flush
                    self.writer.close()
        finally:
            threading.excepthook = self._hook

    def _background_failure(self, args) -> None:
        if args.exc_type is SystemExit:
            return
        if not self._warned:
            self._warned = True
            print(f"warning: the TensorBoard log of {self.run_dir.path} stopped "
                  f"({first_line(args.exc_value)}); {self.run_dir.metrics.name} goes on",
                  file=sys.stderr)  # fmt: skip

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.run_dir.append_metrics(record)
        if self.writer is not None:
            step = record["step"]
            self.writer.add_scalar("loss", record["loss"], step)
            if "val_loss" in record:
                self.writer.add_scalar("val_loss", record["val_loss"], step)
            for name, value in record["lr"].items():
                self.writer.add_scalar(f"lr/{name}", value, step)


def check_scales_agree(optimizer: torch.optim.Optimizer, accelerator) -> None:
    """Under DDP every rank must hold the same SGD-SaI scales: g-SNR comes from all-reduced
    gradients, so a difference would mean the ranks trained different models."""
    if accelerator.num_processes == 1 or not isinstance(optimizer, SGDSaI):
        return
    table = optimizer.gsnr_table()
    scales = torch.tensor([r["scale"] if r["initialised"] else -1.0 for r in table])
    every = accelerator.gather(scales[None].to(accelerator.device)).cpu()
    if not torch.equal(every, every[:1].expand_as(every)):
        raise RuntimeError("SGD-SaI scales differ between ranks: the gradients were not synced")


class EMA:
    """An exponential moving average of every trained tensor, starting at their initial values:
    ``avg = decay * avg + (1 - decay) * value`` after each step. Its tensors are checkpointed
    beside the trained ones (``state``)."""

    PREFIX = "ema:"  # their names in a checkpoint

    def __init__(self, trainable: Mapping[str, nn.Parameter], decay: float) -> None:
        self.trainable, self.decay = trainable, decay
        self.average = {n: p.detach().clone() for n, p in trainable.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.trainable.items():
            self.average[name].mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The averages under checkpoint names; restoring writes into these very tensors."""
        return {f"{self.PREFIX}{n}": t for n, t in self.average.items()}

    @contextlib.contextmanager
    def applied(
        self, text_encoders: Mapping[str, nn.Module] | nn.Module, token_ids: list[int]
    ) -> Iterator[None]:
        """The trained tensors (and the baked token rows of each text encoder, by part name:
        ``{"text_encoder": module, ...}``; a module alone is the first) holding the averages,
        then the raw values back."""
        if isinstance(text_encoders, nn.Module):
            text_encoders = {"text_encoder": text_encoders}
        raw = {n: p.detach().clone() for n, p in self.trainable.items()}
        tables = {part: m.get_input_embeddings().weight for part, m in text_encoders.items()}
        ids = torch.tensor(token_ids, device=next(iter(tables.values())).device)
        rows = {part: table[ids].detach().clone() for part, table in tables.items()}
        try:
            with torch.no_grad():
                for name, p in self.trainable.items():
                    p.copy_(self.average[name])
                    if name.endswith(".vectors"):  # baked: the table's rows are what files read
                        table = tables[name.split(".")[0]]
                        table[ids] = self.average[name].to(table.dtype)
            yield
        finally:
            with torch.no_grad():
                for name, p in self.trainable.items():
                    p.copy_(raw[name])
                for part, table in tables.items():
                    table[ids] = rows[part]


def metadata(cfg: TrainConfig, concept: Concept, *, lr: float, steps: int,
             fingerprint: str) -> dict[str, str]:  # fmt: skip
    """The header every LoRA file of the run carries (files.lora_files copies kohya's names)."""
    return {
        "optimizer": cfg.optimizer.name,
        "learning_rate": f"{lr:g}",
        "max_train_steps": str(steps),
        "resolution": str(cfg.resolution),
        "sai_rank": str(cfg.lora.rank),
        "sai_alpha": f"{cfg.lora.alpha:g}",
        "sai_base_model": str(cfg.base.model),
        "sai_base_model_hash": fingerprint,
        "sai_concept": concept.name,
        "sai_token": concept.token,
    }


@dataclass(frozen=True)
class Trained:
    """What a run's files are written from: the unwrapped modules, the tokenizer, the concept's
    words, the adapters and how the family names its keys."""

    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    words: list[str]
    adapters: Adapters
    keys: FileKeys
    text_encoder_2: nn.Module | None = None  # SDXL-class models' second text encoder

    @property
    def text_encoders(self) -> dict[str, nn.Module]:
        both = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {k: v for k, v in both.items() if v is not None}


def write_outputs(
    run_dir: RunDir,
    cfg: TrainConfig,
    trained: Trained,
    *,
    optimizer: torch.optim.Optimizer,
    header: dict[str, str],
    ema: EMA | None = None,
) -> dict[str, Path]:
    """Write every file of a finished run (module docstring)."""
    header = dict(header)
    gsnr = None
    if isinstance(optimizer, SGDSaI):
        gsnr = optimizer.gsnr_table({p: n for n, p in trained.adapters.trainable.items()})
        header["sai_gsnr_scales"] = json.dumps({r["name"]: r["scale"] for r in gsnr})
    elif cfg.optimizer.name.startswith("scaled-"):
        reg = cfg.optimizer.scaled_reg
        header["sai_scaled_variant"] = f"peft create_riemannian_optimizer reg={reg:g}"
    files = _write_file_set(run_dir, cfg, trained, header)
    if gsnr is not None:
        run_dir.write_gsnr(gsnr)
    if ema is not None:  # the averaged tensors, as their own file set in ema/
        with ema.applied(trained.text_encoders, trained.adapters.token_ids):
            header = {**header, "sai_ema_decay": f"{cfg.ema.decay:g}"}
            files |= {f"ema/{k}": v
                      for k, v in _write_file_set(run_dir.ema, cfg, trained, header).items()}  # fmt: skip
    return files


def _write_file_set(
    run_dir: RunDir, cfg: TrainConfig, trained: Trained, header: dict[str, str]
) -> dict[str, Path]:
    """lora.safetensors, lora_kohya.safetensors and the words' vectors (embeddings.safetensors,
    or an ED-LoRA run's edlora.safetensors) of the modules as they are, into ``run_dir``."""
    run_dir.path.mkdir(parents=True, exist_ok=True)
    lora, text_encoder = cfg.lora, trained.text_encoder
    files = save_lora(
        run_dir.path,
        unet=trained.unet,
        text_encoder=text_encoder if lora.text_encoder else None,
        text_encoder_2=trained.text_encoder_2,  # written when it has LoRA
        rank=lora.rank,
        alpha=lora.alpha,
        text_encoder_alpha=lora.text_encoder_alpha,
        metadata=header,
        keys=trained.keys,
    )
    words = trained.adapters.words
    if words is not None:  # (L, D) per word; a TI file would read it as L tokens
        files["edlora"] = save_edlora(
            run_dir.edlora,
            _layerwise_vectors(words, text_encoder, trained.tokenizer, trained.words),
            layers=[name for name, _ in edlora.cross_attention_layers(trained.unet)],
            metadata={k: header[k] for k in ("sai_concept", "sai_token", "sai_base_model")},
        )
    else:
        files["embeddings"] = save_embeddings(run_dir.embeddings, tokenizer=trained.tokenizer,
                                              text_encoder=text_encoder, tokens=trained.words,
                                              text_encoder_2=trained.text_encoder_2)  # fmt: skip
    return files


def _layerwise_vectors(
    layer_words: edlora.LayerWords, text_encoder: nn.Module, tokenizer, words: list[str]
) -> dict[str, torch.Tensor]:
    """``{word: (L, D)}`` of an ED-LoRA run, read from the (baked) embedding table."""
    weight = text_encoder.get_input_embeddings().weight
    vocab = tokenizer.get_vocab()
    return {
        w: weight[[vocab[t] for t in layer_words.tokens[w]]].detach().float().cpu() for w in words
    }
