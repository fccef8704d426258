"""The LoRA training recipe: ``setup()`` builds the parts, ``train()`` runs the loop,
``save_outputs()`` writes the files; ``run_training()`` is the whole job.

    run = setup(cfg, concept, run_dir)   # data, model, adapters, optimizer, batches, caches
    train(run)                           # run.step -> max_steps: step, log, sample, checkpoint
    save_outputs(run)                    # the run folder's files

The parts are modules of their own: ``batches`` (which examples a step trains on, and every
random draw, from the seed alone), ``inputs`` (draws -> latents, noise, masks; the latent
cache), ``feed`` (the examples prepared ahead by worker processes), ``text`` (captions -> the
UNet's context; the text cache), ``objective`` (the loss), ``held_out`` (the validation loss),
``adapters`` (what the run adds to the base model), ``outputs`` (the files, the EMA),
``checkpoints``, ``schedule`` and ``prior``. What differs between model families is asked of
``models.family``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from torch import nn
from tqdm.auto import tqdm

from ..config import BUILTIN_BASE_MODEL, Concept, TrainConfig, inert_settings, validate
from ..errors import Interrupted, TrainingDiverged, UserError, first_line
from ..files.concept_data import Example, changed_data, data_fingerprint, discover_examples
from ..files.lora_files import FileKeys, dora_readers_note
from ..files.run_dir import FINAL_SAMPLES, RunDir, step_tag
from ..files.run_lock import LOCK_NAME, hold_run_folder
from ..machine import peak_memory_mb, reset_peak_memory
from ..models.base import describe_base, load_base, model_fingerprint, prediction_note
from ..models.family import FAMILIES, StableDiffusion, family_of
from ..models.sampling import SampleSettings, write_samples
from ..models.tokens import bake_token_embeddings
from ..optim import SAI_SCALES, build_optimizer
from . import prior
from .adapters import Adapters, NormStop, add_adapters
from .augment import ConceptImages
from .batches import Batches, CaptionDraws
from .buckets import bucket_schedule, bucket_sizes
from .checkpoints import TrainingState, restore_latest, save_checkpoint
from .feed import Feed, default_workers
from .held_out import HeldOut, split_examples
from .inputs import InputBuilder, LatentCache, cached_crops_note, encode_fixed
from .interrupts import StopRequests
from .objective import Objective
from .outputs import EMA, MetricsLog, Trained, check_scales_agree, metadata, write_outputs
from .schedule import build_lr_scheduler
from .text import CaptionEncoder

_WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Run:
    """Everything the loop needs, built by ``setup``."""

    cfg: TrainConfig
    concept: Concept
    run_dir: RunDir
    accelerator: Accelerator
    pipe: Any  # the base pipeline: its modules are the ones trained
    family: StableDiffusion
    unet: nn.Module  # as accelerate prepared it (DDP-wrapped over several processes)
    text_encoders: dict[str, nn.Module]  # by part name; the trained ones as prepared
    adapters: Adapters
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    batches: Batches
    inputs: InputBuilder
    feed: Feed  # the inputs of each micro-batch, prepared ahead (``feed``)
    text: CaptionEncoder
    objective: Objective
    norm_stop: NormStop
    lr: float  # the run's (the UNet LoRA's) lr
    base_fingerprint: str
    held_out: HeldOut | None = None
    ema: EMA | None = None
    step: int = 0
    data_wait_s: float = 0.0  # how long the last step waited for its inputs

    @property
    def trainable(self) -> dict[str, nn.Parameter]:
        return self.adapters.trainable

    @property
    def text_encoder(self) -> nn.Module:
        """The (first) text encoder."""
        return self.text_encoders["text_encoder"]

    def trained_modules(self) -> list[nn.Module]:
        """The modules the backward pass reaches (the UNet, the trained text encoders)."""
        parts = self.adapters.trained_parts
        return [self.unet] + [m for n, m in self.text_encoders.items() if n in parts]


# ----------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, concept: Concept, run_dir: Path, *, resume: bool = False) -> Run:
    """Build the parts of a run; with ``resume``, restore the latest checkpoint of ``run_dir``.

    The order matters: the settings and the data first (a bad dataset fails in a second,
    before a model loads); accelerate next (the model is loaded for its device and precision);
    prior preservation's class images, drawn by the base model; the global seed right before
    the adapters (peft draws LoRA's A from it); the optimizer over the finished adapters;
    accelerate's wrapping; the caches on the final device; the checkpoint last, over all of it.

    Raises:
        UserError: bad settings or data, a missing or unreadable base model, a LoRA target that
            matches nothing, a concept word already in the vocabulary, no checkpoint to resume.
    """
    validate(cfg, "settings", concept=concept)  # what the command line checks, for every caller
    cfg = for_base_model(cfg)  # the model's family and size, read before any weight loads
    images, held_out = concept_data(cfg, concept)
    accelerator = _setup_accelerator(cfg)
    reset_peak_memory(accelerator.device)  # this run's peak, not an earlier one's in-process
    for inert in inert_settings(cfg, concept):  # set in a shared YAML: said once, not refused
        accelerator.print("warning: " + inert.message("settings"))
    if (caveat := edlora_caveat(cfg)) is not None:
        accelerator.print(caveat)
    pipe, family = _load_model(cfg, accelerator)
    fingerprint = model_fingerprint(cfg.base.model)
    classes = None  # drawn by the base model, before any adapter exists
    if cfg.uses_prior:
        classes = prior.class_examples_of_run(cfg, concept, pipe, accelerator, fingerprint)
    torch.manual_seed(cfg.seed)  # after any class images are drawn
    adapters = add_adapters(cfg, concept, pipe, family)
    optimizer, lr_scheduler = _setup_optimizer(cfg, adapters, cfg.group_lrs(concept), accelerator)
    # accelerate wraps the trained modules (DDP across GPUs) and the optimizer (GradScaler)
    encoders = {e.name: e.module for e in family.text_encoders(pipe)}
    trained = [name for name in encoders if name in adapters.trained_parts]
    unet, *prepared, optimizer = accelerator.prepare(
        pipe.unet, *(encoders[n] for n in trained), optimizer
    )
    encoders |= dict(zip(trained, prepared, strict=True))
    device = accelerator.device
    text = CaptionEncoder(family, family.text_encoders(pipe, **encoders), device=device,
                          words=adapters.words)  # fmt: skip
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    objective = Objective(
        family, scheduler, device=device, use_masks=cfg.data.use_masks,
        min_snr_gamma=cfg.loss.min_snr_gamma, prior_loss_weight=cfg.prior.loss_weight,
        loss_scale=cfg.loss.scale, attn_reg_weight=cfg.loss.attn_reg_weight,
        attention=adapters.attention, words=concept.words,
    )  # fmt: skip
    batches = _batches(cfg, images, classes, pipe, family, scheduler, accelerator)
    inputs = _inputs(cfg, images, classes, pipe, family, device)
    run = Run(
        cfg=cfg, concept=concept, run_dir=RunDir(run_dir), accelerator=accelerator, pipe=pipe,
        family=family, unet=unet, text_encoders=encoders, adapters=adapters,
        optimizer=optimizer, lr_scheduler=lr_scheduler, batches=batches, inputs=inputs,
        feed=_feed(cfg, batches, inputs, accelerator), text=text,
        objective=objective, norm_stop=NormStop(adapters.vectors, cfg.embeddings.max_norm),
        lr=cfg.resolved_lr(concept), base_fingerprint=fingerprint,
        ema=EMA(adapters.trainable, cfg.ema.decay) if cfg.ema.decay > 0 else None,
    )  # fmt: skip
    _fill_caches(run, held_out, classes)
    if resume:
        _restore(run)
    return run


def for_base_model(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the base model's own resolution when none was given, after refusing the
    settings its family cannot train (``models.family``), all before any weight loads.

    Raises:
        UserError: a bad base model source (``models.base.describe_base``), or a setting the
            family refuses.
    """
    info = describe_base(cfg)
    family = FAMILIES[info.family]
    refused = family.refusals(cfg)
    if refused:
        raise UserError(f"{cfg.base.model} is an {info.label} model: " + "; ".join(refused))
    if cfg.resolution is None:
        cfg = validate(dataclasses.replace(cfg, resolution=info.native_resolution), "settings")
    return cfg


def concept_data(cfg: TrainConfig, concept: Concept) -> tuple[ConceptImages, list[Example]]:
    """The training images (with their buckets) and the held-out images of the validation
    loss; the class images' folder checked when nothing is to be drawn into it.

    Raises:
        UserError: a bad data, validation or class folder; attention regularisation without
            masks.
    """
    examples = discover_examples(
        concept.data, token=concept.text, caption_template=concept.caption_template
    )
    examples, held_out = split_examples(examples, cfg.validation.split, where=str(concept.data))
    if cfg.validation.data:
        held_out = discover_examples(concept.folder(cfg.validation.data), token=concept.text,
                                     caption_template=concept.caption_template)  # fmt: skip
    if cfg.prior.class_data and cfg.prior.num_class_images == 0:
        prior.class_examples(cfg, concept, concept.folder(cfg.prior.class_data))
    if cfg.loss.attn_reg_weight > 0 and not any(e.mask_path for e in examples):
        raise UserError(
            f"attn_reg_weight {cfg.loss.attn_reg_weight:g} penalises attention outside the "
            f"subject masks, and {concept.data} has none; add masks (mask/<name>.png beside "
            "image/) or set attn_reg_weight=0"
        )
    images = ConceptImages(examples, resolution=cfg.resolution, center_crop=cfg.data.center_crop,
                           augmentation=cfg.data.augmentation, sizes=_sizes(cfg, examples))  # fmt: skip
    return images, held_out


def _sizes(cfg: TrainConfig, examples: list[Example]) -> list[tuple[int, int]] | None:
    """Each image's bucket with data.buckets, else None (the square)."""
    return (
        bucket_sizes(examples, cfg.resolution, cfg.data.bucket_step) if cfg.data.buckets else None
    )


def _setup_accelerator(cfg: TrainConfig) -> Accelerator:
    """The run's accelerator, its mixed precision real on the CPU too: accelerate gives fp16 on
    the CPU neither autocast nor loss scaling (it would train fp32 while run.yaml says fp16),
    so the CUDA path is set up by hand there, autocast in float16 and a CPU GradScaler."""
    # accelerate keeps one global state per process; a second run in the same process (tests,
    # the app) may want another precision. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    precision = cfg.compute.mixed_precision
    accelerator = Accelerator(
        mixed_precision=precision,
        cpu=not torch.cuda.is_available(),  # also what makes N CPU processes use gloo
    )
    if precision == "fp16" and accelerator.device.type == "cpu":
        accelerator.native_amp = True  # autocast() now gives torch.autocast("cpu", float16)
        accelerator.scaler = torch.amp.GradScaler("cpu")  # prepare() wraps the optimizer with it
    return accelerator


def edlora_caveat(cfg: TrainConfig) -> str | None:
    """The warning for SGD-SaI training ED-LoRA's layer-wise vectors, which lost the concept
    with an attention-only LoRA and part of it with LoCon (docs/benchmarks.md, "ED-LoRA under
    SGD-SaI"); None otherwise. Not a refusal: it is measured in the miniature only, and
    potter-edlora.yaml on a real checkpoint is how to find out whether it holds there."""
    emb = cfg.embeddings
    if cfg.optimizer.name != "sgd-sai" or not (emb.edlora and emb.train):
        return None
    return (
        "warning: under SGD-SaI, ED-LoRA's layer-wise word vectors lost the concept in the "
        "miniature demo with an attention-only UNet LoRA (concept fidelity 0.04 against 0.61 "
        "with one vector per word) and kept less of it with LoCon (0.75 against 0.96; "
        "docs/benchmarks.md#ed-lora-under-sgd-sai): compare with --optimizer scaled-adamw, or "
        "keep SGD-SaI with --set edlora=false"
    )


def _load_model(cfg: TrainConfig, accelerator: Accelerator):
    """The base model and its family, frozen and in eval mode on the accelerator's device
    (weights in the compute dtype when training in half precision; the VAE in fp32 with
    compute.vae_fp32)."""
    if cfg.base.model == BUILTIN_BASE_MODEL:
        accelerator.print(
            "base model: the built-in miniature model (32 px world, CPU demo); pass "
            "--base-model for a real SD 1.5, SD 2.x or SDXL checkpoint"
        )
    pipe = load_base(cfg)
    family = family_of(pipe)
    accelerator.print(f"base model: {family.label}, predicting {prediction_note(pipe)}, "
                      f"training at {cfg.resolution} px")  # fmt: skip
    weight_dtype = _WEIGHT_DTYPES[accelerator.mixed_precision]
    for role, module in family.frozen_parts(pipe).items():
        dtype = torch.float32 if role == "vae" and cfg.compute.vae_fp32 else weight_dtype
        module.requires_grad_(False)
        module.eval()
        # a cast to the dtype it has already makes diffusers warn about fp32 modules
        module.to(accelerator.device, **({} if module.dtype == dtype else {"dtype": dtype}))
    return pipe, family


def _setup_optimizer(
    cfg: TrainConfig, adapters: Adapters, lrs: dict[str, float], accelerator: Accelerator
):
    """The optimizer over named groups (``Adapters.param_groups``), then the lr schedule."""
    opt = cfg.optimizer
    optimizer = build_optimizer(
        opt.name,
        adapters.param_groups(lrs),
        lr=lrs["unet"],
        weight_decay=opt.weight_decay,
        momentum=opt.momentum,
        reg=opt.scaled_reg,
        eps=opt.sai_eps if opt.name == "sgd-sai" else None,
        normalize=SAI_SCALES[opt.sai_scale],
    )
    if opt.name.startswith("scaled-") and adapters.conv_pairs:
        accelerator.print(
            f"note: {opt.name} preconditions the LoRA pairs of Linear layers (peft's "
            "create_riemannian_optimizer); those of the conv layers (LoCon), like DoRA's "
            "magnitudes, take its base optimizer's plain steps"
        )
    lr_scheduler = build_lr_scheduler(
        optimizer, opt.schedule, warmup_steps=opt.warmup_steps, max_steps=cfg.max_steps
    )
    return optimizer, lr_scheduler


def _batches(cfg, images, classes, pipe, family, scheduler, accelerator) -> Batches:
    """The run's schedule and draws; with buckets, after saying which buckets the images fill."""
    buckets = None
    if images.sizes is not None:
        buckets, counts = bucket_schedule(images.sizes, cfg.batch_size, cfg.seed)
        accelerator.print(f"buckets (width x height: images): {counts}")
    c = cfg.captions
    return Batches(
        [e.caption for e in images.examples], seed=cfg.seed, batch_size=cfg.batch_size,
        grad_accum=cfg.grad_accum, processes=accelerator.num_processes,
        rank=accelerator.process_index, resolution=cfg.resolution,
        latent_shape=lambda size: family.latent_shape(pipe.vae, size),
        num_timesteps=scheduler.config.num_train_timesteps, random_flip=cfg.data.random_flip,
        noise_offset=cfg.loss.noise_offset,
        caption_draws=CaptionDraws(c.shuffle, c.keep_tokens, c.templates, c.dropout),
        sizes=images.sizes, buckets=buckets,
        class_captions=None if classes is None else [e.caption for e in classes],
    )  # fmt: skip


def _inputs(cfg, images, classes, pipe, family, device) -> InputBuilder:
    """Latents from the cache or the VAE; class images square, cropped to a batch's bucket."""
    class_images = None
    if classes is not None:
        class_images = ConceptImages(classes, resolution=cfg.resolution,
                                     center_crop=cfg.data.center_crop)  # fmt: skip
    cache = LatentCache(pipe.vae, device) if cfg.compute.cache_latents else None
    return InputBuilder(pipe.vae, scale=family.latent_scale(pipe.vae), device=device,
                        images=images, class_images=class_images, cache=cache,
                        keep_valid=cfg.data.augmentation != "crop")  # fmt: skip


def _feed(cfg: TrainConfig, batches: Batches, inputs: InputBuilder, accelerator) -> Feed:
    """The host pipeline: worker processes on a GPU (``feed.default_workers``), as set."""
    device = accelerator.device
    workers = cfg.compute.data_workers
    workers = default_workers(device) if workers is None else workers
    if workers:
        accelerator.print(f"data: {workers} worker process(es) prepare the coming steps' examples")
    return Feed(batches, inputs, grad_accum=cfg.grad_accum, workers=workers,
                pin_memory=device.type == "cuda")  # fmt: skip


@torch.no_grad()
def _fill_caches(run: Run, held_out: list[Example], classes: list[Example] | None) -> None:
    """Latents when the VAE input is fixed, the held-out images, and the captions' context when
    the text encoder is frozen and no caption changes from step to step."""
    cfg, images = run.cfg, run.inputs.images
    run.inputs.encode_all()
    if run.inputs.cache is not None and not (cfg.data.center_crop or cfg.data.buckets):
        note = cached_crops_note(images.examples)
        if note:
            run.accelerator.print(note)
    if held_out:
        held = ConceptImages(held_out, resolution=cfg.resolution, sizes=_sizes(cfg, held_out))
        run.held_out = HeldOut(held_out, encode_fixed(run.pipe.vae, held, run.accelerator.device),
                               scale=run.family.latent_scale(run.pipe.vae),
                               num_timesteps=run.objective.scheduler.config.num_train_timesteps)  # fmt: skip
    if not cfg.trains_text_encoder and not cfg.augments_captions:
        captions = {e.caption for e in images.examples + held_out + (classes or [])}
        run.text.cache(captions | ({""} if cfg.captions.dropout > 0 else set()))


def _restore(run: Run) -> None:
    """Continue from the latest complete checkpoint of the run folder."""
    run.step = restore_latest(run.run_dir, training_state(run), max_steps=run.cfg.max_steps)
    if run.accelerator.is_main_process:
        run.run_dir.truncate_metrics(run.step)  # the steps after it are trained again
    run.norm_stop.check(run.step)  # a run whose vectors had reached the limit keeps them stopped
    run.norm_stop.newly_stopped()  # said when they reached it, not again


def training_state(run: Run) -> TrainingState:
    """What a checkpoint saves of ``run`` (the EMA's averages beside the trained tensors)."""
    return TrainingState(
        trainable={**run.trainable, **(run.ema.state if run.ema else {})},
        optimizer=_unwrap_optimizer(run.optimizer),
        lr_scheduler=run.lr_scheduler,
        scaler=run.accelerator.scaler,
    )


def _plain(run: Run, module: nn.Module) -> nn.Module:
    """The module itself, without DDP or torch.compile around it (its parameter names)."""
    return run.accelerator.unwrap_model(module, keep_torch_compile=False)


def _unwrap_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


# ------------------------------------------------------------------------------ the loop
# A step's loss stays on the device until records are written: reading it every step would
# make the host wait for the GPU to finish that step before it queues the next. The losses are
# read (one wait) every SYNC_EVERY steps, and before anything that must not follow a diverged
# step: a checkpoint, samples, the validation loss, the last step, a stop.
SYNC_EVERY = 10


def train(run: Run) -> None:
    """Train from ``run.step`` to ``max_steps``: log every ``log_every`` steps (and the last),
    sample and checkpoint on schedule, and end with a checkpoint of the last step.

    Raises:
        TrainingDiverged: the loss became NaN or inf (the last good checkpoint is kept).
        Interrupted: SIGINT or SIGTERM: after the step in flight, with a checkpoint of it; a
            second one at once, with the last complete checkpoint (``training.interrupts``).
    """
    cfg, acc = run.cfg, run.accelerator
    bar = tqdm(total=cfg.max_steps, initial=run.step, desc=f"{cfg.optimizer.name} lr={run.lr:g}",
               unit="step", disable=not acc.is_local_main_process, dynamic_ncols=True)  # fmt: skip
    # the bar and the log close however the loop ends: an error is the last line people see
    with bar, MetricsLog(run.run_dir, enabled=acc.is_main_process) as log, StopRequests() as stops:
        try:
            _loop(run, bar, log, stops)
        except KeyboardInterrupt:  # the second signal
            raise Interrupted(_aborted_message(run), signal.SIGINT) from None
        finally:
            run.feed.close()
    latest = run.run_dir.latest_checkpoint()
    if latest is None or latest[0] != run.step:
        checkpoint(run)


def _loop(run: Run, bar, log: MetricsLog, stops: StopRequests) -> None:
    """The steps, each logged, sampled and checkpointed on schedule; a stop request ends the
    loop after the step in flight, with a checkpoint of it."""
    cfg, acc = run.cfg, run.accelerator
    pending: list[tuple[torch.Tensor, dict[str, Any]]] = []  # (loss on the device, record)
    while run.step < cfg.max_steps:
        start = time.perf_counter()
        loss = _step(run)
        pending.append((loss, _record(run, time.perf_counter() - start)))
        bar.update(1)
        last = run.step == cfg.max_steps
        every = cfg.validation.samples_every
        samples = bool(every) and run.step % every == 0 and not last  # the last: samples/final
        saves = bool(cfg.checkpoints.every) and run.step % cfg.checkpoints.every == 0
        validates = run.held_out is not None and (run.step % cfg.validation.loss_every == 0
                                                  or last)  # fmt: skip
        # one process stops at once; several agree where they all read their losses
        signum = stops.signum if acc.num_processes == 1 else 0
        if not (last or samples or saves or validates or signum or len(pending) >= SYNC_EVERY):
            continue
        _write_records(run, pending, log, bar, validates=validates)
        pending = []
        if samples:
            validate_samples(run)
        if saves:
            checkpoint(run)
        signum = stops.agreed(acc)
        if signum:
            latest = run.run_dir.latest_checkpoint()
            if latest is None or latest[0] != run.step:
                checkpoint(run)
            raise Interrupted(_stopped_message(run, signum), signum)


def _write_records(run: Run, pending: list, log: MetricsLog, bar, *, validates: bool) -> None:
    """Read the pending steps' losses (one wait for the device), stop at the first non-finite
    one, then write the records due: every ``log_every`` steps, the last, the validated."""
    cfg = run.cfg
    per_rank = _per_rank_losses(run, [loss for loss, _ in pending])
    for (_, record), of_ranks in zip(pending, per_rank.T, strict=True):
        _check_finite(run, record["step"], of_ranks)
    losses = per_rank.mean(dim=0).tolist()
    if validates:
        pending[-1][1]["val_loss"] = validation_loss(run)
    for value, (_, record) in zip(losses, pending, strict=True):
        record = {"step": record["step"], "loss": value} | record
        if (
            record["step"] % cfg.log_every == 0
            or record["step"] == cfg.max_steps
            or ("val_loss" in record)
        ):
            log.write(record)
    for step in run.norm_stop.newly_stopped():
        run.accelerator.print(f"step {step}: the token vectors' mean norm reached "
                              f"embeddings_max_norm {cfg.embeddings.max_norm:g}; they are kept "
                              "from here on")  # fmt: skip
    record = pending[-1][1]
    shown = {"val": f"{record['val_loss']:.4f}"} if "val_loss" in record else {}
    bar.set_postfix(loss=f"{losses[-1]:.4f}", **shown)


def _per_rank_losses(run: Run, losses: list[torch.Tensor]) -> torch.Tensor:
    """(ranks, steps) on the host: each process's loss of each step (the sum of its micro-batch
    losses), read back in one go; the global batch's loss is the mean over ranks. Every rank
    sees every rank's losses, so a NaN anywhere stops all of them at the same step (one rank
    stopping alone would leave the others in the next all-reduce)."""
    acc = run.accelerator
    return acc.gather(torch.stack(losses)[None].to(acc.device)).cpu()


def _check_finite(run: Run, step: int, of_ranks: torch.Tensor) -> None:
    """Raises TrainingDiverged if a rank's loss of ``step`` is NaN or inf."""
    finite = torch.isfinite(of_ranks)
    if not finite.all():
        bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
        raise TrainingDiverged(_diverged_message(run, step, float(of_ranks.mean()), bad))


def _stopped_message(run: Run, signum: int) -> str:
    name = signal.Signals(signum).name
    return (
        f"{name} at step {run.step} of {run.cfg.max_steps}: the checkpoint of step {run.step} "
        f"is written. Resume with: {_resume_command(run)}"
    )


def _aborted_message(run: Run) -> str:
    latest = run.run_dir.latest_checkpoint()
    kept = (
        f"the last complete checkpoint is step {latest[0]} ({latest[1].path})"
        if latest
        else "no checkpoint was written; resuming starts again from step 0"
    )
    return f"aborted during step {run.step + 1}: {kept}. Resume with: {_resume_command(run)}"


def _resume_command(run: Run) -> str:
    return f"sai-train-lora --resume {shlex.quote(str(run.run_dir.path))}"


def _record(run: Run, seconds: float) -> dict[str, Any]:
    """The step's metrics.jsonl record, its loss added when read: time (the host's: a GPU step
    is asynchronous, so over several steps it is the device's), the time it waited for its
    inputs, each group's lr, the peak memory so far; with fp16's loss scaling, the scale after
    the step and whether the step was skipped (an inf or NaN gradient: the optimizer did not
    step)."""
    groups = run.optimizer.param_groups
    record = {"step": run.step, "step_time": seconds, "data_wait": run.data_wait_s,
              "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(groups)},
              "peak_mem_mb": peak_memory_mb(run.accelerator.device)}  # fmt: skip
    scaler = run.accelerator.scaler
    if scaler is not None:  # GradScaler.step has read the device already: no extra wait
        record["loss_scale"] = scaler.get_scale()
        record["skipped"] = bool(getattr(run.optimizer, "step_was_skipped", False))
    return record


def train_step(run: Run) -> float:
    """One optimizer step over ``grad_accum`` micro-batches, its loss read back (the loop reads
    losses in batches instead, ``SYNC_EVERY``).

    Raises:
        TrainingDiverged: the loss is NaN or inf.
    """
    per_rank = _per_rank_losses(run, [_step(run)])[:, 0]
    _check_finite(run, run.step, per_rank)
    return float(per_rank.mean())


def _step(run: Run) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches, without waiting for the device;
    returns this process's loss (the sum of its micro-batch losses) on the device."""
    cfg, acc = run.cfg, run.accelerator
    trained = run.trained_modules()
    losses, waited = [], 0.0
    for micro in range(cfg.grad_accum):
        inputs = run.feed.inputs(run.step, micro)
        waited += run.feed.waited
        with contextlib.ExitStack() as stack:
            # gradients are all-reduced once, on the last micro-batch, for every DDP module
            if micro < cfg.grad_accum - 1 and acc.num_processes > 1:
                for module in trained:
                    stack.enter_context(acc.no_sync(module))
            with acc.autocast():
                micro_loss = run.objective(run.unet, run.text, inputs) / cfg.grad_accum
            acc.backward(micro_loss)
        losses.append(micro_loss.detach().float())
    run.data_wait_s = waited
    if cfg.optimizer.max_grad_norm > 0:
        acc.clip_grad_norm_(list(run.trainable.values()), cfg.optimizer.max_grad_norm)
    try:
        run.optimizer.step()
    except torch.linalg.LinAlgError:
        # a non-finite gradient reached an optimizer that factorises a matrix (scaled-AdamW's
        # preconditioner) before the loss was read: the run diverged, whatever the loss says
        loss = float(torch.stack(losses).sum())
        raise TrainingDiverged(_diverged_message(run, run.step + 1, loss, [])) from None
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.norm_stop.check(run.step + 1)
    if run.ema is not None:
        run.ema.update()
    run.step += 1
    return torch.stack(losses).sum()


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """The objective on the held-out images (``held_out.HeldOut.loss``), in eval mode under
    autocast. Every process computes it (the DDP modules' forward is collective)."""
    with run.accelerator.autocast(), _eval_mode(run.unet, *run.text_encoders.values()):
        return run.held_out.loss(run.objective, run.unet, run.text)


def _diverged_message(run: Run, step: int, loss: float, bad_ranks: list[int]) -> str:
    last = run.run_dir.latest_checkpoint()
    kept = (
        f"the last good checkpoint is {last[1].path}" if last else "no checkpoint was written yet"
    )
    processes = run.accelerator.num_processes
    where = f" (on rank {', '.join(map(str, bad_ranks))} of {processes})" if processes > 1 else ""
    return (
        f"the loss became {loss} at step {step}{where}; training stopped and {kept}. "
        f"Lower the learning rate (now {run.lr:g}, --lr) or use --set mixed_precision=no"
    )


def checkpoint(run: Run) -> None:
    """Save ``checkpoints/step-NNNNNN`` of the current step (the main process writes it)."""
    if run.accelerator.is_main_process:
        save_checkpoint(run.run_dir, run.step, training_state(run), keep=run.cfg.checkpoints.keep)


def validate_samples(run: Run, tag: str | None = None) -> list[Path]:
    """The concept's validation prompts with the validation seeds, drawn with the live modules
    into ``samples/<tag>`` (default: the current step's)."""
    if not run.accelerator.is_main_process:
        return []
    encoders = {name: _plain(run, module) for name, module in run.text_encoders.items()}
    pipe = run.family.sampling_pipeline(run.pipe, unet=_plain(run, run.unet), **encoders)
    out = run.run_dir.samples(tag or step_tag(run.step))
    with run.accelerator.autocast(), _eval_mode(pipe.unet, *encoders.values()):
        return write_samples(pipe, run.concept.prompts(), run.cfg.validation.seeds,
                             SampleSettings.of_run(run.cfg), out)  # fmt: skip


@contextlib.contextmanager
def _eval_mode(*modules: nn.Module):
    """Inference in eval mode, then each module back in the mode it had."""
    modes = [m.training for m in modules]
    try:
        for m in modules:
            m.eval()
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


# --------------------------------------------------------------------------------- outputs
def save_outputs(run: Run) -> dict[str, Path]:
    """The run's files (``training.outputs``), written by the main process; under DDP every
    rank first checks that all hold the same SGD-SaI scales.

    Raises:
        UserError: a file cannot be written (disk full, read-only folder).
    """
    acc = run.accelerator
    optimizer = _unwrap_optimizer(run.optimizer)
    check_scales_agree(optimizer, acc)
    if not acc.is_main_process:
        return {}
    encoders = {name: _plain(run, module) for name, module in run.text_encoders.items()}
    for module in encoders.values():
        bake_token_embeddings(module)
    header = metadata(run.cfg, run.concept, lr=run.lr, steps=run.step,
                      fingerprint=run.base_fingerprint)  # fmt: skip
    # what a loader must know to use the LoRA with the right model and sampler
    header |= {"sai_model_family": run.family.name,
               "sai_prediction_type": run.objective.scheduler.config.prediction_type}  # fmt: skip
    if run.cfg.lora.dora:  # measured: not every tool reads a DoRA file right
        acc.print(dora_readers_note(run.family.name))
    try:
        trained = Trained(_plain(run, run.unet), encoders["text_encoder"], run.pipe.tokenizer,
                          run.concept.words, run.adapters, _file_keys(run),
                          text_encoder_2=encoders.get("text_encoder_2"))  # fmt: skip
        return write_outputs(run.run_dir, run.cfg, trained, optimizer=optimizer, header=header,
                             ema=run.ema)  # fmt: skip
    except OSError as exc:
        raise UserError(
            f"cannot write the outputs of {run.run_dir.path} ({first_line(exc)}); free disk "
            f"space or make the folder writable, then run --resume {run.run_dir.path} again "
            "(it writes them from the last checkpoint)"
        ) from None


def _file_keys(run: Run) -> FileKeys:
    """The family's file keys; an SD 2.x v-model says ``sd_v2_v`` in kohya's header, as kohya's
    own v-parameterization runs do."""
    keys = run.family.file_keys
    if keys.v2 and run.objective.scheduler.config.prediction_type == "v_prediction":
        keys = dataclasses.replace(keys, base_model_version=keys.base_model_version + "_v")
    return keys


# ------------------------------------------------------------------------------ entry point
def default_run_dir(cfg: TrainConfig, concept: Concept) -> Path:
    """``runs/<concept>/<optimizer>-lr<lr>-s<seed>-<date>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{cfg.optimizer.name}-lr{cfg.resolved_lr(concept):g}-s{cfg.seed}-{stamp}"
    return Path("runs") / concept.name / name


def run_training(
    cfg: TrainConfig,
    concept: Concept,
    run_dir: Path,
    *,
    resume: bool = False,
    allow_changed_data: bool = False,
) -> Path:
    """Set up, train, save: the whole job, holding the run folder's lock
    (``files.run_lock``) throughout. Returns the run directory.

    A resumed run's training data must be what it started with (``changed_data``), unless
    ``allow_changed_data``.

    Raises:
        UserError: bad input (see ``setup``), a non-empty ``run_dir`` without ``resume``, a
            folder another process trains, changed training data on resume.
        TrainingDiverged: the loss became NaN or inf.
        Interrupted: SIGINT or SIGTERM (``train``).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--output-dir {run_dir} is a file, not a folder; choose another one")
    main = int(os.environ.get("RANK", "0")) == 0  # before accelerate: rank 0 holds the lock
    # the folders the lock will create (runs/<concept>/<run>): removed again if left empty
    created = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
    try:
        with hold_run_folder(run_dir, main_process=main):
            if (
                not resume
                and run_dir.is_dir()
                and any(p.name != LOCK_NAME for p in run_dir.iterdir())
            ):
                raise UserError(
                    f"output folder {run_dir} is not empty; choose another --output-dir "
                    f"or continue it with --resume {run_dir}"
                )
            if resume:
                _check_same_data(run_dir, concept, allow_changed_data)
            _train_and_save(cfg, concept, run_dir, resume=resume)
    finally:  # bad inputs leave no folder behind (the lock was all it held)
        for folder in created if main else ():
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    return run_dir


def _train_and_save(cfg: TrainConfig, concept: Concept, run_dir: Path, *, resume: bool) -> None:
    run = setup(cfg, concept, run_dir, resume=resume)
    # every process has checked the folder above before the main one writes into it
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        examples = discover_examples(concept.data, token=concept.text,
                                     caption_template=concept.caption_template)  # fmt: skip
        run.run_dir.write_config(run.cfg, concept, {
            "lr": run.lr, "base_model_hash": run.base_fingerprint,
            "token_ids": run.adapters.token_ids,
            "data_files": data_fingerprint(examples, concept.data),
        })  # fmt: skip
    train(run)
    save_outputs(run)  # first: an interrupted final sampling must not cost the LoRA
    validate_samples(run, tag=FINAL_SAMPLES)


def _check_same_data(run_dir: Path, concept: Concept, allow_changed: bool) -> None:
    """A resumed run trains on the images, masks and captions it started with.

    Raises:
        UserError: they changed (the first few named), unless ``allow_changed``.
    """
    _, _, saved = RunDir(run_dir).read_config()
    before = saved.get("data_files")
    if not before:  # written by an earlier version: nothing to compare
        return
    examples = discover_examples(concept.data, token=concept.text,
                                 caption_template=concept.caption_template)  # fmt: skip
    changes = changed_data(before, data_fingerprint(examples, concept.data))
    if not changes:
        return
    listed = ", ".join(changes[:3]) + (f" and {len(changes) - 3} more" if len(changes) > 3 else "")
    if allow_changed:
        print(f"note: {concept.data} changed since the run started ({listed}); resuming on it "
              "as asked (--allow-changed-data)", file=sys.stderr)  # fmt: skip
        return
    raise UserError(
        f"{concept.data} changed since {run_dir} started ({listed}): the rest of the run would "
        "train on other data than its first steps. Restore the files, start a new run, or "
        "resume anyway with --allow-changed-data"
    )
