"""The LoRA training recipe: ``setup()`` builds the parts, ``train()`` runs the loop,
``save_outputs()`` writes the files; ``run_training()`` is the whole job.

Every random draw (which image, crop, flip, noise, timestep) is derived from the seed and the
example's place in the run, never from a running RNG: a run resumed from a checkpoint continues
exactly as the uninterrupted run would have (bitwise on CPU). The place is the global example
counter k = ((step * grad_accum + micro) * processes + rank) * batch_size + i, so the global
batch (batch_size x grad_accum x processes) sees the same examples with the same draws however
it is split: N processes with batch b train what one process with batch N*b does.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers import DDPMScheduler
from tqdm.auto import tqdm

from ..config import BUILTIN_BASE_MODEL, Concept, TrainConfig
from ..errors import TrainingDiverged, UserError, first_line
from ..files.lora_files import save_embeddings, save_lora
from ..files.mix_of_show import save_edlora
from ..files.run_dir import FINAL_SAMPLES, RunDir, step_tag
from ..machine import peak_memory_mb, reset_peak_memory
from ..models import edlora
from ..models.base import load_base, model_fingerprint
from ..models.lora import add_lora
from ..models.sampling import SampleSettings, sampling_pipeline, write_samples
from ..models.tokens import (
    add_concept_tokens,
    bake_token_embeddings,
    make_token_embeddings_trainable,
    tokenize,
)
from ..optim import SGDSaI, build_optimizer
from . import prior
from .attention import attention_penalty, word_positions
from .checkpoints import TrainingState, load_latest_checkpoint, save_checkpoint
from .data import (
    BucketBatches,
    ConceptDataset,
    Example,
    assign_buckets,
    augment_caption,
    bucket_resolutions,
    discover_examples,
    image_sizes,
    non_square_images,
)
from .held_out import split_examples, validation_noise, validation_timesteps
from .loss import min_snr_weight, per_sample_mse, prediction_target
from .schedule import build_lr_scheduler, replan_lr_scheduler

_WEIGHT_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Run:
    """Everything the loop needs, built by ``setup``."""

    cfg: TrainConfig
    concept: Concept
    run_dir: RunDir
    accelerator: Accelerator
    pipe: Any  # the base StableDiffusionPipeline (its modules are the ones trained)
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: Any
    dataset: ConceptDataset
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    trainable: dict[str, torch.nn.Parameter]
    token_ids: list[int]
    lr: float
    base_fingerprint: str
    cache: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    # the token vectors once their mean norm reached embeddings_max_norm: kept from then on
    frozen_vectors: torch.Tensor | None = None
    # ema_decay > 0: the moving average of every trained tensor, by name (checkpointed)
    ema: dict[str, torch.Tensor] = field(default_factory=dict)
    # the validation loss's images (validation_split or validation_data); never trained on
    held_out: list[Example] = field(default_factory=list)
    # buckets=true: which examples each batch draws (None: an epoch-wise permutation)
    batches: BucketBatches | None = None
    # prior preservation's class images (training.prior), drawn beside every concept example
    class_dataset: ConceptDataset | None = None

    @property
    def trains_text_encoder(self) -> bool:
        return _trains_text_encoder(self.cfg)


def _trains_text_encoder(cfg: TrainConfig) -> bool:
    return cfg.text_encoder_lora or cfg.train_embeddings


# ----------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, concept: Concept, run_dir: Path, *, resume: bool = False) -> Run:
    """Build the parts of a run; with ``resume``, restore the latest checkpoint of ``run_dir``.

    The order matters: the data first (a bad dataset fails in a second, before a model loads);
    accelerate next (the model is loaded for its device and precision); prior preservation's
    class images, drawn by the base model; the global seed right before the adapters (peft
    draws LoRA's A from it); the optimizer over the finished adapters; accelerate's
    wrapping; the caches on the final device; the checkpoint last, over all of it.

    Raises:
        UserError: bad data, a missing or unreadable base model, a LoRA target that matches
            nothing, a concept token already in the vocabulary, no checkpoint to resume.
    """
    dataset, held_out = _setup_data(cfg, concept)
    accelerator = _setup_accelerator(cfg)
    reset_peak_memory(accelerator.device)  # this run's peak, not an earlier one's in-process
    pipe = _load_model(cfg, accelerator)
    fingerprint = model_fingerprint(cfg.base_model)
    class_dataset = _setup_prior(cfg, concept, pipe, accelerator, fingerprint)  # base draws
    torch.manual_seed(cfg.seed)  # after any class images are drawn
    token_ids, trainable = _adapt_model(cfg, concept, pipe)
    lr = cfg.resolved_lr(concept)
    optimizer, lr_scheduler = _setup_optimizer(cfg, trainable, cfg.group_lrs(concept))
    if cfg.optimizer.startswith("scaled-") and any(
        ".lora_A." in n and p.dim() > 2 for n, p in trainable.items()
    ):
        accelerator.print(
            f"note: {cfg.optimizer} preconditions the LoRA pairs of Linear layers (peft's "
            "create_riemannian_optimizer); those of the conv layers (LoCon), like DoRA's "
            "magnitudes, take its base optimizer's plain steps"
        )

    # accelerate wraps the trained modules (DDP across GPUs) and the optimizer (GradScaler).
    unet, text_encoder = pipe.unet, pipe.text_encoder
    if _trains_text_encoder(cfg):
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)

    run = Run(
        cfg=cfg,
        concept=concept,
        run_dir=RunDir(run_dir),
        accelerator=accelerator,
        pipe=pipe,
        unet=unet,
        text_encoder=text_encoder,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        dataset=dataset,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        trainable=trainable,
        token_ids=token_ids,
        lr=lr,
        base_fingerprint=fingerprint,
        held_out=held_out,
        batches=_bucket_batches(cfg, dataset, accelerator),
        class_dataset=class_dataset,
    )
    if cfg.ema_decay > 0:  # starts at the initial values (restored below on resume)
        run.ema = {n: p.detach().clone() for n, p in trainable.items()}
    _setup_caches(run)
    if resume:
        run.step = load_latest_checkpoint(run.run_dir, _training_state(run))
        if run.step > cfg.max_steps:
            raise UserError(
                f"{run.run_dir.path} is at step {run.step}, past --max-steps {cfg.max_steps}; "
                f"give --max-steps {run.step} or more"
            )
        try:
            replan_lr_scheduler(run.lr_scheduler, run.step, cfg.max_steps)  # training/schedule
        except ValueError as exc:
            raise UserError(
                f"{run.run_dir.path}: {exc}; keep --max-steps {run.step}, or train the longer "
                "run as a new one (with its own length, or --set lr_scheduler=constant)"
            ) from None
        if accelerator.is_main_process:
            run.run_dir.truncate_metrics(run.step)  # the steps after it are trained again
        _limit_embeddings(run)  # a run whose vectors had reached the limit keeps them frozen
    return run


def _setup_data(cfg: TrainConfig, concept: Concept) -> tuple[ConceptDataset, list[Example]]:
    """The training images as a dataset, and the held-out images of the validation loss."""
    examples = discover_examples(
        concept.data, token=concept.text, caption_template=concept.caption_template
    )
    examples, held_out = split_examples(examples, cfg.validation_split, where=str(concept.data))
    if cfg.validation_data:
        held_out = discover_examples(concept.folder(cfg.validation_data), token=concept.text,
                                     caption_template=concept.caption_template)  # fmt: skip
    if prior.uses_prior(cfg):  # checked before the model loads
        prior.class_prompt(cfg, concept)
    if cfg.class_data and cfg.num_class_images == 0:  # nothing to draw: the folder must be good
        prior.class_examples(cfg, concept, concept.folder(cfg.class_data))
    if cfg.attn_reg_weight > 0 and not any(e.mask_path for e in examples):
        raise UserError(
            f"attn_reg_weight {cfg.attn_reg_weight:g} penalises attention outside the subject "
            f"masks, and {concept.data} has none; add masks (mask/<name>.png beside image/) "
            "or set attn_reg_weight=0"
        )
    dataset = ConceptDataset(
        examples,
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        seed=cfg.seed,
        augmentation=cfg.augmentation,
        sizes=_bucket_sizes(cfg, examples),
    )
    return dataset, held_out


def _bucket_sizes(cfg: TrainConfig, examples: list[Example]) -> list[tuple[int, int]] | None:
    """Each image's bucket (width, height) when buckets=true, else None (the square)."""
    if not cfg.buckets:
        return None
    resolutions = bucket_resolutions(cfg.resolution, cfg.bucket_step)
    return [resolutions[b] for b in assign_buckets(image_sizes(examples), resolutions)]


def _bucket_batches(
    cfg: TrainConfig, dataset: ConceptDataset, accelerator: Accelerator
) -> BucketBatches | None:
    """The bucketed batch schedule, after saying which buckets the images fill."""
    if dataset.sizes is None:
        return None
    buckets = sorted(set(dataset.sizes), key=lambda wh: wh[0] / wh[1])
    counts = ", ".join(f"{w}x{h}: {dataset.sizes.count((w, h))}" for w, h in buckets)
    accelerator.print(f"buckets (width x height: images): {counts}")
    return BucketBatches([buckets.index(s) for s in dataset.sizes], cfg.batch_size, cfg.seed)


def _setup_accelerator(cfg: TrainConfig) -> Accelerator:
    # accelerate keeps one global state per process; a second run in the same process (tests,
    # the app) may want another precision. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # run.yaml keeps what was asked; this is what runs
    cpu_only = cfg.mixed_precision == "fp16" and not torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision="no" if cpu_only else cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),  # also what makes N CPU processes use gloo
    )
    if cpu_only:
        accelerator.print("note: fp16 needs a GPU; training in fp32 on the CPU")
    return accelerator


