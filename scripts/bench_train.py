"""Training throughput: sai-train-lora's recipe against the way diffusers' example script
``train_dreambooth_lora.py`` trains, same model, images, resolution, batch and steps.

    python scripts/bench_train.py --model miniature --resolution 32 --steps 30
    python scripts/bench_train.py --model sd15 --resolution 128 --steps 6 --warmup 1
    python scripts/bench_train.py --base-model model.safetensors --concept my/potter.yaml \
        --loops ours-preset --device cuda --precision fp16 --resolution 512 --batch-size 2

Loops (each in its own process, one after another, so that peak memory is each loop's own):
  reference       diffusers' example loop, written here after train_dreambooth_lora.py: every
                  step runs the VAE encoder on the pixels and the text encoder on the captions,
                  samples the latent, UNet LoRA (peft, rank 4) trained with torch AdamW
                  (foreach), gradient clipping at 1.0 as its default, loss.item() logged
  ours-adamw      sai_diffusion.training.recipe with --optimizer adamw (latents and text cached)
  ours-sgd-sai    the same with SGD-SaI (the default; fused CPU update)
  ours-no-cache   SGD-SaI with cache_latents=false: the VAE runs every step, as in the reference
  ours-compiled   an experiment, not a setting: ours-sgd-sai with the UNet torch.compile'd
                  (inductor) after setup; its first step, which compiles, is reported apart.
                  Speed only: on torch 2.13's CPU inductor its LoRA gradients are wrong
                  (scripts/check_compile_gradients.py), which is why the recipe does not offer it
  ours-te         (only with --loops) SGD-SaI training what Mix-of-Show trains: UNet and
                  text-encoder LoRA and the token vectors, the text encoder run every step
  ours-edlora     (only with --loops) the same with edlora=true: one embedding per word and
                  cross-attention layer, the text encoder run on L copies of each caption
  ours-dora       (only with --loops) ours-sgd-sai with use_dora=true
  ours-locon      (only with --loops) ours-sgd-sai with LoRA on the ResNet convs too
                  (conv1, conv2, conv_shortcut)
  ours-preset     (only with --loops) the concept's own settings (its YAML's train: and lr:,
                  e.g. potter.yaml: text-encoder LoRA, masks, attention regularisation,
                  resize-crop-pad, no latent cache, grad_accum 2), with --resolution,
                  --batch-size and --precision in place of its own

Reported per loop: median step time and steps/s over the timed steps (a step is one optimizer
step, ``grad_accum`` micro-batches), its ratio to the reference, the median time a step waited
for its inputs (``data_wait_s``: the recipe's ``run.data_wait_s``; the reference's
``next(dataloader)``), the peak memory while training (CUDA allocations, or the process's
resident peak on the CPU, after the model is loaded: the loop's own), and model FLOPs
utilisation: torch's FLOP counter over one step divided by the step time and by the machine's
measured matmul rate, the practical peak (fp32 2048^3 on the CPU; on CUDA 8192^3 in the
precision trained, fp32 without one). ``--data-workers N`` sets the recipe's ``data_workers``
(default: the recipe's own choice).

The model: ``--model sd15`` builds the SD 1.5 architecture with random weights from
configs/sd15 (no download); ``--model sdxl`` the SDXL base architecture from configs/sdxl
(2.6 B UNet, two text encoders; the reference loop is SD-only, so compare its ours-* loops with
the same loops of ``--model sd15`` at the same resolution). ``--base-model FILE|DIR`` trains an
existing one instead: a single file loads with the shipped configs/sd15, or ``--base-config
DIR`` (scripts/gpu_inputs.py writes a random SD 1.5 single file). On CUDA, add ``--device cuda
--precision bf16``.

SGD-SaI loops also report the g-SNR scales they took (``gsnr``, each fixed at its tensor's
first gradient): per part and UNet stage, the smallest, median and largest scale, and the
range of g-SNR / sqrt(numel) (1 everywhere when g-SNR is tensor size, REFERENCES.md section 8).
LoRA's A matrices get their first gradient at step 2 (B = 0 at step 1); their g-SNR is divided
by the max of step 1 and capped at 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sai_diffusion.machine import peak_memory_mb, reset_peak_memory

LOOPS = ("reference", "ours-adamw", "ours-sgd-sai", "ours-no-cache", "ours-compiled",
         "ours-te", "ours-edlora", "ours-dora", "ours-locon", "ours-preset")  # fmt: skip
# loops run only when asked (--loops): the cost of ED-LoRA's layer-wise embeddings, of DoRA
# and of LoCon, and a concept's own preset
EXTRA_LOOPS = ("ours-te", "ours-edlora", "ours-dora", "ours-locon", "ours-preset")
# LoCon's targets: the attention projections and the ResNet blocks' convs
LOCON_TARGETS = "to_q,to_k,to_v,to_out.0,conv1,conv2,conv_shortcut"
RANK = 4
# the resolved settings each ours-* result records (flat names), as a preset may set any of them
RECORDED_SETTINGS = ("resolution", "batch_size", "grad_accum", "mixed_precision", "cache_latents",
                     "augmentation", "text_encoder_lora", "train_embeddings", "edlora",
                     "use_masks", "attn_reg_weight", "data_workers")  # fmt: skip


# ------------------------------------------------------------------------------ the models
def sd15_random(out: Path, seed: int) -> Path:
    """The SD 1.5 architecture (configs/sd15) with random weights, saved as a diffusers folder."""
    if not (out / "model_index.json").is_file():
        sd15_random_pipeline(seed).save_pretrained(out)
    return out


def sd15_random_pipeline(seed: int):
    """The SD 1.5 architecture (configs/sd15) with random weights, in memory (4.3 GB fp32)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from sai_diffusion._resources import sd15_config_dir

    config = sd15_config_dir()
    torch.manual_seed(seed)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
        scheduler=DDPMScheduler.from_config(DDPMScheduler.load_config(config / "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_random(out: Path, seed: int) -> Path:
    """The SDXL base architecture (configs/sdxl) with random weights, saved as a diffusers
    folder (about 14 GB in fp32)."""
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
    )

    from sai_diffusion._resources import sdxl_config_dir

    if (out / "model_index.json").is_file():
        return out
    config = sdxl_config_dir()
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(config / "unet")),
        vae=AutoencoderKL.from_config(AutoencoderKL.load_config(config / "vae")),
        text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(config / "text_encoder")),
        text_encoder_2=CLIPTextModelWithProjection(
            CLIPTextConfig.from_pretrained(config / "text_encoder_2")
        ),
        tokenizer=CLIPTokenizer.from_pretrained(config / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(config / "tokenizer_2"),
        scheduler=DDPMScheduler.from_config(DDPMScheduler.load_config(config / "scheduler")),
    )
    pipe.save_pretrained(out)
    return out


