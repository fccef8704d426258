"""The LoRA training recipe: ``setup()`` builds the parts, ``train()`` runs the loop, then save.

Every random draw of step s (which images, crops, noise, timesteps) is derived from
(seed, s), never from a running RNG, so a run resumed from a checkpoint continues exactly as
the uninterrupted run would have (bitwise on CPU).
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import config as cfgmod
from .config import Concept, TrainConfig
from .data import ConceptDataset, discover_examples, downsample_mask
from .errors import UserError
from .fsutil import atomic_dir, atomic_write_text
from .optim import SGDSaI, build_optimizer

CHECKPOINT_PREFIX = "step-"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; the message names the step and the last good checkpoint."""


@dataclass
class Run:
    """Everything the loop needs, built by ``setup``."""

    cfg: TrainConfig
    concept: Concept
    run_dir: Path
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


# ----------------------------------------------------------------------------------- setup
def setup(cfg: TrainConfig, concept: Concept, run_dir: Path, *, resume: bool = False) -> Run:
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    from .lora_io import add_concept_tokens, add_lora
    from .models import BUILTIN_MINIATURE, load_base_model, model_fingerprint
    from .tokens import make_token_embeddings_trainable

    # 1. Data first: a bad dataset should fail in a second, before a model is loaded.
    examples = discover_examples(
        concept.data, token=concept.token, caption_template=concept.caption_template
    )
    dataset = ConceptDataset(
        examples,
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        random_flip=cfg.random_flip,
        seed=cfg.seed,
    )

    # accelerate keeps one global state per process; a second run in the same process (tests,
    # the app) may want another precision. The distributed part (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        print("note: fp16 needs a GPU; training in fp32 on the CPU (mixed_precision=no)")
        cfg.mixed_precision = "no"
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available()
    )
    torch.manual_seed(cfg.seed)  # LoRA A init (peft draws from the global generator)

    # 2. The base model, frozen; weights in the compute dtype when training in half precision.
    if cfg.base_model is None:
        raise UserError(
            "no base model given: pass --base-model with a diffusers folder, a "
            ".safetensors checkpoint (e.g. ChilloutMix) or a hub id"
        )
    if cfg.base_model == BUILTIN_MINIATURE:
        print(
            "base model: the built-in miniature model (32 px world, CPU demo); pass "
            "--base-model for a real SD 1.5-class checkpoint"
        )
    pipe = load_base_model(
        cfg.base_model,
        base_config=Path(cfg.base_config) if cfg.base_config else None,
        allow_pickle=cfg.allow_pickle,
    )
    unet, text_encoder, vae = pipe.unet, pipe.text_encoder, pipe.vae
    for module in (unet, text_encoder, vae):
        module.requires_grad_(False)
        module.eval()
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        cfg.mixed_precision
    ]
    device = accelerator.device
    unet.to(device, dtype=weight_dtype)
    text_encoder.to(device, dtype=weight_dtype)
    vae.to(device, dtype=torch.float32 if cfg.vae_fp32 else weight_dtype)

    # 3. The concept token, initialised from the class word, before LoRA wraps the encoder.
    generator = torch.Generator().manual_seed(cfg.seed)
    token_ids = add_concept_tokens(
        pipe.tokenizer,
        text_encoder,
        [concept.token],
        init_word=concept.class_word,
        init_noise_std=cfg.init_noise_std,
        generator=generator,
    )

    # 4. LoRA adapters; only they (and optionally the token vectors) train, in fp32.
    add_lora(
        unet,
        text_encoder if cfg.text_encoder_lora else None,
        rank=cfg.rank,
        alpha=cfg.alpha,
        unet_targets=tuple(cfg.lora_targets),
        text_encoder_rank=cfg.text_encoder_rank,
        text_encoder_alpha=cfg.text_encoder_alpha,
    )
    if cfg.train_embeddings:
        make_token_embeddings_trainable(text_encoder, token_ids)
    trainable = _trainable_parameters(unet, text_encoder)
    for p in trainable.values():
        p.data = p.data.float()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if cfg.text_encoder_lora:
            text_encoder.gradient_checkpointing_enable()

    # 5. Optimizer over named groups (UNet, text encoder, token vectors), then the lr schedule.
    lr = cfg.resolved_lr(concept)
    optimizer = build_optimizer(
        cfg.optimizer,
        _param_groups(trainable, cfg, lr),
        lr=lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        reg=cfg.scaled_reg,
        eps=cfg.sai_eps if cfg.optimizer == "sgd-sai" else None,
    )
    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler, cfg.lr_scheduler)
    lr_scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps
    )

    # 6. accelerate wraps the trained modules (DDP across GPUs) and the optimizer (GradScaler).
    trains_text = cfg.text_encoder_lora or cfg.train_embeddings
    if trains_text:
        unet, text_encoder, optimizer = accelerator.prepare(unet, text_encoder, optimizer)
    else:
        unet, optimizer = accelerator.prepare(unet, optimizer)

    run = Run(
        cfg=cfg,
        concept=concept,
        run_dir=run_dir,
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
        base_fingerprint=model_fingerprint(cfg.base_model),
    )
    # 7. Caches: latents when the VAE input is fixed, text embeddings when the encoder is frozen.
    if cfg.cache_latents:
        _cache_latents(run)
    if not trains_text:
        _cache_text(run)
    if resume:
        _load_latest_checkpoint(run)
    return run


