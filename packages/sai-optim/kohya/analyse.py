"""Reads what the kohya runs of docs/optimizer.md wrote (LoRA files and accelerate states) and
prints the figures shown there.

    /tmp/kohya-venv/bin/python packages/sai-optim/kohya/analyse.py /tmp/kohya-run

Run folders under the root: full (6 steps), resumed (full's command resumed after step 3),
pytorch_optimizer and sgd_sai_103 (the released implementations, 3 steps), and, when present,
eps0 and lr01 (3 steps with eps=0, and with eps=0 at lr 0.1 / 0.05). kohya saves no names in
the optimizer state; a tensor's kind is read from its shape (lora_down is (rank, in, ...),
lora_up (out, rank, ...)), its group from the state's param groups (text encoder first).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/kohya-run")
RANK = 4
PARTS = ("text encoder", "U-Net")
STATE_KEYS = ("scale", "gsnr", "gsnr_max", "initialised", "degenerate", "momentum_buffer")


def lora(run: str, step: int | None = None) -> dict[str, torch.Tensor]:
    name = "lora.safetensors" if step is None else f"lora-step{step:08d}.safetensors"
    return load_file(str(ROOT / run / name))


def state(run: str, step: int | None = None) -> dict:
    folder = "lora-state" if step is None else f"lora-step{step:08d}-state"
    return torch.load(ROOT / run / folder / "optimizer.bin", weights_only=True)


def kind(st: dict) -> str:
    return "A" if st["momentum_buffer"].shape[0] == RANK else "B"


def tensors(sd: dict, group: int, which: str) -> list[dict]:
    return [
        sd["state"][i] for i in sd["param_groups"][group]["params"] if kind(sd["state"][i]) == which
    ]


def changed(run: str, part_prefix: str, factor: str, k0: int, k1: int) -> tuple[int, int, float]:
    """How many of a part's A (lora_down) or B (lora_up) tensors differ between two steps,
    out of how many, and the largest change of an element."""
    a, b = lora(run, k0), lora(run, k1)
    names = [n for n in a if n.startswith(part_prefix) and f"{factor}.weight" in n]
    moved = [n for n in names if not torch.equal(a[n], b[n])]
    biggest = max((b[n] - a[n]).abs().max().item() for n in names)
    return len(moved), len(names), biggest


def optimizer_groups() -> None:
    print("== the optimizer kohya built (full run, state after step 1)")
    sd = state("full", 1)
    for g, group in enumerate(sd["param_groups"]):
        print(
            f"group {g} ({PARTS[g]}): lr {group['lr']:g}, {len(group['params'])} tensors "
            f"({len(tensors(sd, g, 'A'))} A, {len(tensors(sd, g, 'B'))} B), momentum "
            f"{group['momentum']}, weight_decay {group['weight_decay']}, eps {group['eps']:g}, "
            f"normalize {group['normalize']!r}"
        )


def initialised_per_step() -> None:
    print("\n== tensors with a g-SNR scale after each step (full run)")
    for k in range(1, 7):
        sd = state("full", k)
        counts = []
        for which in "AB":
            members = [st for g in (0, 1) for st in tensors(sd, g, which)]
            done = sum(bool(st["initialised"]) for st in members)
            counts.append(f"{which} {done}/{len(members)}")
        print(f"step {k}: " + ", ".join(counts))


def movement() -> None:
    print("\n== LoRA A (lora_down) tensors changed since step 1, and the largest element change")
    a0 = lora("pytorch_optimizer", 1)  # A never moves there (see the released runs): A_0
    first = lora("full", 1)
    untouched = all(torch.equal(first[n], a0[n]) for n in first if "lora_down" in n)
    print(f"full run, step 1: every A equal to its initial value (bitwise): {untouched}")
    for k in range(2, 7):
        parts = []
        for prefix, label in (("lora_te_", "text encoder"), ("lora_unet_", "U-Net")):
            moved, total, biggest = changed("full", prefix, "lora_down", 1, k)
            parts.append(f"{label} {moved}/{total} (max {biggest:.1e})")
        print(f"full run, step {k}: " + ", ".join(parts))


def lr_per_group() -> None:
    print("\n== per-group lr: step 1 took every B from 0 to -lr * scale * m (m = g on step 1)")
    sd, b1 = state("full", 1), lora("full", 1)
    for g, group in enumerate(sd["param_groups"]):
        prefix = ("lora_te_", "lora_unet_")[g]
        names = [n for n in b1 if n.startswith(prefix) and n.endswith("lora_up.weight")]
        ratios = []
        for st in tensors(sd, g, "B"):
            if not bool(st["initialised"]):
                continue
            m = st["momentum_buffer"].flatten()
            # the file's tensor for this state entry: the one parallel to its momentum
            match = max(
                (n for n in names if b1[n].shape == st["momentum_buffer"].shape),
                key=lambda n, m=m: abs(
                    torch.nn.functional.cosine_similarity(b1[n].flatten(), m, dim=0)
                ),
            )
            taken = -(b1[match].flatten() @ m) / (st["scale"] * (m @ m))
            ratios.append(taken.item() / group["lr"])
        print(
            f"group {g} ({PARTS[g]}), lr {group['lr']:g}: lr taken / group lr over its "
            f"{len(ratios)} B tensors: {min(ratios):.7f} to {max(ratios):.7f}"
        )


def scales(run: str = "full", step: int | None = None) -> None:
    sd = state(run, step)
    eps = sd["param_groups"][0]["eps"]
    for g in (0, 1):
        for which in "AB":
            values = [st["scale"].item() for st in tensors(sd, g, which) if bool(st["initialised"])]
            print(
                f"{run}, eps {eps:g}, {PARTS[g]} {which}: scale min {min(values):.3g}, median "
                f"{statistics.median(values):.3g}, max {max(values):.3g} ({len(values)} tensors)"
            )


def released() -> None:
    print("\n== the released implementations, same command, seed and data (3 steps)")
    for run, label in (
        ("pytorch_optimizer", "pytorch_optimizer.SGDSaI (pytorch-optimizer 3.9.0)"),
        ("sgd_sai_103", "sgd_sai.SGD_sai (sgd-sai 1.0.3)"),
    ):
        sd = state(run, 3)
        gsnr_a = [st["gsnr"].item() for g in (0, 1) for st in tensors(sd, g, "A")]
        moved = [changed(run, "lora_", "lora_down", 1, k)[0] for k in (2, 3)]
        print(
            f"{label}: largest g-SNR of any A {max(gsnr_a):g} ({len(gsnr_a)} tensors); A tensors "
            f"changed since step 1: {moved[0]} at step 2, {moved[1]} at step 3"
        )


def resume() -> None:
    print("\n== resume: full's command with --resume <full's state after step 3>")
    for k in (1, 2, 3):
        a, b = lora("resumed", k), lora("full", k + 3)
        same = a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in b)
        print(f"resumed run's step {k} (global step {k + 3}) == full run's step {k + 3}, every "
              f"LoRA tensor bitwise: {same}")  # fmt: skip
    saved, resumed_first = state("full", 3), state("resumed", 1)
    kept = all(
        torch.equal(saved["state"][i]["scale"], resumed_first["state"][i]["scale"])
        for i in saved["state"]
    )
    print(f"scales after the first resumed step == scales saved after step 3: {kept}")
    a, b = state("resumed"), state("full")
    same = all(
        torch.equal(a["state"][i][key], b["state"][i][key])
        for i in b["state"]
        for key in STATE_KEYS
    )
    print(
        f"final optimizer state, {len(b['state'])} tensors x {', '.join(STATE_KEYS)}: bitwise equal: {same}"
    )


def other_settings() -> None:
    print("\n== the same with eps=0, and at lr 0.1 / 0.05: scales, A tensors changed by step 3")
    for run in ("eps0", "lr01"):
        if not (ROOT / run).is_dir():
            continue
        sd = state(run, 3)
        print(f"{run}: lr {sd['param_groups'][0]['lr']:g} / {sd['param_groups'][1]['lr']:g}")
        scales(run, 3)
    for run in ("full", "eps0", "lr01"):
        if (ROOT / run).is_dir():
            parts = [
                changed(run, prefix, "lora_down", 1, 3) for prefix in ("lora_te_", "lora_unet_")
            ]
            print(f"{run}: A tensors changed by step 3: text encoder {parts[0][0]}/{parts[0][1]}, "
                  f"U-Net {parts[1][0]}/{parts[1][1]}")  # fmt: skip


if __name__ == "__main__":
    optimizer_groups()
    initialised_per_step()
    movement()
    lr_per_group()
    print("\n== scales at the end of the full run")
    scales()
    released()
    resume()
    other_settings()
