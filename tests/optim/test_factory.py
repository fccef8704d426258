"""Tests for sai_diffusion.optim.build_optimizer (docs/dev/optimizer-spec.md, "Factory").

The scaled-* optimizers are checked against a hand computation of the Riemannian preconditioner
as peft 0.21 defines it (Zhang & Pilanci 2024): g_A <- (B^T B + reg I)^-1 g_A,
g_B <- g_B (A A^T + reg I)^-1, with the factors' values from before the update, followed by a
plain torch AdamW / SGD step. Tolerance rtol 1e-5 (atol 1e-7): the optimizer does the inverse in
fp32 (pinv) and the hand computation in float64 with an exact inverse; r = 4 and the damped
matrices are well conditioned, so fp32 gives ~1e-6 relative.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from sai_diffusion.config import DEFAULT_LR
from sai_diffusion.optim import OPTIMIZERS, STATE_BUFFERS, SGDSaI, build_optimizer, state_bytes

NAMES = ["sgd-sai", "scaled-adamw", "scaled-sgd", "adamw", "sgd"]


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def lora_model(seed=0, random_b=False):
    """A real peft LoRA on both layers; bias="lora_only" makes the two biases trainable (1-D)."""
    torch.manual_seed(seed)
    model = get_peft_model(
        TwoLayer(), LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"], bias="lora_only")
    )
    if random_b:  # B = 0 would make g_A = 0 and the A preconditioner invisible
        with torch.no_grad():
            for n, p in model.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0.0, 0.5)
    return model


def backward(model, seed=11):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    model.zero_grad(set_to_none=True)
    loss = (model(x) - y).pow(2).mean()
    loss.backward()
    return loss


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def optimizer_params(opt):
    return [p for group in opt.param_groups for p in group["params"]]


def _reference_groups(model, weight_decay):
    """The spec's groups (docs/dev/optimizer-spec.md, "Factory"): 1-D tensors without decay."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    plain = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


# each name's algorithm built directly, with the hyperparameters the factory is given below
REFERENCE = {
    "sgd-sai": lambda groups: SGDSaI(groups, lr=3e-3, momentum=0.8),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=3e-3, betas=(0.8, 0.99), eps=1e-8),
    "sgd": lambda groups: torch.optim.SGD(groups, lr=3e-3, momentum=0.8),
    "scaled-adamw": lambda groups: torch.optim.AdamW(groups, lr=3e-3, betas=(0.8, 0.99)),
    "scaled-sgd": lambda groups: torch.optim.SGD(groups, lr=3e-3, momentum=0.8),
}


@pytest.mark.parametrize("name", NAMES)
def test_builds_each_optimizer_on_a_peft_lora_model(name):
    """Every name builds its algorithm over exactly the trainable params (each once, none of
    the frozen base weights) with lr, momentum / betas and decay forwarded: two steps equal
    those of the algorithm built directly (sgd-sai, adamw, sgd: bitwise); the scaled pair's
    differ from their base optimizer's, the preconditioner acting (its values are checked
    against a hand computation below)."""
    model, twin = lora_model(random_b=True), lora_model(random_b=True)
    train = trainable(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = build_optimizer(name, model, lr=3e-3, weight_decay=0.1, momentum=0.8, betas=(0.8, 0.99))
    reference = REFERENCE[name](_reference_groups(twin, 0.1))
    held = optimizer_params(opt)
    assert len(held) == len({id(p) for p in held}), "a param is in two groups"
    assert {id(p) for p in held} == {id(p) for p in train.values()}
    for _ in range(2):
        for m, o in ((model, opt), (twin, reference)):
            backward(m)
            o.step()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), f"frozen {n} changed"
    theirs = dict(twin.named_parameters())
    same = all(torch.equal(p, theirs[n]) for n, p in train.items())
    assert same == (not name.startswith("scaled-")), name