def gsnr_summary(rows: list[dict]) -> dict:
    """The scales SGD-SaI took, by part (UNet stage, text encoder, embeddings): n blocks,
    min / median / max scale, and the range of g-SNR / sqrt(numel)."""
    rows = [r for r in rows if r["scale"] is not None]
    parts: dict[str, list[dict]] = {}
    for r in rows:
        name = r["name"]
        head = name.split(".")[0]
        if head == "unet":
            stage = name.split(".")[1]  # down_blocks / mid_block / up_blocks
            level = name.split(".")[2] if stage != "mid_block" else ""
            head = f"unet.{stage}{'.' + level if level else ''}"
        parts.setdefault(head, []).append(r)
    out = {}
    for part, group in parts.items():
        scales = sorted(r["scale"] for r in group)
        size = [r["gsnr"] / r["numel"] ** 0.5 for r in group]
        out[part] = dict(blocks=len(group), min=scales[0], median=statistics.median(scales),
                         max=scales[-1], gsnr_over_sqrt_numel=(min(size), max(size)))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- measuring
def matmul_flops_per_s(
    device: torch.device, n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32
) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:])


def matmul_peak(device: torch.device, precision: str) -> tuple[float, str]:
    """The practical peak MFU is read against, and what it is: fp32 2048^3 on the CPU (the
    figures of docs/benchmarks.md); on CUDA 8192^3 (2048^3 is over in microseconds) in the
    precision trained."""
    if device.type != "cuda":
        return matmul_flops_per_s(device), "fp32 matmul 2048^3"
    dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    name = {"no": "fp32", "bf16": "bf16", "fp16": "fp16"}[precision]
    return matmul_flops_per_s(device, n=8192, dtype=dtype), f"{name} matmul 8192^3"