def _load_model(cfg: TrainConfig, accelerator: Accelerator):
    """The base model, frozen and in eval mode, on the accelerator's device (weights in the
    compute dtype when training in half precision)."""
    device = accelerator.device
    if cfg.base_model == BUILTIN_BASE_MODEL:
        accelerator.print(
            "base model: the built-in miniature model (32 px world, CPU demo); pass "
            "--base-model for a real SD 1.5-class checkpoint"
        )
    pipe = load_base(cfg)
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
        module.eval()
    weight_dtype = _WEIGHT_DTYPES[accelerator.mixed_precision]
    for module, dtype in ((unet, weight_dtype), (text_encoder, weight_dtype),
                          (vae, torch.float32 if cfg.vae_fp32 else weight_dtype)):  # fmt: skip
        # a cast to the dtype it has already makes diffusers warn about fp32 modules
        module.to(device) if module.dtype == dtype else module.to(device, dtype=dtype)
    return pipe


def _setup_prior(
    cfg: TrainConfig, concept: Concept, pipe, accelerator: Accelerator, fingerprint: str
) -> ConceptDataset | None:
    """Prior preservation's class images as a dataset (None when off), the missing ones first
    drawn by the base model, each machine's processes sharing the seeds."""
    if not prior.uses_prior(cfg):
        return None
    folder = prior.class_folder(cfg, concept, fingerprint)
    if cfg.num_class_images > 0:
        # every machine fills its folder (the cache may be local), its processes sharing seeds
        seeds = prior.missing_seeds(folder, cfg.num_class_images)
        accelerator.wait_for_everyone()  # every process has listed them before any draws
        index, count = _local_share(accelerator)
        with accelerator.autocast():
            prior.generate_class_images(pipe, folder, seeds[index::count],
                                        prompt=prior.class_prompt(cfg, concept),
                                        sample=SampleSettings.of_run(cfg),
                                        base=str(cfg.base_model),
                                        progress=accelerator.is_local_main_process)  # fmt: skip
        accelerator.print(f"class images: {folder} ({len(seeds)} drawn now)")
        accelerator.wait_for_everyone()
    examples = prior.class_examples(cfg, concept, folder)
    if cfg.num_class_images > len(examples):
        raise UserError(
            f"{folder} holds {len(examples)} class images but num_class_images is "
            f"{cfg.num_class_images}; it was changed during generation, or delete it"
        )
    # square; a bucketed run draws them at each chunk's size (_with_class_examples)
    return ConceptDataset(examples, resolution=cfg.resolution, center_crop=cfg.center_crop,
                          random_flip=cfg.random_flip, seed=cfg.seed)  # fmt: skip