@pytest.mark.parametrize("no_decay_1d", [True, False])
@pytest.mark.parametrize("name", NAMES)
def test_1d_tensors_get_no_weight_decay_by_default(name, no_decay_1d):
    """1-D tensors (biases, norms) get weight_decay 0 unless no_decay_1d=False; every other tensor
    gets the requested weight_decay."""
    model = lora_model()
    assert any(p.ndim == 1 for p in trainable(model).values()), "the model must have 1-D params"
    opt = build_optimizer(name, model, lr=1e-3, weight_decay=0.1, no_decay_1d=no_decay_1d)
    for group in opt.param_groups:
        for p in group["params"]:
            expected = 0.0 if (p.ndim == 1 and no_decay_1d) else 0.1
            assert group["weight_decay"] == expected, f"{tuple(p.shape)}: {group['weight_decay']}"


@pytest.mark.parametrize("name", ["sgd-sai", "adamw", "sgd"])
def test_named_params_input_equals_model_input(name):
    """build_optimizer accepts named parameters as well as a model: same params, same groups."""
    model = lora_model()
    named = list(trainable(model).items())
    a = build_optimizer(name, model, lr=1e-3, weight_decay=0.1)
    b = build_optimizer(name, named, lr=1e-3, weight_decay=0.1)
    assert len(a.param_groups) == len(b.param_groups)
    for ga, gb in zip(a.param_groups, b.param_groups, strict=True):
        assert [id(p) for p in ga["params"]] == [id(p) for p in gb["params"]]
        assert {k: v for k, v in ga.items() if k != "params"} == {
            k: v for k, v in gb.items() if k != "params"
        }


def test_defaults_reach_the_optimizers():
    """Without keywords: momentum 0.9 (SGD family), betas (0.9, 0.999) and eps 1e-8 (AdamW),
    weight decay 0, and SGD-SaI normalised by the max, as docs/dev/optimizer-spec.md says."""
    groups = {name: build_optimizer(name, lora_model(), lr=0.1).param_groups for name in NAMES}
    for name in ("sgd-sai", "sgd", "scaled-sgd"):
        assert {g["momentum"] for g in groups[name]} == {0.9}, name
    for name in ("adamw", "scaled-adamw"):
        assert {(g["betas"], g["eps"]) for g in groups[name]} == {((0.9, 0.999), 1e-8)}, name
    assert all(g["weight_decay"] == 0.0 and g["lr"] == 0.1 for gs in groups.values() for g in gs)
    assert build_optimizer("sgd-sai", lora_model(), lr=0.1).normalize == "max"


def test_every_name_has_a_default_lr_and_a_state_size():
    """One list of names (optim.OPTIMIZERS); the tables keyed by it cover it exactly."""
    assert list(OPTIMIZERS) == NAMES
    assert set(DEFAULT_LR) == set(STATE_BUFFERS) == set(OPTIMIZERS)


@pytest.mark.parametrize("name", NAMES)
def test_state_bytes_counts_the_buffers_each_optimizer_keeps(name):
    """After one step, each trained tensor holds STATE_BUFFERS[name] fp32 buffers of its size
    (SGD-SaI adds a few per-tensor scalars, AdamW a step counter)."""
    model = lora_model(random_b=True)
    opt = build_optimizer(name, model, lr=1e-3)
    backward(model)
    opt.step()
    numel = sum(p.numel() for p in trainable(model).values())
    buffers = STATE_BUFFERS[name] * numel * 4
    scalars = state_bytes(opt) - buffers
    assert 0 <= scalars <= 64 * len(trainable(model)), (name, scalars)


@pytest.mark.parametrize("eps", [1e-6, 0.0])
@pytest.mark.parametrize("name", ["sgd-sai", "adamw", "scaled-adamw"])
def test_eps_is_forwarded(name, eps):
    """An explicit eps reaches every group of the optimizers that have one, 0.0 included (an
    `eps or default` would silently replace it)."""
    opt = build_optimizer(name, lora_model(), lr=1e-3, eps=eps)
    assert all(group["eps"] == eps for group in opt.param_groups)