def count_flops(step) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def time_steps(
    step, *, warmup: int, steps: int, device: torch.device
) -> tuple[list[float], list[float | None]]:
    """Seconds of each timed step, and how long each waited for its inputs
    (``step.data_wait()``; None where the loop cannot say)."""
    times, waits = [], []
    for i in range(warmup + steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            waits.append(step.data_wait())
    return times, waits


# -------------------------------------------------------------------- the reference loop
def _reference(args, device: torch.device, base: str, concept):
    """A step as diffusers' train_dreambooth_lora.py takes it (its defaults: AdamW, clipping at
    1.0, no caching, the VAE and text encoder run every step)."""
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    from sai_diffusion._resources import sd15_config_dir
    from sai_diffusion.config import DEFAULT_LORA_TARGETS
    from sai_diffusion.files.concept_data import discover_examples
    from sai_diffusion.training.augment import ConceptImages

    accelerator = Accelerator(mixed_precision=args.precision, cpu=device.type == "cpu")
    if Path(base).is_file():  # as diffusers loads a single file: with its config folder
        config = args.base_config or str(sd15_config_dir())
        pipe = StableDiffusionPipeline.from_single_file(base, config=config, local_files_only=True)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(base, local_files_only=True)
    tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = weight_dtype[args.precision]
    unet.to(device, dtype=dtype)
    vae.to(device, dtype=dtype)
    text_encoder.to(device, dtype=dtype)
    unet.add_adapter(
        LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian",
                   target_modules=list(DEFAULT_LORA_TARGETS))
    )  # fmt: skip
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    examples = discover_examples(concept.data, token=concept.text)
    images = ConceptImages(examples, resolution=args.resolution, center_crop=True)

    class Dataset(torch.utils.data.Dataset):  # the script's own dataset: centre crops, no flip
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images.load(i, geometry=np.random.default_rng(i), flip=False)

    loader = torch.utils.data.DataLoader(Dataset(), batch_size=args.batch_size, shuffle=True)
    unet.train()
    batches = iter(())
    waited = 0.0

    def step():
        nonlocal batches, waited
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        waited = time.perf_counter() - start
        pixel_values = batch["pixel_values"].to(device, dtype=dtype)
        ids = tokenizer(batch["caption"], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        with accelerator.accumulate(unet):
            model_input = vae.encode(pixel_values).latent_dist.sample()
            model_input = model_input * vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            bsz = model_input.shape[0]
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                      device=model_input.device).long()  # fmt: skip
            noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
            encoder_hidden_states = text_encoder(ids.to(device), return_dict=False)[0]
            model_pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
        return loss.detach().item()

    step.data_wait = lambda: waited
    return step


def _ours(args, device: torch.device, base: str, concept, loop: str, run_dir: Path):
    from sai_diffusion import config
    from sai_diffusion.training import recipe

    # what the reference trains: the UNet's attention LoRA alone (no text-encoder LoRA, no token
    # vector), with the unweighted loss, whatever the concept ships (the demo's is LoCon, min-SNR)
    settings = [f"rank={RANK}", f"alpha={RANK}", "validation_seeds=[]", "center_crop=true",
                f"mixed_precision={args.precision}", "train_embeddings=false",
                "text_encoder_lora=false", "max_grad_norm=1.0", "min_snr_gamma=0",
                f"lora_targets={','.join(config.DEFAULT_LORA_TARGETS)}"]  # fmt: skip
    if loop == "ours-preset":  # the concept's own, but for what the benchmark sets
        settings = [f"mixed_precision={args.precision}"]
    if loop == "ours-no-cache":
        settings.append("cache_latents=false")
    if loop == "ours-dora":
        settings.append("use_dora=true")
    if loop == "ours-locon":
        settings.append(f"lora_targets={LOCON_TARGETS}")
    if loop in ("ours-te", "ours-edlora"):  # what Mix-of-Show trains, plain or layer-wise
        settings += ["text_encoder_lora=true", "train_embeddings=true",
                     f"edlora={'true' if loop == 'ours-edlora' else 'false'}"]  # fmt: skip
    if args.base_config:
        settings.append(f"base_config={args.base_config}")
    if args.data_workers is not None:
        settings.append(f"data_workers={args.data_workers}")
    flags = {"base_model": base, "resolution": args.resolution, "batch_size": args.batch_size}
    if loop != "ours-preset":  # the preset keeps its own optimizer and schedule
        flags |= {"max_steps": 10**6, "optimizer": "adamw" if loop == "ours-adamw" else "sgd-sai"}
    cfg, c = config.resolve(str(concept.path), flags, settings)
    run = recipe.setup(cfg, c, run_dir)
    if loop == "ours-compiled":
        run.unet = torch.compile(run.unet)

    def step():
        return recipe.train_step(run)

    step.run = run  # for the g-SNR table and the settings
    step.data_wait = lambda: getattr(run, "data_wait_s", None)  # the recipe's host pipeline
    return step