def _trainable_parameters(unet, text_encoder) -> dict[str, torch.nn.Parameter]:
    named = {f"unet.{n}": p for n, p in unet.named_parameters() if p.requires_grad}
    named.update(
        {f"text_encoder.{n}": p for n, p in text_encoder.named_parameters() if p.requires_grad}
    )
    return named


def _param_groups(trainable: dict[str, torch.nn.Parameter], cfg: TrainConfig, lr: float):
    """UNet LoRA at lr; text-encoder LoRA at lr_text_encoder (default lr/10, as Mix-of-Show's
    1e-5 vs 1e-4); token vectors at lr_embeddings (default lr)."""
    groups = {"unet": [], "text_encoder": [], "embeddings": []}
    for name, p in trainable.items():
        if name.endswith(".vectors"):
            groups["embeddings"].append((name, p))
        elif name.startswith("text_encoder."):
            groups["text_encoder"].append((name, p))
        else:
            groups["unet"].append((name, p))
    lrs = {
        "unet": lr,
        "text_encoder": cfg.lr_text_encoder if cfg.lr_text_encoder is not None else lr / 10,
        "embeddings": cfg.lr_embeddings if cfg.lr_embeddings is not None else lr,
    }
    return [{"name": k, "params": v, "lr": lrs[k]} for k, v in groups.items() if v]


@torch.no_grad()
def _cache_latents(run: Run) -> None:
    """VAE posteriors (mean, std) of each image, unflipped and flipped, at the centre crop."""
    vae, device = run.pipe.vae, run.accelerator.device
    fixed = ConceptDataset(
        run.dataset.examples,
        resolution=run.cfg.resolution,
        center_crop=True,
        random_flip=0.0,
        seed=run.cfg.seed,
    )
    means, stds, masks = [], [], []
    for i in range(len(fixed)):
        item = fixed[i]
        pixels = torch.stack([item["pixel_values"], item["pixel_values"].flip(-1)])
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        means.append(dist.mean.float().cpu())  # (2, 4, h, w)
        stds.append(dist.std.float().cpu())
        masks.append(torch.stack([item["mask"], item["mask"].flip(-1)]))  # (2, 1, H, W)
    run.cache["latents"] = (torch.stack(means), torch.stack(stds), torch.stack(masks))


@torch.no_grad()
def _cache_text(run: Run) -> None:
    captions = sorted({e.caption for e in run.dataset.examples})
    run.cache["text"] = {c: _encode_text(run, [c])[0].cpu() for c in captions}