def preconditioned(before, grads, reg):
    """peft's definition, by hand in float64: g_A <- (B^T B + reg I)^-1 g_A, g_B <- g_B (A A^T + reg I)^-1."""
    out = dict(grads)
    for n in grads:
        if ".lora_A." not in n:
            continue
        nb = n.replace(".lora_A.", ".lora_B.")
        a, b = before[n], before[nb]
        eye = torch.eye(a.shape[0], dtype=torch.float64)
        out[n] = torch.linalg.inv(b.T @ b + reg * eye) @ grads[n]
        out[nb] = grads[nb] @ torch.linalg.inv(a @ a.T + reg * eye)
    return out


@pytest.mark.parametrize("reg,eps,wd", [(1e-2, None, 0.1), (0.5, 0.5, 0.0)])
def test_scaled_adamw_first_update_matches_hand_computation(reg, eps, wd):
    """scaled-adamw's first step = peft's preconditioner then torch AdamW: theta*(1 - lr*wd) -
    lr * g'/(|g'| + eps) (bias-corrected first Adam step), wd 0 for the 1-D biases, rtol 1e-5.
    eps=0.5 makes the step depend on |g'| (not only its sign), so reg is checked too. The same
    hand computation without the preconditioner must NOT match, or the test could not fail."""
    lr = 1e-2
    model = lora_model(random_b=True)
    train = trainable(model)
    before = {n: p.detach().double().clone() for n, p in train.items()}
    backward(model)
    grads = {n: p.grad.detach().double().clone() for n, p in train.items()}
    opt = build_optimizer("scaled-adamw", model, lr=lr, weight_decay=wd, reg=reg, eps=eps)
    opt.step()

    eps_eff = 1e-8 if eps is None else eps  # torch AdamW's default

    def adamw_first_step(gs):
        return {
            n: before[n] * (1 - lr * (0.0 if before[n].ndim == 1 else wd))
            - lr * g / (g.abs() + eps_eff)
            for n, g in gs.items()
        }

    expected = adamw_first_step(preconditioned(before, grads, reg))
    plain = adamw_first_step(grads)
    for n, p in train.items():
        torch.testing.assert_close(p.detach().double(), expected[n], rtol=1e-5, atol=1e-7, msg=n)
    gap = max((train[n].detach().double() - plain[n]).abs().max().item() for n in train)
    assert gap > 1e-4, "preconditioning made no visible difference: the case cannot test it"


def test_scaled_sgd_first_update_matches_hand_computation():
    """scaled-sgd's first step = peft's preconditioner then torch SGD with momentum (first step:
    buffer = g'), weight_decay 0: theta - lr * g', rtol 1e-5; plain SGD would not match."""
    lr, reg = 0.05, 0.1
    model = lora_model(random_b=True)
    train = trainable(model)
    before = {n: p.detach().double().clone() for n, p in train.items()}
    backward(model)
    grads = {n: p.grad.detach().double().clone() for n, p in train.items()}
    opt = build_optimizer("scaled-sgd", model, lr=lr, weight_decay=0.0, reg=reg)
    opt.step()
    g_pre = preconditioned(before, grads, reg)
    for n, p in train.items():
        torch.testing.assert_close(
            p.detach().double(), before[n] - lr * g_pre[n], rtol=1e-5, atol=1e-7, msg=n
        )
    gap = max(
        (train[n].detach().double() - (before[n] - lr * grads[n])).abs().max().item() for n in train
    )
    assert gap > 1e-4


def test_unknown_name_lists_valid_names():
    """An unknown optimizer name raises ValueError whose message lists every valid name."""
    model = lora_model()
    with pytest.raises(ValueError) as info:
        build_optimizer("adam-sai", model, lr=1e-3)
    for name in NAMES:
        assert name in str(info.value), f"{name!r} missing from: {info.value}"


@pytest.mark.parametrize("name", ["scaled-adamw", "scaled-sgd"])
def test_scaled_without_lora_raises(name):
    """scaled-* on a model without any lora_A/lora_B pair raises a ValueError that says so."""
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="(?i)lora"):
        build_optimizer(name, TwoLayer(), lr=1e-3)
