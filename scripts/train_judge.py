"""Train the miniature world's judge; write configs/judge/judge.safetensors and report.json.

    python scripts/train_judge.py     # seed 0; ~4 min on 2 CPU cores, 7-9 min when they are busy

The judge (sai_diffusion/miniature/judge.py) learns object, colour, background and style from
procedural images of every object, the held-out concept object included (it must recognise the
concept the tiny model is taught later), and "nothing" (a background or blank paper alone, 6% of
the images). Training images come from a pool rendered once at the start (world.render with random
pose, lighting, tint and grain; a third at 64 px and box-resized to 32 px as the judge reads
them, the rest at 32 px) and are augmented anew at every draw: blur, noise, brightness,
contrast, saturation, horizontal flip. Rendering the pool takes under a minute; rendering fresh
images every step would cost more than the training itself on 2 cores.

The report gives the accuracy per head on fresh scenes from another seed, rendered at 64 and
at 32 px, and at 64 px blurred and noised, all through Judge.predict: the same path users take,
and how often images without an object are judged "nothing".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from sai_diffusion.fsutil import write_json
from sai_diffusion.machine import describe_machine
from sai_diffusion.miniature import world
from sai_diffusion.miniature.judge import (
    HEADS,
    NOTHING,
    Judge,
    JudgeNet,
    accuracy,
    to_input_array,
    uint8_to_input,
    world_labels,
)

REPO = Path(__file__).resolve().parents[1]  # the checkout whose configs/ this writes

IGNORE = -100  # cross_entropy's ignore_index: colour and background of a sketch
TEST_SEED_OFFSET = 10_000  # test scenes: seed + 10,000; the tests in tests/world use 20,000+


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pool", type=int, default=16_000, help="procedural training images")
    p.add_argument("--empty-fraction", type=float, default=0.06, help="images without object")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW peak lr (cosine decay)")
    p.add_argument("--widths", default="24,48,96", help="channels of the three conv stages")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=REPO / "configs" / "judge")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    labels = world_labels()
    start = time.perf_counter()

    print(f"rendering {args.pool} training images ...", flush=True)
    images, targets = build_pool(args.pool, args.seed, labels, args.empty_fraction)
    render_s = time.perf_counter() - start

    widths = [int(w) for w in args.widths.split(",")]
    net = JudgeNet({name: len(labels[name]) for name in HEADS}, widths)
    train_start = time.perf_counter()
    train(net, images, targets, args)
    train_s = time.perf_counter() - train_start

    judge = Judge(net, labels)
    print("evaluating on fresh scenes ...", flush=True)
    evaluation = evaluate(judge, args.test_size, args.seed + TEST_SEED_OFFSET)
    wall_s = time.perf_counter() - start

    command = "python scripts/train_judge.py " + " ".join(sys.argv[1:] if argv is None else argv)
    weights = args.out / "judge.safetensors"
    judge.save(weights, {"command": command.strip(), "seed": str(args.seed)})
    report = {
        "command": command.strip(),
        "seed": args.seed,
        "test_seed": args.seed + TEST_SEED_OFFSET,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "parameters": sum(p.numel() for p in net.parameters()),
        "file_bytes": weights.stat().st_size,
        "wall_s": round(wall_s, 1),
        "render_s": round(render_s, 1),
        "train_s": round(train_s, 1),
        "machine": describe_machine(),
        "held_out_object": world.HELD_OUT,
        **evaluation,
    }
    write_json(args.out / "report.json", report)
    print(json.dumps({k: report[k] for k in ("wall_s", "accuracy")}, indent=2))
    print(f"wrote {weights} and {args.out / 'report.json'}")


# ------------------------------------------------------------------------------ data
def build_pool(
    n: int, seed: int, labels: dict[str, tuple[str, ...]], empty_fraction: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``n`` rendered images as (n, 32, 32, 3) uint8, and the label index per head (IGNORE
    where a head does not apply: a sketch's colour and background, an empty image's colour,
    the style of blank paper or an empty white background).
    Half the scenes are sketches, so the object head sees as many outlines as filled shapes;
    ``empty_fraction`` of them lose their object (label NOTHING)."""
    scenes = world.sample_scenes(n, seed, sketch_fraction=0.5)
    rng = np.random.default_rng((seed, 1))
    arrays = np.empty((n, 32, 32, 3), np.uint8)
    targets = {name: torch.full((n,), IGNORE) for name in HEADS}
    for i, scene in enumerate(scenes):
        size = 64 if rng.random() < 1 / 3 else 32
        truth = {name: getattr(scene, name) for name in HEADS}
        if rng.random() < empty_fraction:
            image = world.render_empty(scene.background, size, rng)  # None: blank paper
            truth.update(object=NOTHING, colour=None)
            if scene.background in (None, "white"):  # blank paper and a white photo look alike
                truth["style"] = None
        else:
            image = world.render(scene, size, rng)
        arrays[i] = to_input_array(image)
        for name, value in truth.items():
            if value is not None:
                targets[name][i] = labels[name].index(value)
    return torch.from_numpy(arrays), targets


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 32, 32, 3) uint8 -> (B, 3, 32, 32) judge input, degraded the way a small diffusion
    model degrades images: blur, noise, shifted exposure and saturation. Mild on colour, so
    that orange stays orange."""
    x = (uint8_to_input(batch) + 1) / 2  # [0, 1]
    b = len(x)

    def uniform(low: float, high: float) -> torch.Tensor:  # (B, 1, 1, 1)
        return torch.empty(b, 1, 1, 1).uniform_(low, high, generator=generator)

    flip = torch.rand(b, 1, 1, 1, generator=generator) < 0.5
    x = torch.where(flip, x.flip(3), x)
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * uniform(0.75, 1.15)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (mean + (x - mean) * uniform(0.85, 1.15)) * uniform(0.9, 1.1)
    sigma = uniform(0.0, 1.2) * (torch.rand(b, 1, 1, 1, generator=generator) < 0.6)
    x = gaussian_blur(x, sigma.flatten())
    x = x + torch.randn(x.shape, generator=generator) * uniform(0.0, 0.05)
    return x.clamp(0, 1) * 2 - 1


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each image of (B, C, H, W) with its own sigma (pixels; 0 leaves it as it is):
    one separable 5-tap grouped convolution for the whole batch."""
    b, c, h, w = x.shape
    taps = torch.arange(-2, 3, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # (B, 5)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, 5), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, 5, 1), groups=b * c)
    return y.view(b, c, h, w)


# ------------------------------------------------------------------------------ training
def train(
    net: JudgeNet,
    images: torch.Tensor,
    targets: dict[str, torch.Tensor],
    args: argparse.Namespace,
) -> None:
    """AdamW, linear warm-up over 5% of the steps then cosine decay to zero; the four heads'
    cross-entropies summed with equal weight."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    warmup = max(args.steps // 20, 1)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(args.steps - warmup, 1)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    net.train()
    start = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(len(images), (args.batch_size,), generator=generator)
        logits = net(augment(images[index], generator))
        losses = {
            name: F.cross_entropy(logits[name], targets[name][index], ignore_index=IGNORE)
            for name in HEADS
        }
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % 100 == 0 or step == args.steps - 1:
            parts = " ".join(f"{k} {v.item():.3f}" for k, v in losses.items())
            print(f"step {step:5d}  loss {loss.item():.3f} ({parts})  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)  # fmt: skip
    net.eval()


# ------------------------------------------------------------------------------ evaluation
def evaluate(judge: Judge, n: int, seed: int) -> dict:
    """Accuracy per head on ``n`` fresh scenes (the world's default mix, a quarter sketches):
    rendered at 64 px, at 32 px, and at 64 px blurred (radius 1) with pixel noise (std 8); and
    the fraction of 140 object-free 64 px images (each background and blank paper) judged
    NOTHING."""
    scenes = world.sample_scenes(n, seed)
    rng = np.random.default_rng((seed, 1))
    at_64 = [world.render(s, 64, rng) for s in scenes]
    at_32 = [world.render(s, 32, rng) for s in scenes]
    degraded = [degrade(image, rng) for image in at_64]
    predictions_64 = judge.predict(at_64)
    result = {
        "accuracy": {
            "64px": accuracy(predictions_64, scenes),
            "32px": accuracy(judge.predict(at_32), scenes),
            "64px_blur_noise": accuracy(judge.predict(degraded), scenes),
        },
        "test_images": {"total": n, "sketches": sum(s.style == world.SKETCH for s in scenes)},
    }
    per_object = {}
    for obj in world.OBJECTS:
        hits = [
            p["object"] == obj
            for p, s in zip(predictions_64, scenes, strict=True)
            if s.object == obj
        ]
        per_object[obj] = round(sum(hits) / len(hits), 4) if hits else None
    result["object_accuracy_64px"] = per_object
    backgrounds = [None, *world.BACKGROUNDS] * 20  # None: blank paper
    empty = judge.predict([world.render_empty(b, 64, rng) for b in backgrounds])
    result["empty_images_judged_nothing"] = round(
        sum(p["object"] == NOTHING for p in empty) / len(empty), 4
    )
    result["accuracy"] = {
        kind: {head: round(value, 4) for head, value in heads.items()}
        for kind, heads in result["accuracy"].items()
    }
    return result


def degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(1.0)), np.float32)
    noisy = blurred + rng.normal(0.0, 8.0, size=blurred.shape)
    return Image.fromarray(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))


if __name__ == "__main__":
    main()