def _encode_text(run: Run, captions: list[str]) -> torch.Tensor:
    tok = run.pipe.tokenizer
    ids = tok(
        captions,
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return run.text_encoder(ids.to(run.accelerator.device))[0]  # (B, 77, D)


# ------------------------------------------------------------------------------ the loop
def train(run: Run) -> None:
    cfg, acc = run.cfg, run.accelerator
    metrics_path = run.run_dir / "metrics.jsonl"
    writer = _tensorboard(run.run_dir)
    bar = tqdm(
        total=cfg.max_steps,
        initial=run.step,
        desc=f"{cfg.optimizer} lr={run.lr:g}",
        unit="step",
        disable=not acc.is_local_main_process,
        dynamic_ncols=True,
    )
    while run.step < cfg.max_steps:
        start = time.perf_counter()
        loss = 0.0
        for micro in range(cfg.grad_accum):
            batch = _batch(run, micro)
            sync = micro == cfg.grad_accum - 1
            ctx = acc.no_sync(run.unet) if not sync and acc.num_processes > 1 else _null()
            with ctx, acc.autocast():
                micro_loss = _loss(run, batch) / cfg.grad_accum
            acc.backward(micro_loss)
            loss += micro_loss.detach().float().item()
        if not math.isfinite(loss):
            raise TrainingDiverged(_diverged_message(run, loss))
        if cfg.max_grad_norm > 0:
            acc.clip_grad_norm_(list(run.trainable.values()), cfg.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        run.step += 1

        step_time = time.perf_counter() - start
        record = {
            "step": run.step,
            "loss": loss,
            "step_time": step_time,
            "lr": {
                g.get("name", str(i)): g["lr"] for i, g in enumerate(run.optimizer.param_groups)
            },
            "peak_mem_mb": _peak_memory_mb(acc.device),
        }
        if acc.is_main_process and (run.step % cfg.log_every == 0 or run.step == cfg.max_steps):
            with metrics_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if writer is not None:
                writer.add_scalar("loss", loss, run.step)
                for name, value in record["lr"].items():
                    writer.add_scalar(f"lr/{name}", value, run.step)
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)

        if (
            cfg.validation_every
            and run.step % cfg.validation_every == 0
            and run.step < cfg.max_steps
        ):
            validate_samples(run)
        if cfg.checkpoint_every and run.step % cfg.checkpoint_every == 0:
            save_checkpoint(run)
    bar.close()
    if writer is not None:
        writer.close()
    latest = _latest_checkpoint(run.run_dir)
    if latest is None or latest[0] != run.step:
        save_checkpoint(run)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _step_generator(run: Run, micro: int) -> torch.Generator:
    acc = run.accelerator
    key = ((run.cfg.seed * 1_000_003 + run.step) * 1009 + micro) * 131 + acc.process_index
    return torch.Generator().manual_seed(key % (2**63 - 1))


def _batch(run: Run, micro: int) -> dict[str, Any]:
    """The examples of (step, micro-batch, rank): an epoch-wise permutation of the dataset."""
    cfg, acc, n = run.cfg, run.accelerator, len(run.dataset)
    first = (
        (run.step * cfg.grad_accum + micro) * acc.num_processes + acc.process_index
    ) * cfg.batch_size
    indices, flips = [], []
    gen = _step_generator(run, micro)
    for k in range(first, first + cfg.batch_size):
        epoch, pos = divmod(k, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 7919 + epoch))
        indices.append(int(perm[pos]))
        # drawn on both paths so the noise that follows is the same with or without the cache
        flips.append(bool(torch.rand((), generator=gen) < cfg.random_flip))
    if "latents" in run.cache:
        means, stds, masks = run.cache["latents"]
        sel = torch.tensor(indices)
        flip = torch.tensor(flips, dtype=torch.long)
        mean, std, mask = means[sel, flip], stds[sel, flip], masks[sel, flip]
        latents = mean + std * torch.randn(mean.shape, generator=gen)
    else:
        items = []
        for k, i in zip(range(first, first + cfg.batch_size), indices, strict=True):
            run.dataset.set_epoch(k // n)
            items.append(run.dataset[i])
        pixels = torch.stack([it["pixel_values"] for it in items])
        mask = torch.stack([it["mask"] for it in items])
        vae = run.pipe.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(acc.device, vae.dtype)).latent_dist
            latents = dist.mean.float().cpu() + dist.std.float().cpu() * torch.randn(
                dist.mean.shape, generator=gen
            )
    latents = latents * run.pipe.vae.config.scaling_factor
    captions = [run.dataset.examples[i].caption for i in indices]
    noise = torch.randn(latents.shape, generator=gen)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen)
    timesteps = torch.randint(
        0, run.noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen
    )
    return {
        "latents": latents,
        "noise": noise,
        "timesteps": timesteps,
        "mask": mask,
        "captions": captions,
    }