def recorded_settings(cfg) -> dict:
    """``RECORDED_SETTINGS`` of a resolved config, by flat name."""
    from sai_diffusion.config import FLAT

    out = {}
    for name in RECORDED_SETTINGS:
        value = cfg
        for part in FLAT.get(name, name).split("."):
            value = getattr(value, part)
        out[name] = value
    return out


def one(args) -> dict:
    """Measure one loop in this process (the parent runs each loop in its own)."""
    from sai_diffusion.config import load_concept

    device = torch.device(args.device)
    concept = load_concept(args.concept)
    with tempfile.TemporaryDirectory() as tmp:
        if args.one == "reference":
            step = _reference(args, device, args.base, concept)
        else:
            step = _ours(args, device, args.base, concept, args.one, Path(tmp) / "run")
        start = time.perf_counter()
        step()  # first step: allocations, the optimizer's state, compiling where asked
        first_s = time.perf_counter() - start
        reset_peak_memory(device)
        times, waits = time_steps(step, warmup=args.warmup, steps=args.steps, device=device)
        peak = peak_memory_mb(device)
        flops = count_flops(step)
        gsnr = settings = None
        run = getattr(step, "run", None)
        optimizer = getattr(run.optimizer, "optimizer", run.optimizer) if run else None
        if hasattr(optimizer, "gsnr_table"):  # under accelerate's wrapper
            names = {p: n for n, p in run.trainable.items()}
            gsnr = gsnr_summary(optimizer.gsnr_table(names))
        if run is not None:
            settings = recorded_settings(run.cfg)
    median = statistics.median(times)
    known = [w for w in waits if w is not None]
    return dict(loop=args.one, step_s=median, step_s_all=times, steps_per_s=1 / median,
                first_step_s=first_s, peak_mib=peak, flops_per_step=flops,
                data_wait_s=statistics.median(known) if known else None, data_wait_s_all=waits,
                settings=settings, gsnr=gsnr)  # fmt: skip


