"""Pretrain the miniature SD-1.5-architecture model on the world; write configs/miniature/.

    python scripts/pretrain_world.py                          # the shipped run, docs/miniature.md
    python scripts/pretrain_world.py --steps 3 --vae-steps 3 --out /tmp/m --eval none   # smoke

The parts are built by ``miniature.tiny.build_tiny_pipeline`` (SD 1.5's classes and layout, the real
CLIP BPE tokenizer cut to 8,000 merges) and trained in dependency order:

1. the VAE, on world images alone: reconstruction (MSE) + a small KL, as SD's first stage;
2. its latent scale: SD's ``scaling_factor`` is 1 / std of the latents, so the UNet sees
   unit-variance latents whatever the VAE learnt (measured on the pool, written to vae/);
3. the UNet and the CLIP text encoder jointly, epsilon-prediction DDPM loss (SD 1.5's noise
   schedule), the caption replaced by "" 10% of the time so that classifier-free guidance
   works. Every object except ``world.HELD_OUT`` appears: it stays the concept to teach.

Images come from a pool rendered once from the seed (world.render_examples, random pose,
lighting and captions); re-rendering every step would cost more than the UNet on 2 cores.
The pool's latent distribution is encoded once after stage 1; each step samples it afresh.
Then the pipeline is scored with the judge (``miniature.model.evaluate_base``) and saved
(safetensors) with ``pretrain.json``: command, seed, settings, wall time, machine, scores.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from tqdm import tqdm

from sai_diffusion.fsutil import atomic_dir, write_json
from sai_diffusion.machine import describe_machine
from sai_diffusion.miniature import miniature_dir, world
from sai_diffusion.miniature.judge import Judge, accuracy, uint8_to_input
from sai_diffusion.miniature.model import evaluate_base, evaluation_scenes, sample_grid
from sai_diffusion.miniature.tiny import build_tiny_pipeline
from sai_diffusion.models.base import load_base_model
from sai_diffusion.models.tokens import tokenize
from sai_diffusion.training.loss import min_snr_weight, per_sample_mse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=miniature_dir(), help="diffusers folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000, help="UNet + text encoder steps")
    p.add_argument("--vae-steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vae-batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="UNet and text encoder (AdamW)")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-6, help="on the summed KL, as SD")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--min-snr-gamma", type=float, default=5.0, help="0 disables the weighting")
    p.add_argument("--cfg-dropout", type=float, default=0.1, help="P(caption -> '')")
    p.add_argument("--pool", type=int, default=16000, help="images rendered once")
    p.add_argument("--resolution", type=int, default=32, choices=(32, 64), help="pixels")
    p.add_argument("--unet-channels", default="32,64,64")
    p.add_argument("--vae-channels", default="16,32,32", help="3 levels: latents 1/4 side")
    p.add_argument("--text-layers", type=int, default=4)
    p.add_argument(
        "--text-encoder", choices=("pretrain", "joint", "random"), default="pretrain",
        help="pretrain: fit CLIP to read the captions' attributes, then freeze it (SD trains "
        "its UNet under a frozen pretrained CLIP); joint: train it with the UNet; random: "
        "frozen at its random init (ablations)",
    )  # fmt: skip
    p.add_argument("--text-steps", type=int, default=300, help="text encoder pretraining")
    p.add_argument("--probe-every", type=int, default=250, help="conditioning probe interval")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument(
        "--eval", choices=("full", "quick", "none"), default="full",
        help="judge evaluation after training: 2 seeds x 40 prompts, 1 seed, or none",
    )  # fmt: skip
    p.add_argument("--grid", type=Path, default=None, help="also write a sample grid PNG here")
    p.add_argument(
        "--rescore", type=Path, metavar="DIR",
        help="train nothing: score the model in DIR with the judge (--eval) and update its "
        "pretrain.json (and --grid)",
    )  # fmt: skip
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.rescore is not None:
        return rescore(args)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    vae_channels = _ints(args.vae_channels)
    vae_scale = 2 ** (len(vae_channels) - 1)  # SD's VAE: one halving per level but the last
    if args.resolution % vae_scale:
        raise SystemExit(f"--resolution {args.resolution} is not a multiple of {vae_scale}")

    # Build before rendering: the tokenizer turns the pool's captions into ids once.
    pipe = build_tiny_pipeline(
        seed=args.seed,
        sample_size=args.resolution // vae_scale,
        unet_channels=_ints(args.unet_channels),
        vae_channels=vae_channels,
        text_layers=args.text_layers,
    )
    params = {n: _count(getattr(pipe, n)) for n in ("unet", "vae", "text_encoder")}
    print(f"parameters: {params}", flush=True)

    t = time.perf_counter()
    pool = render_pool(args.pool, args.seed, args.resolution, pipe.tokenizer)
    timings["render_s"] = time.perf_counter() - t

    t = time.perf_counter()
    vae_loss = train_vae(pipe.vae, pool.pixels, args, device)
    vae_check = judge_reconstructions(pipe.vae, args, device)
    print(f"judge on VAE reconstructions: {json.dumps(vae_check)}", flush=True)
    timings["vae_s"] = time.perf_counter() - t

    t = time.perf_counter()
    moments, scale = encode_pool(pipe.vae, pool.pixels, device)
    pipe.vae.register_to_config(scaling_factor=scale)
    timings["encode_s"] = time.perf_counter() - t

    t = time.perf_counter()
    text_report = None
    if args.text_encoder == "pretrain":
        text_report = pretrain_text_encoder(pipe.text_encoder, pool, args, device)
        print(f"text encoder: {json.dumps(text_report)}", flush=True)
    timings["text_s"] = time.perf_counter() - t

    t = time.perf_counter()
    unet_loss, its, history = train_unet(pipe, moments, pool, args, device)
    timings["unet_s"] = time.perf_counter() - t

    pipe.to("cpu")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval().requires_grad_(False)
    train_wall = time.perf_counter() - started

    t = time.perf_counter()
    scores = None
    if args.eval != "none":
        seeds = [0, 1] if args.eval == "full" else [0]
        scores = evaluate_base(pipe, evaluation_scenes(), seeds)
        print(json.dumps({k: scores[k] for k in ("seen", "held_out")}), flush=True)
    if args.grid is not None:
        _write_grid(pipe, args.grid)
    timings["eval_s"] = time.perf_counter() - t

    record = {
        "command": "python " + shlex.join([_script_path(), *sys.argv[1:]]),
        "seed": args.seed,
        "steps": args.steps,
        "vae_steps": args.vae_steps,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "parameters": params,
        "held_out_object": world.HELD_OUT,
        "vae_scaling_factor": scale,
        "final_loss": {"vae": vae_loss, "unet": unet_loss},
        "judge_on_vae_reconstructions": vae_check,
        "text_encoder": text_report,
        "conditioning_probe": history,
        "unet_it_per_s": round(its, 3),
        "wall_s": round(train_wall, 1),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "machine": describe_machine(args.device),
        "judge": None if scores is None else _summary(scores),
        "judge_per_prompt": None if scores is None else scores["per_prompt"],
    }
    with atomic_dir(args.out) as tmp:  # weights and record together, or nothing
        pipe.save_pretrained(tmp, safe_serialization=True)
        record["weights_bytes"] = sum(f.stat().st_size for f in tmp.rglob("*.safetensors"))
        write_json(tmp / "pretrain.json", record)
    print(f"wrote {args.out} in {train_wall:.0f} s (+{timings['eval_s']:.0f} s evaluation)")
    return 0


def rescore(args) -> int:
    """Judge an already written model folder again and record the scores in its pretrain.json."""
    pipe = load_base_model(args.rescore)
    record_path = args.rescore / "pretrain.json"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    t = time.perf_counter()
    scores = evaluate_base(pipe, evaluation_scenes(), [0, 1] if args.eval == "full" else [0])
    print(json.dumps({k: scores[k] for k in ("seen", "held_out")}), flush=True)
    if args.grid is not None:
        _write_grid(pipe, args.grid)
    record["judge"], record["judge_per_prompt"] = _summary(scores), scores["per_prompt"]
    record["rescored"] = {
        "command": "python " + shlex.join([_script_path(), *sys.argv[1:]]),
        "eval_s": round(time.perf_counter() - t, 1),
        "machine": describe_machine(args.device),
    }
    write_json(record_path, record)
    return 0


def _write_grid(pipe, path: Path) -> None:
    prompts = [world.caption(s) for s in evaluation_scenes(photos_per_object=1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    sample_grid(pipe, prompts, seeds=[0, 1, 2, 3], title="miniature").save(path)


# ------------------------------------------------------------------------------ data
class Pool(NamedTuple):
    """The rendered pool: ``pixels`` (n, 3, s, s) in [-1, 1]; ``caption_index`` (n,) into
    ``captions``, the distinct captions with ``""`` first; ``ids`` (len(captions), 77)."""

    pixels: torch.Tensor
    caption_index: torch.Tensor
    captions: list[str]
    ids: torch.Tensor
    labels: dict[str, torch.Tensor]  # per head, (len(captions),): what each caption says


def render_pool(n: int, seed: int, size: int, tokenizer) -> Pool:
    """``n`` world images without ``HELD_OUT`` and their captions."""
    examples = world.render_examples(n, seed, size=size, exclude_objects=(world.HELD_OUT,))
    pixels = _to_pixels([e.image for e in examples])
    captions = [""] + sorted({e.caption for e in examples})
    position = {c: i for i, c in enumerate(captions)}
    said = {"": {head: None for head in TEXT_HEADS}}
    for e in examples:
        said.setdefault(e.caption, caption_says(e.scene, e.caption))
    labels = {
        head: torch.tensor([_label(head, said[c][head]) for c in captions]) for head in TEXT_HEADS
    }
    return Pool(
        pixels=pixels,
        caption_index=torch.tensor([position[e.caption] for e in examples]),
        captions=captions,
        ids=tokenize(tokenizer, captions),
        labels=labels,
    )


TEXT_HEADS = {
    "object": world.OBJECTS,
    "colour": world.COLOURS,
    "background": world.BACKGROUNDS,
    "style": world.STYLES,
}


def caption_says(scene: world.Scene, text: str) -> dict[str, str | None]:
    """What ``text`` (a caption of ``scene``) states: each attribute, or None where it is
    silent ("a red star" says no background and no style)."""
    return {"object": scene.object, **world.prompt_asks(text, scene.object)}


def _label(head: str, value: str | None) -> int:
    """Class index of ``value`` for ``head``; None ("not said") is the last class."""
    names = TEXT_HEADS[head]
    return len(names) if value is None else names.index(value)


def _to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """RGB images -> (n, 3, H, W) in [-1, 1], the judge's (and SD's) pixel range."""
    return uint8_to_input(torch.from_numpy(np.stack([np.asarray(im) for im in images])))


def _batches(n: int, batch_size: int, gen: torch.Generator):
    """Endless index batches, a fresh permutation per epoch."""
    while True:
        order = torch.randperm(n, generator=gen)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i : i + batch_size]


# ------------------------------------------------------------------------------ stage 1: VAE
def train_vae(vae, pixels: torch.Tensor, args, device) -> float | None:
    """Reconstruction + ``kl_weight`` x summed KL; returns the last step's loss."""
    vae.to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    sched = _warmup_cosine(opt, min(args.warmup, args.vae_steps // 4), args.vae_steps)
    gen = torch.Generator().manual_seed(args.seed + 11)
    batches = _batches(len(pixels), min(args.vae_batch_size, len(pixels)), gen)
    loss = None
    bar = tqdm(range(args.vae_steps), desc="vae", dynamic_ncols=True)
    for _ in bar:
        x = pixels[next(batches)].to(device)
        posterior = vae.encode(x).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=gen).to(device)  # CPU draw: seeded
        z = posterior.mean + posterior.std * eps
        recon = vae.decode(z).sample
        step_loss = F.mse_loss(recon, x) + args.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        opt.step()
        sched.step()
        loss = step_loss.item()
        bar.set_postfix(loss=f"{loss:.4f}")
    vae.eval()
    return loss


@torch.no_grad()
def judge_reconstructions(vae, args, device, n: int = 400) -> dict:
    """The judge's accuracy on fresh world images and on their VAE reconstructions: the
    ceiling any UNet on these latents can reach."""
    examples = world.render_examples(n, args.seed + 5000, size=args.resolution)
    images = [e.image for e in examples]
    x = _to_pixels(images).to(device)
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    out = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    rebuilt = [Image.fromarray(a) for a in out]
    judge, scenes = Judge.load(), [e.scene for e in examples]
    return {
        "images": n,
        "originals": _rounded(accuracy(judge.predict(images), scenes)),
        "reconstructions": _rounded(accuracy(judge.predict(rebuilt), scenes)),
        "mse": round(float(F.mse_loss(recon, x)), 5),
    }


@torch.no_grad()
def encode_pool(vae, pixels: torch.Tensor, device) -> tuple[torch.Tensor, float]:
    """The pool's posterior (mean, std) stacked as (n, 2, 4, h, w), and SD's scaling factor:
    1 / std of sampled latents."""
    out = []
    for i in range(0, len(pixels), 512):
        dist = vae.encode(pixels[i : i + 512].to(device)).latent_dist
        out.append(torch.stack([dist.mean, dist.std], dim=1).cpu())
    moments = torch.cat(out)
    sample = moments[:, 0] + moments[:, 1] * torch.randn(moments[:, 0].shape)
    return moments, float(1.0 / sample.std())


# ------------------------------------------------------------------------------ stage 2: text
def pretrain_text_encoder(text_encoder, pool: Pool, args, device) -> dict:
    """Teach the random CLIP to read the world's captions, then freeze it.

    SD 1.5 trains its UNet under a frozen, pretrained CLIP; here the pretraining is a
    supervised read-out: from every position from the end-of-text token on (the states a
    UNet's cross-attention sees after the words), linear heads name the caption's object,
    colour, background and style, or "not said". The heads are thrown away; the encoder keeps
    only what the captions say, so ``HELD_OUT``'s word stays an untrained token.
    """
    text_encoder.to(device).train()
    width = text_encoder.config.hidden_size
    heads = torch.nn.ModuleDict(
        {h: torch.nn.Linear(width, len(names) + 1) for h, names in TEXT_HEADS.items()}
    ).to(device)
    params = [*text_encoder.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, min(args.warmup, args.text_steps // 4), args.text_steps)
    eos = text_encoder.config.eos_token_id
    after_eos = (pool.ids == eos).int().cumsum(dim=1) > 0  # (C, 77): EOS and the padding
    gen = torch.Generator().manual_seed(args.seed + 33)
    batches = _batches(len(pool.captions), min(256, len(pool.captions)), gen)

    def loss_and_hits(idx):
        states = text_encoder(pool.ids[idx].to(device))[0]  # (B, 77, width)
        mask = after_eos[idx].to(device)
        total, hits = 0.0, {}
        for head, layer in heads.items():
            logits = layer(states[mask])  # (positions, classes)
            target = pool.labels[head][idx].to(device)[:, None].expand(mask.shape)[mask]
            total = total + F.cross_entropy(logits, target)
            hits[head] = (logits.argmax(-1) == target).float().mean().item()
        return total, hits

    bar = tqdm(range(args.text_steps), desc="text", dynamic_ncols=True)
    for _ in bar:
        loss, _ = loss_and_hits(next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    text_encoder.eval().requires_grad_(False)
    with torch.no_grad():
        loss, hits = loss_and_hits(torch.arange(len(pool.captions)))
    return {
        "captions": len(pool.captions),
        "loss": round(loss.item(), 5),
        "read_out_accuracy": {h: round(v, 4) for h, v in hits.items()},
    }


# ------------------------------------------------------------------------------ stage 3: UNet
def train_unet(
    pipe, moments: torch.Tensor, pool: Pool, args, device
) -> tuple[float | None, float, list[dict]]:
    """Epsilon-prediction DDPM on scaled latents; returns (last loss, steps per second, probe
    history). A frozen text encoder is run once over the distinct captions."""
    unet, text_encoder = pipe.unet.to(device).train(), pipe.text_encoder.to(device)
    params = list(unet.parameters())
    joint = args.text_encoder == "joint"
    table = None
    if joint:
        text_encoder.train()
        params += list(text_encoder.parameters())
    else:
        text_encoder.eval().requires_grad_(False)
        with torch.no_grad():
            table = torch.cat(
                [
                    text_encoder(pool.ids[i : i + 512].to(device))[0]
                    for i in range(0, len(pool.ids), 512)
                ]
            )  # fmt: skip  (C, 77, width)

    def encode(caption_idx: torch.Tensor) -> torch.Tensor:
        if table is not None:
            return table[caption_idx.to(device)]
        return text_encoder(pool.ids[caption_idx].to(device))[0]

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sched = _warmup_cosine(opt, min(args.warmup, args.steps // 4), args.steps)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    num_t = noise_scheduler.config.num_train_timesteps
    scale = pipe.vae.config.scaling_factor

    gen = torch.Generator().manual_seed(args.seed + 22)
    probe = _probe_batch(moments, pool, scale, num_t, args.seed + 44)
    batches = _batches(len(moments), min(args.batch_size, len(moments)), gen)
    loss, ema, history = None, None, []
    bar = tqdm(range(args.steps), desc="unet", dynamic_ncols=True)
    t0 = time.perf_counter()
    for step in bar:
        idx = next(batches)
        mean, std = moments[idx, 0], moments[idx, 1]
        latents = (mean + std * torch.randn(mean.shape, generator=gen)) * scale  # (B, 4, h, w)
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, num_t, (len(idx),), generator=gen)
        drop = torch.rand(len(idx), generator=gen) < args.cfg_dropout
        caption_idx = torch.where(drop, 0, pool.caption_index[idx])  # 0 is ""

        latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        pred = unet(noisy, timesteps, encode(caption_idx)).sample
        per_sample = per_sample_mse(pred, noise)
        if args.min_snr_gamma > 0:  # Min-SNR (Hang et al. 2023): faster convergence
            per_sample = per_sample * min_snr_weight(noise_scheduler, timesteps, args.min_snr_gamma)
        step_loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss = step_loss.item()
        ema = loss if ema is None else 0.98 * ema + 0.02 * loss
        bar.set_postfix(loss=f"{ema:.4f}", lr=f"{sched.get_last_lr()[0]:.1e}")
        if args.probe_every and ((step + 1) % args.probe_every == 0 or step + 1 == args.steps):
            entry = {"step": step + 1, "loss_ema": round(ema, 5), **_probe(unet, encode, probe,
                     noise_scheduler, device)}  # fmt: skip
            history.append(entry)
            tqdm.write(json.dumps(entry))
            unet.train()
    its = args.steps / max(time.perf_counter() - t0, 1e-9)
    return ema, its, history


def _probe_batch(moments, pool: Pool, scale: float, num_t: int, seed: int, n: int = 128):
    """A fixed batch for the conditioning probe: latents, noise, timesteps in the upper half
    of the schedule (where the prompt decides the picture), and caption indices."""
    gen = torch.Generator().manual_seed(seed)
    n = min(n, len(moments))
    idx = torch.randperm(len(moments), generator=gen)[:n]
    latents = (moments[idx, 0] + moments[idx, 1] * torch.randn(moments[idx, 0].shape,
               generator=gen)) * scale  # fmt: skip
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.linspace(num_t // 2, num_t - 1, n).round().long()
    return latents, noise, timesteps, pool.caption_index[idx]


@torch.no_grad()
def _probe(unet, encode, probe, noise_scheduler, device) -> dict:
    """Denoising loss on the probe batch with the true captions, with captions shifted by one
    (another image's), and with "": a UNet that reads the prompt has true < shifted."""
    unet.eval()
    latents, noise, timesteps, caption_idx = (t.to(device) for t in probe)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)

    def mse(idx):
        return F.mse_loss(unet(noisy, timesteps, encode(idx)).sample, noise).item()

    true, shifted = mse(caption_idx), mse(caption_idx.roll(1))
    empty = mse(torch.zeros_like(caption_idx))
    return {
        "probe_true": round(true, 5),
        "probe_shifted": round(shifted, 5),
        "probe_empty": round(empty, 5),
        "prompt_gain": round((shifted - true) / shifted, 4),
    }


def _warmup_cosine(opt, warmup: int, total: int):
    """Linear warmup, then cosine down to 10% of the peak."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(total - warmup, 1)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _rounded(scores: dict) -> dict:
    return {k: round(v, 4) for k, v in scores.items()}


# ------------------------------------------------------------------------------ helpers
def _summary(scores: dict) -> dict:
    return {k: scores[k] for k in ("seen", "held_out", "settings")}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _script_path() -> str:
    here = Path(__file__).resolve()
    try:
        return str(here.relative_to(Path.cwd()))
    except ValueError:
        return str(here)


if __name__ == "__main__":
    sys.exit(main())