def _loss(run: Run, batch: dict[str, Any]) -> torch.Tensor:
    """Noise-prediction MSE, mask-weighted, optionally min-SNR weighted."""
    device, sched = run.accelerator.device, run.noise_scheduler
    latents, noise = batch["latents"].to(device), batch["noise"].to(device)
    timesteps = batch["timesteps"].to(device)
    noisy = sched.add_noise(latents, noise, timesteps)
    if "text" in run.cache:
        context = torch.stack([run.cache["text"][c] for c in batch["captions"]]).to(device)
    else:
        context = _encode_text(run, batch["captions"])
    unet_dtype = next(run.unet.parameters()).dtype
    pred = run.unet(noisy.to(unet_dtype), timesteps, context.to(unet_dtype)).sample.float()
    if sched.config.prediction_type == "v_prediction":
        target = sched.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    err = (pred - target.float()) ** 2  # (B, 4, h, w)
    if run.cfg.use_masks:
        weight = downsample_mask(batch["mask"].to(device), tuple(err.shape[-2:]))  # (B, 1, h, w)
        per_sample = (err * weight).sum((1, 2, 3)) / (
            weight.sum((1, 2, 3)) * err.shape[1]
        ).clamp_min(1e-6)
    else:
        per_sample = err.mean((1, 2, 3))
    if run.cfg.min_snr_gamma > 0:
        per_sample = per_sample * _min_snr_weight(sched, timesteps, run.cfg.min_snr_gamma)
    return per_sample.mean()