def _local_share(accelerator: Accelerator) -> tuple[int, int]:
    """(this process's index on its machine, the machine's process count)."""
    count = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    return accelerator.local_process_index, max(1, count)


def _adapt_model(cfg: TrainConfig, concept: Concept, pipe):
    """The concept's words and the LoRA adapters in the loaded base model; the modules that
    train are in train mode. Returns the token ids and the trainable tensors by name (fp32)."""
    unet, text_encoder = pipe.unet, pipe.text_encoder
    # The concept's words, initialised from the class word(s), before LoRA wraps the encoder.
    token_ids = add_concept_tokens(
        pipe.tokenizer,
        text_encoder,
        concept.words,
        init_word=concept.initialisers,
        init_noise_std=cfg.init_noise_std,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    if cfg.edlora:  # each word's rows, one per cross-attention layer, start as the word's row
        layers = edlora.install_processors(unet, pipe.tokenizer.model_max_length)
        token_ids = edlora.add_layerwise_tokens(pipe.tokenizer, text_encoder, concept.words,
                                                len(layers))  # fmt: skip
        tokens = {w: edlora.layer_tokens(w, len(layers)) for w in concept.words}
        edlora.set_layer_words(unet, edlora.LayerWords(tokens, len(layers)))
    elif cfg.attn_reg_weight > 0:  # the processors record attention; a plain context is shared
        edlora.install_processors(unet, pipe.tokenizer.model_max_length)
    add_lora(
        unet,
        text_encoder if cfg.text_encoder_lora else None,
        rank=cfg.rank,
        alpha=cfg.alpha,
        unet_targets=tuple(cfg.lora_targets),
        text_encoder_rank=cfg.text_encoder_rank,
        text_encoder_alpha=cfg.text_encoder_alpha,
        use_dora=cfg.use_dora,
    )
    if cfg.train_embeddings:
        make_token_embeddings_trainable(text_encoder, token_ids)
    trainable = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    trainable |= {
        f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad
    }
    for p in trainable.values():  # only the adapters (and token vectors) train, in fp32
        p.data = p.data.float()
    # train mode as diffusers' scripts set it (SD 1.5 and CLIP have dropout 0); transformers
    # checkpoints only in train mode, so an eval() text encoder would ignore the setting
    unet.train()
    text_encoder.train(_trains_text_encoder(cfg))
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if _trains_text_encoder(cfg):
            # non-reentrant: gradients reach the LoRA factors although the inputs need none
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            enable = enable or text_encoder.gradient_checkpointing_enable  # its older name
            enable({"use_reentrant": False})
    return token_ids, trainable


def _setup_optimizer(
    cfg: TrainConfig, trainable: dict[str, torch.nn.Parameter], lrs: dict[str, float]
):
    """The optimizer over named groups (UNet LoRA, text-encoder LoRA, token vectors; lrs from
    ``TrainConfig.group_lrs``), then the lr schedule."""
    groups = {"unet": [], "text_encoder": [], "embeddings": []}
    for name, p in trainable.items():
        if name.endswith(".vectors"):
            groups["embeddings"].append((name, p))
        elif name.startswith("text_encoder."):
            groups["text_encoder"].append((name, p))
        else:
            groups["unet"].append((name, p))
    lr = lrs["unet"]
    optimizer = build_optimizer(
        cfg.optimizer,
        [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v],
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        reg=cfg.scaled_reg,
        eps=cfg.sai_eps if cfg.optimizer == "sgd-sai" else None,
    )
    lr_scheduler = build_lr_scheduler(
        optimizer, cfg.lr_scheduler, warmup_steps=cfg.warmup_steps, max_steps=cfg.max_steps
    )
    return optimizer, lr_scheduler


@torch.no_grad()
def _setup_caches(run: Run) -> None:
    """Latents when the VAE input is fixed, text embeddings when the encoder is frozen."""
    if run.cfg.cache_latents:
        _cache_latents(run)
        _note_cached_crops(run)
    if run.held_out:
        run.cache["validation"] = _validation_latents(run)
    # augmented captions are new every time: encoded each step
    if not run.trains_text_encoder and not _augments_captions(run.cfg):
        captions = {e.caption for e in run.dataset.examples + run.held_out}
        if run.class_dataset is not None:
            captions |= {e.caption for e in run.class_dataset.examples}
        if run.cfg.caption_dropout > 0:
            captions.add("")  # the dropped caption
        run.cache["text"] = {c: _encode_text(run, [c])[0].cpu() for c in sorted(captions)}


def _augments_captions(cfg: TrainConfig) -> bool:
    return cfg.shuffle_captions or cfg.caption_templates


def _cache_latents(run: Run) -> None:
    """The concept images' latents, encoded once before training."""
    run.cache["latents"] = _encode_fixed(run, run.dataset)


def _encode_fixed(run: Run, dataset: ConceptDataset) -> tuple[list, list, list]:
    """Per image of ``dataset``: the VAE posterior's mean and std (2, 4, h, w), unflipped and
    flipped, and the mask (2, 1, H, W), at the centre crop (of its bucket, with
    buckets=true)."""
    vae, device = run.pipe.vae, run.accelerator.device
    fixed = ConceptDataset(
        dataset.examples,
        resolution=run.cfg.resolution,
        center_crop=True,
        random_flip=0.0,
        seed=run.cfg.seed,
        sizes=dataset.sizes,
    )
    means, stds, masks = [], [], []
    for i in range(len(fixed)):
        item = fixed[i]
        pixels = torch.stack([item["pixel_values"], item["pixel_values"].flip(-1)])
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
        masks.append(torch.stack([item["mask"], item["mask"].flip(-1)]))
    return means, stds, masks  # lists: with buckets the sizes differ


def _validation_latents(run: Run) -> list[dict[str, Any]]:
    """Per held-out image: its latents (1, 4, h, w) (the posterior mean of the centre crop,
    at its bucket's size with buckets=true; scaled), mask (1, 1, H, W) and caption."""
    held_out = ConceptDataset(run.held_out, resolution=run.cfg.resolution, seed=run.cfg.seed,
                              sizes=_bucket_sizes(run.cfg, run.held_out))  # fmt: skip
    means, _, masks = _encode_fixed(run, held_out)
    scale = run.pipe.vae.config.scaling_factor
    return [{"latents": mean[:1] * scale, "mask": mask[:1], "caption": example.caption}
            for mean, mask, example in zip(means, masks, run.held_out, strict=True)]  # fmt: skip


@torch.no_grad()
def validation_loss(run: Run) -> float:
    """The training objective (masked, min-SNR weighted, times loss_scale; without the
    attention penalty) on the held-out images at ``held_out.validation_timesteps`` with each
    image's fixed noise, averaged over images and timesteps. Every process computes it (the
    DDP modules' forward is collective)."""
    timesteps = validation_timesteps(run.noise_scheduler.config.num_train_timesteps)
    n = len(timesteps)
    losses = []
    with run.accelerator.autocast(), _eval_mode(run.unet, run.text_encoder):
        for i, item in enumerate(run.cache["validation"]):
            latents = item["latents"].expand(n, *item["latents"].shape[1:])
            batch = {
                "latents": latents,
                "noise": validation_noise(i, tuple(latents.shape[1:])),
                "timesteps": timesteps,
                "mask": item["mask"].expand(n, *item["mask"].shape[1:]),
                "valid": None,
                "captions": [item["caption"]] * n,
            }
            losses.append(_loss(run, batch, attention=False).item())
    return sum(losses) / len(losses)


def _note_cached_crops(run: Run) -> None:
    """Say once what the latent cache drops: the random crops of non-square images."""
    if run.cfg.center_crop or run.cfg.buckets:
        return
    cut = non_square_images(run.dataset.examples)
    if cut:
        run.accelerator.print(
            f"note: cache_latents=true encodes each image once, at its centre crop: the random "
            f"crops of the {len(cut)} non-square image(s) (of {len(run.dataset)}, e.g. "
            f"{cut[0].name}) are not trained; random flips are kept. For random crops: "
            "--set cache_latents=false (the VAE then runs every step); --set center_crop=true "
            "asks for the centre crop and silences this note"
        )


def _encode_text(run: Run, captions: list[str]) -> torch.Tensor:
    """(B, 77, D); an ED-LoRA run's (B, L * 77, D), every layer's copy in one batch."""
    if run.cfg.edlora:
        words = edlora.layer_words(_plain(run, run.unet))
        context = edlora.encode_layerwise(
            run.pipe.tokenizer, run.text_encoder, captions, words, device=run.accelerator.device
        )
        plain = context.shape[1] == run.pipe.tokenizer.model_max_length  # no caption has words
        # laid out for every layer all the same, so cached captions stack with the others
        return edlora.spread(context, words.layers) if plain else context
    ids = tokenize(run.pipe.tokenizer, captions)
    return run.text_encoder(ids.to(run.accelerator.device))[0]  # (B, 77, D)


def _training_state(run: Run) -> TrainingState:
    return TrainingState(
        trainable={**run.trainable, **{f"ema:{n}": t for n, t in run.ema.items()}},
        optimizer=_unwrap_optimizer(run.optimizer),
        lr_scheduler=run.lr_scheduler,
        scaler=run.accelerator.scaler,
    )


def _plain(run: Run, module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, without DDP or torch.compile around it (its parameter names)."""
    return run.accelerator.unwrap_model(module, keep_torch_compile=False)


def _unwrap_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


# ------------------------------------------------------------------------------ the loop
def train(run: Run) -> None:
    """Train from ``run.step`` to ``max_steps``: log every ``log_every`` steps (and the last),
    sample and checkpoint on schedule, and end with a checkpoint of the last step.

    Raises:
        TrainingDiverged: the loss became NaN or inf (the last good checkpoint is kept).
    """
    cfg, acc = run.cfg, run.accelerator
    writer = _tensorboard(run.run_dir) if acc.is_main_process else None
    bar = tqdm(
        total=cfg.max_steps,
        initial=run.step,
        desc=f"{cfg.optimizer} lr={run.lr:g}",
        unit="step",
        disable=not acc.is_local_main_process,
        dynamic_ncols=True,
    )
    # the bar and the log close however the loop ends: an error is the last line people see
    with bar, writer if writer is not None else contextlib.nullcontext():
        while run.step < cfg.max_steps:
            _train_and_log(run, bar, writer)
    latest = run.run_dir.latest_checkpoint()
    if latest is None or latest[0] != run.step:
        checkpoint(run)


def _train_and_log(run: Run, bar, writer) -> None:
    """One step, its metrics record, and the samples and checkpoint due after it."""
    cfg, acc = run.cfg, run.accelerator
    start = time.perf_counter()
    loss = _train_step(run)
    record = {
        "step": run.step,
        "loss": loss,
        "step_time": time.perf_counter() - start,
        "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(run.optimizer.param_groups)},
        "peak_mem_mb": peak_memory_mb(acc.device),
    }
    if run.held_out and (run.step % cfg.validation_loss_every == 0 or run.step == cfg.max_steps):
        record["val_loss"] = validation_loss(run)
    logged = run.step % cfg.log_every == 0 or run.step == cfg.max_steps or "val_loss" in record
    if acc.is_main_process and logged:
        _log(run, record, writer)
    bar.set_postfix(
        loss=f"{loss:.4f}", **({"val": f"{record['val_loss']:.4f}"} if "val_loss" in record else {})
    )
    bar.update(1)

    due = cfg.validation_every and run.step % cfg.validation_every == 0
    if due and run.step < cfg.max_steps:  # the last step gets samples/final instead
        validate_samples(run)
    if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
        checkpoint(run)


def _train_step(run: Run) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the loss of the global
    batch (the mean over processes of each one's summed micro-batch losses)."""
    cfg, acc = run.cfg, run.accelerator
    trained = [run.unet] + ([run.text_encoder] if run.trains_text_encoder else [])
    losses = []
    for micro in range(cfg.grad_accum):
        batch = _batch(run, micro)
        with contextlib.ExitStack() as stack:
            # gradients are all-reduced once, on the last micro-batch, for every DDP module
            if micro < cfg.grad_accum - 1 and acc.num_processes > 1:
                for module in trained:
                    stack.enter_context(acc.no_sync(module))
            with acc.autocast():
                micro_loss = _loss(run, batch) / cfg.grad_accum
            acc.backward(micro_loss)
        losses.append(micro_loss.detach().float())
    # one host sync per step; every rank sees every rank's loss, so a NaN anywhere stops all of
    # them at this step (one rank stopping alone would leave the others in the next all-reduce)
    per_rank = acc.gather(torch.stack(losses).sum()[None].to(acc.device)).cpu()  # (ranks,)
    loss = per_rank.mean().item()
    if not math.isfinite(loss):
        bad = [i for i, v in enumerate(per_rank.tolist()) if not math.isfinite(v)]
        raise TrainingDiverged(_diverged_message(run, loss, bad_ranks=bad))
    if cfg.max_grad_norm > 0:
        acc.clip_grad_norm_(list(run.trainable.values()), cfg.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    _limit_embeddings(run)
    if run.ema:
        with torch.no_grad():
            for name, p in run.trainable.items():
                run.ema[name].mul_(run.cfg.ema_decay).add_(p.detach(), alpha=1 - run.cfg.ema_decay)
    run.step += 1
    return loss


def _limit_embeddings(run: Run) -> None:
    """Mix-of-Show's norm threshold: once the mean L2 norm of the token vectors' rows reaches
    embeddings_max_norm they stop changing (kept as they were at that step)."""
    limit = run.cfg.embeddings_max_norm
    vectors = next((p for n, p in run.trainable.items() if n.endswith(".vectors")), None)
    if limit <= 0 or vectors is None:
        return
    with torch.no_grad():
        if run.frozen_vectors is not None:
            vectors.copy_(run.frozen_vectors)
        elif vectors.norm(dim=-1).mean().item() >= limit:
            run.frozen_vectors = vectors.detach().clone()
            run.accelerator.print(
                f"step {run.step + 1}: the token vectors' mean norm reached "
                f"embeddings_max_norm {limit:g}; they are kept from here on"
            )


def _example_generator(seed: int, k: int) -> torch.Generator:
    """The draws of global example k (module docstring): independent of how batches split."""
    return torch.Generator().manual_seed((seed * 1_000_003 + k) * 131 % (2**63 - 1))


def _batch(run: Run, micro: int) -> dict[str, Any]:
    """The examples of (step, micro-batch, rank): an epoch-wise permutation of the dataset,
    or with buckets=true the chunk of ``run.batches`` numbered as the micro-batch over the
    ranks (so N processes train what one does with grad_accum N). With prior preservation,
    one class example per concept example follows them (``prior_from`` says where), at the
    chunk's size: the UNet sees both in one call."""
    cfg, acc, n = run.cfg, run.accelerator, len(run.dataset)
    chunk = (run.step * cfg.grad_accum + micro) * acc.num_processes + acc.process_index
    first = chunk * cfg.batch_size
    ks = range(first, first + cfg.batch_size)
    if run.batches is not None:
        indices = run.batches.chunk(chunk)
        epochs = [chunk // run.batches.chunks_per_epoch] * cfg.batch_size
    else:
        epochs = [k // n for k in ks]
        indices = [
            _permuted(cfg.seed, epoch, n)[k % n] for k, epoch in zip(ks, epochs, strict=True)
        ]
    gens = [_example_generator(cfg.seed, k) for k in ks]
    batch = _examples(run, run.dataset, "latents", indices, epochs, gens)
    captions = batch["captions"]
    if _augments_captions(cfg):  # their own stream: the draws above stay those of plain runs
        captions = [
            augment_caption(c, _caption_rng(cfg.seed, k), shuffle=cfg.shuffle_captions,
                            keep_tokens=cfg.keep_tokens, templates=cfg.caption_templates)
            for c, k in zip(captions, ks, strict=True)
        ]  # fmt: skip
    if cfg.caption_dropout > 0:  # a stream of its own: the other draws stay as they were
        captions = [
            "" if _caption_rng(cfg.seed, k, stream=2).random() < cfg.caption_dropout else c
            for c, k in zip(captions, ks, strict=True)
        ]
    batch["captions"] = captions
    if run.class_dataset is not None:
        size = None if run.dataset.sizes is None else run.dataset.sizes[indices[0]]
        batch = _with_class_examples(run, batch, ks, size)
    return batch


def _with_class_examples(
    run: Run, batch: dict[str, Any], ks: range, size: tuple[int, int] | None
) -> dict[str, Any]:
    """``batch`` followed by one class example per global example k (an epoch-wise
    permutation of the class images, with draws of their own), at ``size`` (None: the
    square)."""
    cfg, dataset = run.cfg, run.class_dataset
    if size is not None:  # the class images at this bucket's size, made once
        key = ("class_dataset", size)
        if key not in run.cache:
            run.cache[key] = ConceptDataset(
                dataset.examples, resolution=cfg.resolution, center_crop=cfg.center_crop,
                random_flip=cfg.random_flip, seed=cfg.seed, sizes=[size] * len(dataset),
            )  # fmt: skip
        dataset = run.cache[key]
    m = len(dataset)
    epochs = [k // m for k in ks]
    indices = [_permuted(cfg.seed + _CLASS_STREAM, e, m)[k % m] for k, e in zip(ks, epochs, strict=True)]  # fmt: skip
    gens = [_example_generator(cfg.seed + _CLASS_STREAM, k) for k in ks]
    extra = _examples(run, dataset, ("class_latents", size), indices, epochs, gens)
    joined = {key: _cat(batch[key], extra[key]) for key in ("latents", "noise", "timesteps", "mask", "valid")}  # fmt: skip
    return {**joined, "captions": batch["captions"] + extra["captions"],
            "prior_from": len(batch["captions"])}  # fmt: skip


def _cat(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None else torch.cat([a, b])


_CLASS_STREAM = 0x5EED_C1A5  # the class examples' draws: another seed's would not collide


def _examples(
    run: Run,
    dataset: ConceptDataset,
    cache_key: Any,
    indices: list[int],
    epochs: list[int],
    gens: list[torch.Generator],
) -> dict[str, Any]:
    """Examples ``indices`` of ``dataset`` (augmented as in ``epochs``) with their latents,
    noise, timestep and captions, generator i drawing for example i. Latents come from
    ``run.cache[cache_key]`` (made on first use) when cache_latents is on."""
    cfg, acc = run.cfg, run.accelerator
    # drawn on both paths so the noise that follows is the same with or without the cache
    flips = [bool(torch.rand((), generator=gen) < cfg.random_flip) for gen in gens]
    valid = None  # resize-crop-pad's pasted area (no cache: config refuses the pair)
    if cfg.cache_latents:
        if cache_key not in run.cache:
            with torch.no_grad():
                run.cache[cache_key] = _encode_fixed(run, dataset)
        means, stds, masks = run.cache[cache_key]
        pick = list(zip(indices, map(int, flips), strict=True))  # int: a bool would mask
        mean = torch.stack([means[i][f] for i, f in pick])
        std = torch.stack([stds[i][f] for i, f in pick])
        mask = torch.stack([masks[i][f] for i, f in pick])
        latents = mean + std * _randn(mean.shape, gens)
    else:
        items = []
        for epoch, i in zip(epochs, indices, strict=True):
            dataset.set_epoch(epoch)
            items.append(dataset[i])
        pixels = torch.stack([it["pixel_values"] for it in items])
        mask = torch.stack([it["mask"] for it in items])
        valid = torch.stack([it["valid"] for it in items])
        vae = run.pipe.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(acc.device, vae.dtype)).latent_dist
            latents = dist.mean.float().cpu() + dist.std.float().cpu() * _randn(
                dist.mean.shape, gens
            )
    latents = latents * run.pipe.vae.config.scaling_factor
    noise = _randn(latents.shape, gens)
    if cfg.noise_offset:
        noise += cfg.noise_offset * _randn(latents.shape[:2] + (1, 1), gens)
    num_timesteps = run.noise_scheduler.config.num_train_timesteps
    timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=g) for g in gens])
    return {
        "latents": latents,
        "noise": noise,
        "timesteps": timesteps,
        "mask": mask,
        # the pasted area of resize-crop-pad, the loss's mask when use_masks is false
        "valid": None if cfg.augmentation == "crop" else valid,
        "captions": [dataset.examples[i].caption for i in indices],
    }


def _permuted(seed: int, epoch: int, n: int) -> list[int]:
    """The epoch's order of the n examples."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch)).tolist()


def _caption_rng(seed: int, k: int, *, stream: int = 1) -> np.random.Generator:
    """Example k's caption draws: stream 1 augments, stream 2 drops."""
    entropy = [seed & 0xFFFF_FFFF_FFFF_FFFF, k, stream]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def _randn(shape: torch.Size | tuple[int, ...], gens: list[torch.Generator]) -> torch.Tensor:
    """(B, ...) normal draws, row i from generator i."""
    return torch.stack([torch.randn(shape[1:], generator=g) for g in gens])


def _loss(run: Run, batch: dict[str, Any], *, attention: bool = True) -> torch.Tensor:
    """Noise-prediction MSE of the batch (mask-weighted, optionally min-SNR weighted; with
    class examples, their mean MSE times prior_loss_weight added; times loss_scale), plus the
    attention regularisation when attn_reg_weight > 0 and ``attention`` (class captions hold
    no concept word, so only the concept's rows count there)."""
    cfg, device, sched = run.cfg, run.accelerator.device, run.noise_scheduler
    latents, noise = batch["latents"].to(device), batch["noise"].to(device)
    timesteps = batch["timesteps"].to(device)
    noisy = sched.add_noise(latents, noise, timesteps)
    if "text" in run.cache:
        context = torch.stack([run.cache["text"][c] for c in batch["captions"]]).to(device)
    else:
        context = _encode_text(run, batch["captions"])
    unet_dtype = next(run.unet.parameters()).dtype
    with _recording(run, attention) as records:
        pred = run.unet(noisy.to(unet_dtype), timesteps, context.to(unet_dtype)).sample
    target = prediction_target(sched, latents, noise, timesteps)
    mask = batch["mask"] if cfg.use_masks else batch["valid"]
    per_sample = per_sample_mse(pred, target, None if mask is None else mask.to(device))
    if cfg.min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(sched, timesteps, cfg.min_snr_gamma)
    n = batch.get("prior_from", len(per_sample))  # the class examples follow the concept's
    loss = per_sample[:n].mean()
    if n < len(per_sample):
        loss = loss + cfg.prior_loss_weight * per_sample[n:].mean()
    loss = loss * cfg.loss_scale
    if records:
        positions = word_positions(_caption_ids(run, batch["captions"]).to(device),
                                   _word_ids(run))  # fmt: skip
        penalty = attention_penalty(records, positions, batch["mask"].to(device),
                                    tuple(latents.shape[-2:]))  # fmt: skip
        loss = loss + cfg.attn_reg_weight * penalty
    return loss


@contextlib.contextmanager
def _recording(run: Run, enabled: bool):
    """The cross-attention probabilities of one UNet call, when attn_reg_weight > 0 and
    ``enabled``."""
    if run.cfg.attn_reg_weight <= 0 or not enabled:
        yield []
        return
    records: list = []
    layers = edlora.processors(_plain(run, run.unet))
    for p in layers:
        p.record = records
    try:
        yield records
    finally:
        for p in layers:
            p.record = None


def _caption_ids(run: Run, captions: list[str]) -> torch.Tensor:
    """The token ids of the captions as layer 0 reads them (the words' positions)."""
    words = edlora.layer_words(_plain(run, run.unet)) if run.cfg.edlora else None
    texts = [words.bind(c, 0) for c in captions] if words else captions
    return tokenize(run.pipe.tokenizer, texts)


def _word_ids(run: Run) -> list[int]:
    """Each concept word's token id as layer 0 reads it."""
    words = edlora.layer_words(_plain(run, run.unet)) if run.cfg.edlora else None
    tokens = [words.tokens[w][0] for w in run.concept.words] if words else run.concept.words
    return run.pipe.tokenizer.convert_tokens_to_ids(tokens)


def _log(run: Run, record: dict[str, Any], writer) -> None:
    run.run_dir.append_metrics(record)
    if writer is not None:
        writer.add_scalar("loss", record["loss"], record["step"])
        if "val_loss" in record:
            writer.add_scalar("val_loss", record["val_loss"], record["step"])
        for name, value in record["lr"].items():
            writer.add_scalar(f"lr/{name}", value, record["step"])


def _tensorboard(run_dir: RunDir):
    # the one optional import: tensorboard is a dependency, but a run must not die for a log
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir.tensorboard))


def _diverged_message(run: Run, loss: float, *, bad_ranks: list[int]) -> str:
    last = run.run_dir.latest_checkpoint()
    kept = (
        f"the last good checkpoint is {last[1].path}" if last else "no checkpoint was written yet"
    )
    processes = run.accelerator.num_processes
    where = f" (on rank {', '.join(map(str, bad_ranks))} of {processes})" if processes > 1 else ""
    return (
        f"the loss became {loss} at step {run.step + 1}{where}; training stopped and {kept}. "
        f"Lower the learning rate (now {run.lr:g}, --lr) or use --set mixed_precision=no"
    )


def checkpoint(run: Run) -> None:
    """Save ``checkpoints/step-NNNNNN`` of the current step (the main process writes it)."""
    if run.accelerator.is_main_process:
        save_checkpoint(run.run_dir, run.step, _training_state(run), keep=run.cfg.keep_checkpoints)


# ----------------------------------------------------------------------- validation samples
def validate_samples(run: Run, tag: str | None = None) -> list[Path]:
    """The concept's validation prompts with the validation seeds, drawn with the live modules
    into ``samples/<tag>`` (default: the current step's)."""
    if not run.accelerator.is_main_process:
        return []
    cfg = run.cfg
    pipe = sampling_pipeline(
        run.pipe,
        text_encoder=_plain(run, run.text_encoder),
        unet=_plain(run, run.unet),
    )
    settings = SampleSettings.of_run(cfg)
    out = run.run_dir.samples(tag or step_tag(run.step))
    with run.accelerator.autocast(), _eval_mode(pipe.unet, pipe.text_encoder):
        return write_samples(pipe, run.concept.prompts(), cfg.validation_seeds, settings, out)


@contextlib.contextmanager
def _eval_mode(*modules: torch.nn.Module):
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
    """lora.safetensors, lora_kohya.safetensors, embeddings.safetensors, gsnr.json (written by
    the main process; under DDP every rank first checks that all hold the same SGD-SaI scales).

    Raises:
        UserError: a file cannot be written (disk full, read-only folder).
    """
    acc = run.accelerator
    optimizer = _unwrap_optimizer(run.optimizer)
    if acc.num_processes > 1 and isinstance(optimizer, SGDSaI):
        _check_scales_agree(run, optimizer)
    if not acc.is_main_process:
        return {}
    try:
        return _write_outputs(run, optimizer)
    except OSError as exc:
        raise UserError(
            f"cannot write the outputs of {run.run_dir.path} ({first_line(exc)}); free disk "
            f"space or make the folder writable, then run --resume {run.run_dir.path} again "
            "(it writes them from the last checkpoint)"
        ) from None


def _check_scales_agree(run: Run, optimizer: SGDSaI) -> None:
    """g-SNR is computed from all-reduced gradients, so every rank must hold the same scales;
    a difference would mean the ranks trained different models."""
    table = optimizer.gsnr_table()
    scales = torch.tensor([r["scale"] if r["initialised"] else -1.0 for r in table])
    every = run.accelerator.gather(scales[None].to(run.accelerator.device)).cpu()
    if not torch.equal(every, every[:1].expand_as(every)):
        raise RuntimeError("SGD-SaI scales differ between ranks: the gradients were not synced")


def _write_outputs(run: Run, optimizer) -> dict[str, Path]:
    cfg = run.cfg
    unet, text_encoder = _plain(run, run.unet), _plain(run, run.text_encoder)
    bake_token_embeddings(text_encoder)
    metadata = {
        "optimizer": cfg.optimizer,
        "learning_rate": f"{run.lr:g}",
        "max_train_steps": str(run.step),
        "resolution": str(cfg.resolution),
        "sai_rank": str(cfg.rank),
        "sai_alpha": f"{cfg.alpha:g}",
        "sai_base_model": str(cfg.base_model),
        "sai_base_model_hash": run.base_fingerprint,
        "sai_concept": run.concept.name,
        "sai_token": run.concept.token,
    }
    gsnr = None
    if isinstance(optimizer, SGDSaI):
        gsnr = optimizer.gsnr_table({p: n for n, p in run.trainable.items()})
        metadata["sai_gsnr_scales"] = json.dumps({r["name"]: r["scale"] for r in gsnr})
    elif cfg.optimizer.startswith("scaled-"):
        metadata["sai_scaled_variant"] = f"peft create_riemannian_optimizer reg={cfg.scaled_reg:g}"
    files = _write_file_set(run, run.run_dir, unet, text_encoder, metadata)
    if gsnr is not None:
        run.run_dir.write_gsnr(gsnr)
    if run.ema:  # the averaged tensors, as their own file set in ema/
        with _ema_weights(run, text_encoder):
            ema_dir = run.run_dir.ema
            metadata = {**metadata, "sai_ema_decay": f"{cfg.ema_decay:g}"}
            files |= {f"ema/{k}": v
                      for k, v in _write_file_set(run, ema_dir, unet, text_encoder, metadata).items()}  # fmt: skip
    return files


def _write_file_set(run: Run, run_dir: RunDir, unet, text_encoder, metadata) -> dict[str, Path]:
    """lora.safetensors, lora_kohya.safetensors and the token vectors (embeddings.safetensors,
    or an ED-LoRA run's edlora.safetensors) of the modules as they are, into ``run_dir``."""
    cfg = run.cfg
    run_dir.path.mkdir(parents=True, exist_ok=True)
    files = save_lora(
        run_dir.path,
        unet=unet,
        text_encoder=text_encoder if cfg.text_encoder_lora else None,
        rank=cfg.rank,
        alpha=cfg.alpha,
        text_encoder_alpha=cfg.text_encoder_alpha,
        metadata=metadata,
    )
    if cfg.edlora:  # (L, D) per word; a TI file would read it as L tokens, so none is written
        files["edlora"] = save_edlora(
            run_dir.edlora,
            _layerwise_vectors(run, text_encoder),
            layers=[name for name, _ in edlora.cross_attention_layers(unet)],
            metadata={k: metadata[k] for k in ("sai_concept", "sai_token", "sai_base_model")},
        )
    else:
        files["embeddings"] = save_embeddings(
            run_dir.embeddings,
            tokenizer=run.pipe.tokenizer,
            text_encoder=text_encoder,
            tokens=run.concept.words,
        )
    return files


@contextlib.contextmanager
def _ema_weights(run: Run, text_encoder):
    """The trained tensors (and the baked token rows) holding their averages, then the raw
    values back."""
    raw = {n: p.detach().clone() for n, p in run.trainable.items()}
    table = text_encoder.get_input_embeddings().weight
    ids = torch.tensor(run.token_ids, device=table.device)
    rows = table[ids].detach().clone()
    try:
        with torch.no_grad():
            for name, p in run.trainable.items():
                p.copy_(run.ema[name])
                if name.endswith(".vectors"):  # baked: the table's rows are what files read
                    table[ids] = run.ema[name].to(table.dtype)
        yield
    finally:
        with torch.no_grad():
            for name, p in run.trainable.items():
                p.copy_(raw[name])
            table[ids] = rows


def _layerwise_vectors(run: Run, text_encoder) -> dict[str, torch.Tensor]:
    """``{word: (L, D)}`` of an ED-LoRA run, read from the (baked) embedding table."""
    words = edlora.layer_words(_plain(run, run.unet))
    weight = text_encoder.get_input_embeddings().weight
    vocab = run.pipe.tokenizer.get_vocab()
    return {
        w: weight[[vocab[t] for t in words.tokens[w]]].detach().float().cpu()
        for w in run.concept.words
    }


# ------------------------------------------------------------------------------ entry point
def default_run_dir(cfg: TrainConfig, concept: Concept) -> Path:
    """``runs/<concept>/<optimizer>-lr<lr>-s<seed>-<date>-<time>``."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (
        Path("runs")
        / concept.name
        / f"{cfg.optimizer}-lr{cfg.resolved_lr(concept):g}-s{cfg.seed}-{stamp}"
    )


def run_training(
    cfg: TrainConfig, concept: Concept, run_dir: Path, *, resume: bool = False
) -> Path:
    """Set up, train, save: the whole job. Returns the run directory.

    Raises:
        UserError: bad input (see ``setup``), or a non-empty ``run_dir`` without ``resume``.
        TrainingDiverged: the loss became NaN or inf.
    """
    run_dir = Path(run_dir)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(
            f"output folder {run_dir} is not empty; choose another --output-dir "
            f"or continue it with --resume {run_dir}"
        )
    run = setup(cfg, concept, run_dir, resume=resume)
    # every process has checked the folder above before the main one writes into it
    run.accelerator.wait_for_everyone()
    if run.accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs have proved good
        run.run_dir.write_config(
            cfg,
            concept,
            {"lr": run.lr, "base_model_hash": run.base_fingerprint, "token_ids": run.token_ids},
        )
    train(run)
    save_outputs(run)  # first: an interrupted final sampling must not cost the LoRA
    validate_samples(run, tag=FINAL_SAMPLES)
    return run_dir