# ---------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("miniature", "sd15", "sdxl"), default="miniature")
    p.add_argument("--base-model", help="train this model (single file or diffusers folder) "
                   "instead of the one --model names")  # fmt: skip
    p.add_argument("--base-config", help="the config folder a --base-model single file loads "
                   "with (default: the shipped configs/sd15)")  # fmt: skip
    p.add_argument("--concept", default="demo", help="concept whose images train (default demo)")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before them")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=("no", "bf16", "fp16"), default="no")
    p.add_argument("--data-workers", type=int, help="the recipe's data_workers (default: its own)")
    p.add_argument("--loops", default=",".join(x for x in LOOPS if x not in EXTRA_LOOPS))
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "sai-bench-sd15")
    p.add_argument("--json", type=Path, help="every result, rewritten as each loop ends")
    p.add_argument("--one", choices=LOOPS, help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def base_model(args) -> str:
    """The model the loops train: --base-model, else the one --model names (built once)."""
    if args.base_model:
        return args.base_model
    if args.model == "sdxl":
        return str(sdxl_random(args.cache.with_name(args.cache.name + "-sdxl"), seed=0))
    if args.model == "sd15":
        return str(sd15_random(args.cache, seed=0))
    from sai_diffusion.models.base import resolve_source

    return str(resolve_source("miniature"))


def run_loop(loop: str, base: str, argv: list[str]) -> dict:
    """One loop in a process of its own: its result, or ``{loop, error}`` when it failed."""
    cmd = [sys.executable, __file__, "--one", loop, "--base", base, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode != 0:
        return dict(loop=loop, error=proc.stderr[-3000:] or f"exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict], peak_flops: float) -> list[str]:
    ref = next((r for r in results if r["loop"] == "reference" and "error" not in r), None)
    lines = [
        "| loop | first step s | step ms (median) | steps/s | vs reference | data wait ms "
        "| peak memory MiB | GFLOP/step | MFU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['loop']} | failed: {r['error'].strip().splitlines()[-1]} |")
            continue
        speedup = f"{ref['step_s'] / r['step_s']:.2f}x" if ref else "-"
        wait = "-" if r["data_wait_s"] is None else f"{r['data_wait_s'] * 1e3:.1f}"
        mfu = r["flops_per_step"] / r["step_s"] / peak_flops
        lines.append(
            f"| {r['loop']} | {r['first_step_s']:.1f} | {r['step_s'] * 1e3:.1f} "
            f"| {r['steps_per_s']:.2f} | {speedup} | {wait} "
            f"| {r['peak_mib']:,.0f} | {r['flops_per_step'] / 1e9:.2f} | {mfu:.1%} |"
        )
    return lines


def gsnr_tables(results: list[dict]) -> list[str]:
    lines = []
    for r in results:
        if r.get("gsnr"):
            lines += ["", f"g-SNR scales of {r['loop']} (each fixed at its first gradient):", "",
                      "| part | blocks | scale min | median | max | g-SNR / sqrt(numel) |",
                      "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
            lines += [f"| {part} | {g['blocks']} | {g['min']:.3f} | {g['median']:.3f} | "
                      f"{g['max']:.3f} | {g['gsnr_over_sqrt_numel'][0]:.3f}-"
                      f"{g['gsnr_over_sqrt_numel'][1]:.3f} |"
                      for part, g in r["gsnr"].items()]  # fmt: skip
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return
    from sai_diffusion.machine import describe_machine

    argv = list(argv if argv is not None else sys.argv[1:])
    device = torch.device(args.device)
    base = base_model(args)
    peak_flops, peak_what = matmul_peak(device, args.precision)
    loops = [loop.strip() for loop in args.loops.split(",") if loop.strip()]
    report = dict(command="python " + " ".join([sys.argv[0], *argv]),
                  machine=describe_machine(device), matmul_flops_per_s=peak_flops,
                  matmul_peak=peak_what, base_model=base, concept=args.concept,
                  resolution=args.resolution, batch_size=args.batch_size,
                  precision=args.precision, steps=args.steps, warmup=args.warmup,
                  data_workers=args.data_workers, results=[])  # fmt: skip
    for loop in loops:
        result = run_loop(loop, base, argv)
        report["results"].append(result)
        if "error" in result:
            print(f"{loop} failed:\n{result['error']}", file=sys.stderr)
        else:
            print(f"{loop}: {result['step_s'] * 1e3:.1f} ms/step", file=sys.stderr)
        if args.json:  # after every loop: what finished survives a later one's crash or kill
            args.json.parent.mkdir(parents=True, exist_ok=True)
            partial = args.json.with_name(args.json.name + ".tmp")  # never a half-written file
            partial.write_text(json.dumps(report, indent=1) + "\n")
            partial.replace(args.json)
    lines = [
        f"machine: {report['machine']}; {peak_what}: {peak_flops / 1e9:.1f} GFLOP/s",
        f"model {base}, concept {args.concept}, {args.resolution} px, batch "
        f"{args.batch_size}, precision {args.precision}, {args.steps} timed steps after "
        f"{args.warmup} warm-up",
        "",
        *table(report["results"], peak_flops),
        *gsnr_tables(report["results"]),
    ]
    print("\n".join(lines))
    failed = [r["loop"] for r in report["results"] if "error" in r]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