def _min_snr_weight(sched, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Hang et al. 2023: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction."""
    alphas = sched.alphas_cumprod.to(timesteps.device)[timesteps]
    snr = alphas / (1 - alphas)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if sched.config.prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped / snr


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but the run must not die for a log
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def _diverged_message(run: Run, loss: float) -> str:
    last = _latest_checkpoint(run.run_dir)
    kept = f"the last good checkpoint is {last[1]}" if last else "no checkpoint was written yet"
    return (
        f"the loss became {loss} at step {run.step + 1}; training stopped and {kept}. "
        f"Lower the learning rate (now {run.lr:g}, --lr) or use --set mixed_precision=no"
    )


# ----------------------------------------------------------------------- validation samples
def validate_samples(run: Run, tag: str | None = None) -> list[Path]:
    from .sample import SampleSettings, sampling_pipeline, write_samples

    if not run.accelerator.is_main_process:
        return []
    cfg = run.cfg
    pipe = sampling_pipeline(
        vae=run.pipe.vae,
        text_encoder=run.accelerator.unwrap_model(run.text_encoder),
        tokenizer=run.pipe.tokenizer,
        unet=run.accelerator.unwrap_model(run.unet),
        scheduler_config=run.pipe.scheduler.config,
    )
    settings = SampleSettings(
        steps=cfg.sample_steps,
        guidance_scale=cfg.guidance_scale,
        negative_prompt=cfg.negative_prompt,
        height=cfg.resolution,
        width=cfg.resolution,
    )
    out = run.run_dir / "samples" / (tag or f"{CHECKPOINT_PREFIX}{run.step:06d}")
    with run.accelerator.autocast():
        return write_samples(pipe, run.concept.prompts(), cfg.validation_seeds, settings, out)


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(run: Run) -> Path:
    """checkpoints/step-NNNNNN/: trainable weights, optimizer, lr schedule; renamed when whole."""
    acc = run.accelerator
    path = run.run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{run.step:06d}"
    if not acc.is_main_process:
        return path
    with atomic_dir(path) as tmp:
        save_file(
            {n: p.detach().cpu().contiguous() for n, p in run.trainable.items()},
            str(tmp / "trainable.safetensors"),
        )
        torch.save(_unwrap_optimizer(run.optimizer).state_dict(), tmp / "optimizer.pt")
        torch.save(run.lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        if acc.scaler is not None:
            torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        (tmp / "state.json").write_text(json.dumps({"step": run.step}), encoding="utf-8")
    old = sorted((run.run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))
    for stale in old[: -run.cfg.keep_checkpoints]:
        shutil.rmtree(stale, ignore_errors=True)
    return path


def _unwrap_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)


def _latest_checkpoint(run_dir: Path) -> tuple[int, Path] | None:
    found = []
    for path in (run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"):
        if (path / "state.json").is_file():
            found.append((json.loads((path / "state.json").read_text())["step"], path))
    return max(found) if found else None


def _load_latest_checkpoint(run: Run) -> None:
    latest = _latest_checkpoint(run.run_dir)
    if latest is None:
        raise UserError(
            f"{run.run_dir}/checkpoints has no complete checkpoint to resume from; "
            "start a new run instead"
        )
    step, path = latest
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(run.trainable) ^ set(weights)
    if missing:
        raise UserError(
            f"{path}: the checkpoint does not match this run's trainable parameters "
            f"(e.g. {sorted(missing)[0]}); was run.yaml edited?"
        )
    with torch.no_grad():
        for name, p in run.trainable.items():
            p.copy_(weights[name])
    _unwrap_optimizer(run.optimizer).load_state_dict(
        torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    )
    run.lr_scheduler.load_state_dict(torch.load(path / "lr_scheduler.pt", weights_only=True))
    if run.accelerator.scaler is not None and (path / "scaler.pt").is_file():
        run.accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    run.step = step
    _truncate_metrics(run.run_dir / "metrics.jsonl", step)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint (they will be written again), and any torn line."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            continue
    atomic_write_text(path, "".join(k + "\n" for k in keep))


# --------------------------------------------------------------------------------- outputs
def save_outputs(run: Run) -> dict[str, Path]:
    """lora.safetensors, lora_kohya.safetensors, embeddings.safetensors, gsnr.json."""
    from .lora_io import save_embeddings, save_lora
    from .tokens import bake_token_embeddings

    acc, cfg = run.accelerator, run.cfg
    if not acc.is_main_process:
        return {}
    unet = acc.unwrap_model(run.unet)
    text_encoder = acc.unwrap_model(run.text_encoder)
    bake_token_embeddings(text_encoder)
    optimizer = _unwrap_optimizer(run.optimizer)
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
    if isinstance(optimizer, SGDSaI):
        table = gsnr_rows(run)
        metadata["sai_gsnr_scales"] = json.dumps({r["name"]: r["scale"] for r in table})
    elif cfg.optimizer.startswith("scaled-"):
        metadata["sai_scaled_variant"] = f"peft create_riemannian_optimizer reg={cfg.scaled_reg:g}"
    files = save_lora(
        run.run_dir,
        unet=unet,
        text_encoder=text_encoder if cfg.text_encoder_lora else None,
        rank=cfg.rank,
        alpha=cfg.alpha,
        text_encoder_alpha=cfg.text_encoder_alpha,
        metadata=metadata,
    )
    emb = run.run_dir / "embeddings.safetensors"
    save_embeddings(
        emb, tokenizer=run.pipe.tokenizer, text_encoder=text_encoder, tokens=[run.concept.token]
    )
    files["embeddings"] = emb
    if isinstance(optimizer, SGDSaI):
        atomic_write_text(run.run_dir / "gsnr.json", json.dumps(gsnr_rows(run), indent=1))
    return files


def gsnr_rows(run: Run) -> list[dict[str, Any]]:
    optimizer = _unwrap_optimizer(run.optimizer)
    return optimizer.gsnr_table({p: n for n, p in run.trainable.items()})


# ------------------------------------------------------------------------------ entry point
def default_run_dir(cfg: TrainConfig, concept: Concept) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return (
        Path("runs")
        / concept.name
        / f"{cfg.optimizer}-lr{cfg.resolved_lr(concept):g}-s{cfg.seed}-{stamp}"
    )


def run_training(
    cfg: TrainConfig, concept: Concept, run_dir: Path, *, resume: bool = False
) -> Path:
    """Set up, train, save: the whole job. Returns the run directory."""
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(
            f"output folder {run_dir} is not empty; choose another --output-dir "
            f"or continue it with --resume {run_dir}"
        )
    run = setup(cfg, concept, run_dir, resume=resume)
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the inputs have proved good
    cfgmod.save_run_yaml(
        cfg,
        concept,
        run_dir / "run.yaml",
        {"lr": run.lr, "base_model_hash": run.base_fingerprint, "token_ids": run.token_ids},
    )
    train(run)
    validate_samples(run, tag="final")
    save_outputs(run)
    return run_dir
