"""Tests for sai_diffusion.optim.SGDSaI against docs/dev/optimizer-spec.md.

Oracles, in order of trust:
- tests/optim/reference.py: a float64 re-derivation of Algorithm 1 from the paper and the spec
  (independent of the implementation); the optimizer and the reference see the same gradients.
- sgd-sai 1.0.3 (`SGD_sai`), the authors' release, for normalize="none".
- the authors' v1.1.0 branch, for normalize="sqrt-numel": test_sai_scale.py checks the reference
  against a transcription of its update.
- pytorch-optimizer 4.1.0 (`SGDSaI`) for the raw g-SNR of 2-D tensors with momentum=0.

Tolerances. float32 and float64 parameters: rtol 1e-5. The optimizer does its math in fp32 (fp64
for fp64 params; unit roundoff 6e-8); ten steps of a few roundings each plus the g-SNR reductions
over <= 128 entries stay around 1e-6 relative, so 1e-5 has margin, and it still catches every
formula change we care about (the g-SNRs and scales are compared directly: biased vs unbiased
variance moves a block's g-SNR by >= 1/(2*128) = 4e-3, eps inside vs outside the sqrt by > 10 %
in the eps=1e-3 case). An atol of 1e-6 covers entries that pass near zero, where
the roundoff of an O(1) update is absolute, not relative. bfloat16 parameters: the reference
rounds its parameters to bf16 after every step as the spec says ("written back rounded"), but one
fp32-vs-fp64 difference can flip a rounding (one bf16 ulp = 0.4-0.8 % relative), so parameters
are compared per tensor in norm, ||p - ref|| / ||ref|| <= 2e-2; scales and momentum buffers are
fp32 for bf16 too and keep rtol 1e-5.
"""

from __future__ import annotations

import contextlib
import io
import math
import shutil

import pytest
import torch
from torch import nn

from sai_diffusion.optim import SGDSaI, fused, gsnr_table

from .reference import block_gsnr, sgd_sai_reference

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(F64, id="fp64"), pytest.param(BF16, id="bf16")]
# the update paths: the per-tensor loop, the foreach kernels, the fused one-pass CPU kernel
# (built by optim/fused.py; where it cannot be, e.g. no C++ compiler, its cases are skipped and
# test_the_fused_kernel_builds_where_a_compiler_is says so)
NO_KERNEL = pytest.mark.skipif(fused.cpu_kernel() is None, reason=fused.failure())
PATHS = [
    pytest.param(dict(foreach=False, fused=False), id="loop"),
    pytest.param(dict(foreach=True, fused=False), id="foreach"),
    pytest.param(dict(fused=True), id="fused", marks=NO_KERNEL),
]

# One table of optimizer settings drives the numerical tests (lr sized so that raw "none" scales of
# ~5-20 keep the steps moderate).
CASES = [
    pytest.param(dict(normalize="max", lr=0.1, momentum=0.9, weight_decay=0.1), id="max-mu0.9-wd"),
    pytest.param(dict(normalize="max", lr=0.1, momentum=0.0, weight_decay=0.0), id="max-mu0"),
    pytest.param(
        dict(normalize="max", lr=0.1, momentum=0.9, weight_decay=0.01, maximize=True),
        id="max-maximize",
    ),
    # eps comparable to the small blocks' gradient std: tells eps outside vs inside the sqrt apart
    pytest.param(dict(normalize="max", lr=0.1, momentum=0.5, eps=1e-3), id="max-eps1e-3"),
    pytest.param(
        dict(normalize="none", lr=2e-3, momentum=0.9, weight_decay=0.1), id="none-mu0.9-wd"
    ),
    pytest.param(dict(normalize="none", lr=2e-3, momentum=0.0, maximize=True), id="none-mu0-max"),
    # raw sqrt(numel) scales of 2.4-11 as "none"'s; eps is not part of the rule
    pytest.param(
        dict(normalize="sqrt-numel", lr=2e-3, momentum=0.9, weight_decay=0.1),
        id="sqrt-numel-mu0.9-wd",
    ),
    pytest.param(
        dict(normalize="sqrt-numel", lr=2e-3, momentum=0.0, eps=1e-3, maximize=True),
        id="sqrt-numel-mu0-max-eps",
    ),
]

# "Model-like" blocks: 2-D weights, 1-D biases/norms, a 4-D conv kernel, a 1-row matrix.
SHAPES = [(8, 16), (16,), (4, 3, 3, 3), (1, 6), (33,), (5, 7)]


# ----------------------------------------------------------------------------- helpers


def make_params(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(s, generator=g, dtype=F64).to(dtype), requires_grad=True)
        for s in shapes
    ]


def make_grad_steps(shapes, steps, seed=1):
    """Float64 gradients, one list per step; each block has its own magnitude (1e-2..1) and mean,
    so the blocks' g-SNRs differ and eps=1e-3 is comparable to the smallest stds."""
    g = torch.Generator().manual_seed(seed)
    mags = [10 ** (-2 * torch.rand((), generator=g, dtype=F64).item()) for _ in shapes]
    means = [2 * torch.rand((), generator=g, dtype=F64).item() - 1 for _ in shapes]
    return [
        [
            a * (c + torch.randn(s, generator=g, dtype=F64))
            for s, a, c in zip(shapes, mags, means, strict=True)
        ]
        for _ in range(steps)
    ]


def as_dtype(grad_steps, dtype):
    """The gradients exactly as the optimizer sees them (rounded to the param dtype), in float64."""
    return [[None if g is None else g.to(dtype).to(F64) for g in step] for step in grad_steps]


def run_steps(opt, params, grad_steps):
    for step in grad_steps:
        for p, g in zip(params, step, strict=True):
            p.grad = None if g is None else g.to(p.dtype).clone()
        opt.step()


def ref_kwargs(kw):
    keys = ("lr", "momentum", "weight_decay", "eps", "normalize", "maximize")
    return {k: kw[k] for k in keys if k in kw}


def is_initialised(opt, p) -> bool:
    st = opt.state.get(p, {})
    return bool(st.get("initialised", False))


def assert_params_match(actual, expected64, dtype, what=""):
    if dtype == BF16:
        err = (actual.detach().to(F64) - expected64).norm() / expected64.norm()
        assert err <= 2e-2, f"{what}: bf16 relative error {err:.3g} > 2e-2"
    else:
        torch.testing.assert_close(
            actual.detach().to(F64), expected64, rtol=1e-5, atol=1e-6, msg=what
        )


def assert_matches_reference(opt, params, ref, dtype):
    """Parameters, scales, g-SNRs, G_max and momentum buffers against the float64 reference."""
    for i, p in enumerate(params):
        assert p.dtype == dtype, "the optimizer changed a parameter's dtype"
        assert is_initialised(opt, p) == ref.initialised[i], f"block {i}: initialised flag"
        assert_params_match(p, ref.params[i], dtype, f"block {i} {tuple(p.shape)}")
        if not ref.initialised[i]:
            continue
        st = opt.state[p]
        torch.testing.assert_close(
            st["scale"].to(F64),
            torch.tensor(ref.scale[i], dtype=F64),
            rtol=1e-5,
            atol=0,
            msg=lambda m, w=f"block {i}: scale": f"{w}\n{m}",
        )
        if not ref.degenerate[i]:
            torch.testing.assert_close(
                st["gsnr"].to(F64),
                torch.tensor(ref.gsnr[i], dtype=F64),
                rtol=1e-5,
                atol=0,
                msg=lambda m, w=f"block {i}: gsnr": f"{w}\n{m}",
            )
        if "momentum_buffer" in st:
            m = ref.momentum[i]
            torch.testing.assert_close(
                st["momentum_buffer"].to(F64),
                m,
                rtol=1e-5,
                atol=1e-6 * m.abs().max().item(),
                msg=lambda m, w=f"block {i}: momentum": f"{w}\n{m}",
            )
        # degenerate blocks: see test_gsnr_max_state_is_the_frozen_gmax_for_every_block
        if ref.gsnr_max is not None and not ref.degenerate[i]:
            torch.testing.assert_close(
                st["gsnr_max"].to(F64),
                torch.tensor(ref.gsnr_max, dtype=F64),
                rtol=1e-5,
                atol=0,
                msg=lambda m, w=f"block {i}: gsnr_max": f"{w}\n{m}",
            )


@contextlib.contextmanager
def quiet():
    """sgd-sai 1.0.3 prints a banner on its first step."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# ------------------------------------------------------------------ 0. the reference itself


def test_reference_matches_sgd_sai_release_under_none():
    """Guards the oracle: reference.py with normalize="none" equals sgd-sai 1.0.3 in float64
    (tolerance 1e-12 absolute), so a disagreement elsewhere is the implementation's, not the
    reference's."""
    from sgd_sai import SGD_sai

    params = make_params(SHAPES, F64)
    grads = make_grad_steps(SHAPES, 6)
    ref = sgd_sai_reference(
        params, grads, lr=1e-3, momentum=0.9, weight_decay=0.1, normalize="none"
    )
    theirs = [p.detach().clone().requires_grad_() for p in params]
    opt = SGD_sai(theirs, lr=1e-3, momentum=0.9, eps=1e-8, weight_decay=0.1)
    with quiet():
        run_steps(opt, theirs, grads)
    for t, r in zip(theirs, ref.params, strict=True):
        torch.testing.assert_close(t.detach(), r, rtol=0, atol=1e-12)


# ----------------------------------------------------- 1. Algorithm 1 vs the float64 reference


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw", CASES)
def test_matches_float64_reference(kw, dtype, path):
    """Ten steps over model-like blocks (2-D, 1-D, 4-D conv, 1-row) equal the float64
    re-derivation of Algorithm 1 (reference.py): params, scales, g-SNRs, G_max, momentum.
    Tolerance: rtol 1e-5 (fp32/fp64), norm-relative 2e-2 for bf16 params (module docstring)."""
    params = make_params(SHAPES, dtype)
    init = [p.detach().clone() for p in params]
    grads = make_grad_steps(SHAPES, 10)
    opt = SGDSaI(params, **path, **kw)
    run_steps(opt, params, grads)
    ref = sgd_sai_reference(
        init, as_dtype(grads, dtype), round_to=dtype if dtype == BF16 else None, **ref_kwargs(kw)
    )
    assert all(ref.initialised)
    assert_matches_reference(opt, params, ref, dtype)
    if kw["normalize"] == "max":
        scales = [opt.state[p]["scale"].item() for p in params]
        assert all(0 < s <= 1 for s in scales), scales
        assert max(scales) == pytest.approx(1.0, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES + [pytest.param(torch.float16, id="fp16")])
def test_state_schema(dtype):
    """State per spec: momentum_buffer fp32 for bf16/fp16 params (param dtype otherwise), gsnr /
    scale / gsnr_max 0-dim fp32, initialised 0-dim bool."""
    params = make_params(SHAPES, dtype)
    opt = SGDSaI(params, lr=0.1, momentum=0.9)
    run_steps(opt, params, make_grad_steps(SHAPES, 2))
    for p in params:
        st = opt.state[p]
        buf = st["momentum_buffer"]
        assert buf.shape == p.shape
        assert buf.dtype == (F32 if dtype in (BF16, torch.float16) else dtype)
        for key in ("gsnr", "scale", "gsnr_max"):
            assert st[key].dim() == 0 and st[key].dtype == F32, key
        assert st["initialised"].dim() == 0 and st["initialised"].dtype == torch.bool
        assert bool(st["initialised"])


def test_momentum_zero_keeps_no_buffer():
    """momentum=0: m = g and, per spec, no momentum buffer is kept (saves a param-sized tensor)."""
    params = make_params(SHAPES, F32)
    opt = SGDSaI(params, lr=0.1, momentum=0.0)
    run_steps(opt, params, make_grad_steps(SHAPES, 2))
    for p in params:
        assert "momentum_buffer" not in opt.state[p]


def test_gsnr_scales_invariant_to_global_gradient_scale():
    """g-SNR = ||g|| / sqrt(var g) (docs/dev/optimizer-spec.md, "Per block"), and so every "max"
    scale, is invariant to a global gradient scale (loss scaling, accumulation averaging) up to
    eps; 1024x gradients give the same scales (rtol 1e-5)."""
    grads = make_grad_steps(SHAPES, 1)
    scales = []
    for factor in (1.0, 1024.0):
        params = make_params(SHAPES, F32)
        opt = SGDSaI(params, lr=0.1)
        run_steps(opt, params, [[g * factor for g in grads[0]]])
        scales.append(torch.stack([opt.state[p]["scale"] for p in params]))
    torch.testing.assert_close(scales[0], scales[1], rtol=1e-5, atol=0)


# --------------------------------------------------- 2. normalize="none" vs the released code


class SmallMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.norm(self.fc1(x))))


def mlp_batch(step, dtype, seed=123):
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randn(64, 8, generator=g)
    y = x[:, :4].argmax(dim=1)  # a learnable target, so the run really trains
    return x.to(dtype), y


def mlp_step(model, opt, step, dtype):
    model.zero_grad(set_to_none=True)
    x, y = mlp_batch(step, dtype)
    out = model(x)
    loss = nn.functional.cross_entropy(out.float() if out.dtype == BF16 else out, y)
    loss.backward()
    opt.step()
    return loss


def make_mlp(dtype, seed=0):
    torch.manual_seed(seed)
    return SmallMLP().to(dtype)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", [pytest.param(F32, id="fp32"), pytest.param(F64, id="fp64")])
@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 0.1), (0.5, 0.0)])
def test_none_reproduces_sgd_sai_release(dtype, path, momentum, weight_decay):
    """normalize="none" reproduces sgd-sai 1.0.3 `SGD_sai` (same lr/momentum/eps/weight_decay) over
    a 20-step cross-entropy run of an MLP with LayerNorm: params and raw g-SNR within rtol 1e-5
    (atol 1e-6). Only numel > 1 blocks are comparable (1.0.3 gives a one-element block 5e7); this
    model has none, so the whole trajectory is compared."""
    from sgd_sai import SGD_sai

    ours_model, their_model = make_mlp(dtype), make_mlp(dtype)
    assert all(p.numel() > 1 for p in ours_model.parameters())
    hp = dict(lr=1e-3, momentum=momentum, eps=1e-8, weight_decay=weight_decay)
    ours = SGDSaI(ours_model.parameters(), normalize="none", **path, **hp)
    theirs = SGD_sai(their_model.parameters(), **hp)
    losses = []
    with quiet():
        for step in range(20):
            losses.append(mlp_step(ours_model, ours, step, dtype).item())
            mlp_step(their_model, theirs, step, dtype)
    assert losses[-1] < losses[0], "the run should actually train"
    for (name, p), q in zip(ours_model.named_parameters(), their_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(
            ours.state[p]["gsnr"].to(F64),
            theirs.state[q]["gsnr"].to(F64),
            rtol=1e-5,
            atol=0,
            msg=name,
        )
        torch.testing.assert_close(
            ours.state[p]["scale"].to(F64),
            theirs.state[q]["gsnr"].to(F64),
            rtol=1e-5,
            atol=0,
            msg=name,
        )


@pytest.mark.parametrize("path", PATHS)
def test_none_raw_gsnr_matches_pytorch_optimizer_for_2d(path):
    """With momentum=0 (pytorch-optimizer 4.1.0 starts its momentum at zero, so only momentum=0 has
    the same semantics) its raw g-SNR for 2-D tensors (rows > 1) equals our normalize="none" scale,
    and five steps give the same params (rtol 1e-5)."""
    from pytorch_optimizer import SGDSaI as PoSGDSaI

    shapes = [(8, 16), (5, 7), (12, 3)]
    ours_p, their_p = make_params(shapes, F32), make_params(shapes, F32)
    grads = make_grad_steps(shapes, 5)
    hp = dict(lr=2e-3, momentum=0.0, weight_decay=0.1, eps=1e-8)
    ours = SGDSaI(ours_p, normalize="none", **path, **hp)
    theirs = PoSGDSaI(their_p, foreach=False, **hp)
    run_steps(ours, ours_p, grads[:1])
    run_steps(theirs, their_p, grads[:1])
    for p, q in zip(ours_p, their_p, strict=True):
        torch.testing.assert_close(
            ours.state[p]["scale"].to(F64), theirs.state[q]["gsnr"].to(F64), rtol=1e-5, atol=0
        )
    run_steps(ours, ours_p, grads[1:])
    run_steps(theirs, their_p, grads[1:])
    for p, q in zip(ours_p, their_p, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- 3. the LoRA trap


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def make_lora(dtype=F32, seed=0):
    """A real peft LoRA (default init: A random, B = 0) on both Linear layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(TwoLayer(), LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"]))
    return model.to(dtype)


def lora_loss(model, step, seed=7):
    g = torch.Generator().manual_seed(seed + step)
    x = torch.randn(16, 6, generator=g)
    y = torch.randn(16, 3, generator=g)
    dtype = next(model.parameters()).dtype
    return (model(x.to(dtype)).float() - y).pow(2).mean()


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("normalize", ["max", "none", "sqrt-numel"])
def test_lora_a_deferred_until_first_nonzero_gradient(normalize, path):
    """The LoRA trap (docs/dev/optimizer-spec.md, "Deferred blocks"): with B = 0 the gradient of
    A is exactly zero on step 1. A must not be touched (no decay) nor initialised on step 1,
    must initialise and move on step 2; under "max" every scale is <= 1 (A gets
    min(gsnr / frozen G_max, 1)). Five steps then equal the float64 reference replayed on the
    captured gradients (rtol 1e-5)."""
    model = make_lora()
    named = trainable(model)
    params = [p for _, p in named]
    is_a = [".lora_A." in n for n, _ in named]
    assert sum(is_a) == 2 and len(params) == 4
    init = [p.detach().clone() for p in params]
    lr = 0.1 if normalize == "max" else 1e-3
    opt = SGDSaI(params, lr=lr, momentum=0.9, weight_decay=0.1, normalize=normalize, **path)
    captured = []
    for step in range(5):
        model.zero_grad(set_to_none=True)
        lora_loss(model, step).backward()
        captured.append([p.grad.detach().clone() for p in params])
        if step == 0:
            assert all(not g.any() for g, a in zip(captured[0], is_a, strict=True) if a), (
                "trap absent"
            )
        before = [p.detach().clone() for p in params]
        opt.step()
        for p, b, a in zip(params, before, is_a, strict=True):
            if not a:
                assert not torch.equal(p, b), "lora_B must move every step"
            elif step == 0:
                assert torch.equal(p, b), "lora_A was touched on step 1 (zero gradient)"
                assert not is_initialised(opt, p)
            elif step == 1:
                assert not torch.equal(p, b), "lora_A did not move on step 2"
                assert is_initialised(opt, p)
    if normalize == "max":
        assert all(opt.state[p]["scale"].item() <= 1.0 for p in params)
        assert all(opt.state[p]["scale"].item() > 0.0 for p in params)
    ref = sgd_sai_reference(
        init, captured, lr=lr, momentum=0.9, weight_decay=0.1, normalize=normalize
    )
    assert [s for s, a in zip(ref.init_step, is_a, strict=True) if a] == [2, 2]
    assert_matches_reference(opt, params, ref, F32)


def test_lora_a_never_trains_with_sgd_sai_release():
    """Contrast, documenting the released defect: sgd-sai 1.0.3 computes A's g-SNR from the zero
    first-step gradient (g-SNR 0), so A only decays: A_k = A_0 * (1 - lr*wd)^k (rtol 1e-6)."""
    from sgd_sai import SGD_sai

    model = make_lora()
    named = trainable(model)
    a_params = [p for n, p in named if ".lora_A." in n]
    a0 = [p.detach().clone() for p in a_params]
    lr, wd, steps = 0.01, 0.1, 5
    opt = SGD_sai([p for _, p in named], lr=lr, momentum=0.9, eps=1e-8, weight_decay=wd)
    with quiet():
        for step in range(steps):
            model.zero_grad(set_to_none=True)
            lora_loss(model, step).backward()
            opt.step()
    for p, p0 in zip(a_params, a0, strict=True):
        assert opt.state[p]["gsnr"].item() == 0.0
        torch.testing.assert_close(p.detach(), p0 * (1 - lr * wd) ** steps, rtol=1e-6, atol=0)


# -------------------------------------------------------- 4. one-element and zero-variance blocks


class WithScalar(nn.Module):
    """loss = sum(temp * fc2(tanh(fc1(x)))): fc2.bias gets the constant gradient temp * N
    (zero variance), temp is a one-element block."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)
        self.temp = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.temp * self.fc2(torch.tanh(self.fc1(x)))


def with_scalar_grads(model, step):
    model.zero_grad(set_to_none=True)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(50 + step))
    model(x.to(model.temp.dtype)).sum().backward()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", ["max", "none"])
def test_degenerate_blocks_step_with_scale_one(normalize, dtype, path):
    """A one-element parameter and a bias with a constant gradient (variance exactly 0) get scale
    1.0, stay finite and move; their first step is theta*(1-lr*wd) - lr*g (float64 reference,
    rtol 1e-5); and adding them to the param list leaves every other block's scale bitwise
    unchanged (they are excluded from the max)."""
    torch.manual_seed(0)
    model = WithScalar().to(dtype)
    degenerate = [model.fc2.bias, model.temp]
    others = [model.fc1.weight, model.fc1.bias, model.fc2.weight]
    lr = 0.05 if normalize == "max" else 1e-2  # scale-1 blocks must still move in bf16
    hp = dict(lr=lr, momentum=0.9, weight_decay=0.1, normalize=normalize, **path)

    with_scalar_grads(model, 0)
    g_bias = model.fc2.bias.grad
    assert torch.equal(g_bias, torch.full_like(g_bias, g_bias[0].item())), "bias grad not constant"
    assert model.temp.numel() == 1
    init = [p.detach().clone() for p in others + degenerate]
    grads = [p.grad.detach().clone() for p in others + degenerate]

    opt_without = SGDSaI(others, **hp)
    opt_with = SGDSaI(others + degenerate, **hp)
    opt_with.step()  # the params are stepped only by opt_with; opt_without only reads state
    for p in degenerate:
        assert opt_with.state[p]["scale"].item() == 1.0
    ref = sgd_sai_reference(
        init, [grads], **ref_kwargs(hp), round_to=dtype if dtype == BF16 else None
    )
    assert ref.degenerate == [False, False, False, True, True]
    for p, r in zip(others + degenerate, ref.params, strict=True):
        assert_params_match(p, r, dtype)

    # the same first-step gradients through an optimizer that does not hold the degenerate blocks
    for p, g in zip(others, grads[:3], strict=True):
        p.grad = g.clone()
    saved = [p.detach().clone() for p in others]
    opt_without.step()
    for p, s in zip(others, saved, strict=True):
        assert torch.equal(opt_without.state[p]["scale"], opt_with.state[p]["scale"])
        p.data.copy_(s)

    for step in range(1, 4):
        with_scalar_grads(model, step)
        opt_with.step()
    for p, p0 in zip(degenerate, init[3:], strict=True):
        assert torch.isfinite(p).all() and not torch.equal(p.detach(), p0)
        assert opt_with.state[p]["scale"].item() == 1.0
        assert torch.isfinite(opt_with.state[p]["momentum_buffer"]).all()
    assert all(torch.isfinite(p).all() for p in others)


# ------------------------------------------------------------------------ 5. deferred blocks


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("missing", ["none", "zeros"])
def test_deferred_blocks(missing, path):
    """A block whose first gradient is None (or all zeros) is untouched (no decay, no momentum) and
    uninitialised; it initialises on its first non-zero gradient with min(gsnr / frozen G_max, 1)
    (one deferred block is above G_max and clips to 1, one below); a block that never gets a
    gradient keeps an empty state. Compared with the float64 reference (rtol 1e-5)."""
    shapes = [(6, 5), (4, 4), (10,), (3, 3), (7,)]
    params = make_params(shapes, F32)
    init = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(3)
    steps = []
    for step in range(4):
        grads = [torch.randn(s, generator=g, dtype=F64) for s in shapes[:2]]
        # block 2: large mean (high g-SNR, above G_max); block 3: zero mean, few entries (low)
        late = [
            5.0 + 0.1 * torch.randn(10, generator=g, dtype=F64),
            torch.randn(3, 3, generator=g, dtype=F64),
        ]
        if step == 0:
            late = (
                [None, None]
                if missing == "none"
                else [torch.zeros(10, dtype=F64), torch.zeros(3, 3, dtype=F64)]
            )
        steps.append(grads + late + [None])  # block 4 never gets a gradient
    opt = SGDSaI(params, lr=0.1, momentum=0.9, weight_decay=0.1, **path)

    run_steps(opt, params, steps[:1])
    for i in (2, 3, 4):
        assert torch.equal(params[i].detach(), init[i]), (
            f"block {i} touched before its first gradient"
        )
        assert not is_initialised(opt, params[i])
    run_steps(opt, params, steps[1:])

    ref = sgd_sai_reference(init, steps, lr=0.1, momentum=0.9, weight_decay=0.1)
    assert ref.gsnr[2] > ref.gsnr_max > ref.gsnr[3], "the case should exercise the clip at 1"
    assert opt.state[params[2]]["scale"].item() == 1.0
    assert_matches_reference(opt, params, ref, F32)
    assert len(opt.state.get(params[4], {})) == 0, (
        "a param without gradients must keep an empty state"
    )
    assert torch.equal(params[4].detach(), init[4])


def test_gmax_set_on_first_step_with_a_nondegenerate_block():
    """If the first step initialises only degenerate blocks (a scalar), G_max is set later, on the
    first step that initialises a non-degenerate block: those get gsnr / max-of-that-step (the
    largest is 1), the scalar keeps 1.0. Float64 reference, rtol 1e-5."""
    shapes = [(), (6, 5), (9,)]
    params = make_params(shapes, F32)
    init = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(4)
    steps = [[torch.tensor(0.3, dtype=F64), None, None]]
    for _ in range(3):
        steps.append(
            [torch.randn((), generator=g, dtype=F64)]
            + [torch.randn(s, generator=g, dtype=F64) + 0.5 for s in shapes[1:]]
        )
    opt = SGDSaI(params, lr=0.1, momentum=0.9)
    run_steps(opt, params, steps)
    ref = sgd_sai_reference(init, steps, lr=0.1, momentum=0.9)
    assert ref.init_step == [1, 2, 2]
    assert_matches_reference(opt, params, ref, F32)
    assert max(opt.state[p]["scale"].item() for p in params[1:]) == pytest.approx(1.0, rel=1e-6)


def test_gsnr_max_state_is_the_frozen_gmax_for_every_block():
    """Spec, State: every parameter's `gsnr_max` is the frozen G_max once it exists (absent/NaN only
    before), including a degenerate scalar initialised before G_max was set, so any block's state
    alone is enough to recover G_max (float64 reference, rtol 1e-5)."""
    shapes = [(), (6, 5), (9,)]
    params = make_params(shapes, F32)
    g = torch.Generator().manual_seed(4)
    steps = [[torch.tensor(0.3, dtype=F64), None, None]]
    steps += [
        [torch.randn((), generator=g, dtype=F64)]
        + [torch.randn(s, generator=g, dtype=F64) + 0.5 for s in shapes[1:]]
        for _ in range(2)
    ]
    ref = sgd_sai_reference(params, steps, lr=0.1)
    opt = SGDSaI(params, lr=0.1)
    run_steps(opt, params, steps)
    got = [opt.state[p].get("gsnr_max", torch.tensor(math.nan)).item() for p in params]
    assert got == pytest.approx([ref.gsnr_max] * 3, rel=1e-5), f"per-block gsnr_max {got}"


# ------------------------------------------------------------------------------- 6. closure


def test_closure_evaluated_once_per_step_and_loss_returned():
    """step(closure) runs the closure exactly once per step (sgd-sai 1.0.3 runs it twice on the
    first step) and returns its loss."""
    model = make_mlp(F32)
    opt = SGDSaI(model.parameters(), lr=0.05)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad(set_to_none=True)
        x, y = mlp_batch(len(calls), F32)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for step in range(1, 4):
        loss = opt.step(closure)
        assert len(calls) == step
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and torch.isfinite(loss)
    assert opt.step() is None


# ------------------------------------------------------------------ 7. state_dict round trip


def _build(kind, dtype):
    if kind == "mlp":
        model = make_mlp(dtype)
        params = list(model.parameters())

        def loss_fn(step):
            x, y = mlp_batch(step, dtype)
            out = model(x)
            return nn.functional.cross_entropy(out.float() if out.dtype == BF16 else out, y)
    else:
        model = make_lora(dtype)
        params = [p for _, p in trainable(model)]

        def loss_fn(step):
            return lora_loss(model, step)

    return model, params, loss_fn


def _train(model, params, loss_fn, opt, steps):
    for step in steps:
        model.zero_grad(set_to_none=True)
        loss_fn(step).backward()
        opt.step()


def _state_tensors(opt, params):
    return [dict(opt.state.get(p, {})) for p in params]


def bitwise_equal(a, b) -> bool:
    """Same dtype, shape and bits; NaN equals NaN (gsnr_max is NaN before G_max exists)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    if not a.is_floating_point():
        return False
    nan_a, nan_b = a.isnan(), b.isnan()
    return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])


@pytest.mark.parametrize(
    "kind,dtype,normalize,k,momentum",
    [
        pytest.param("mlp", F32, "max", 3, 0.9, id="mlp-fp32-max"),
        pytest.param("mlp", F64, "max", 3, 0.9, id="mlp-fp64-max"),
        pytest.param("mlp", BF16, "max", 3, 0.9, id="mlp-bf16-max"),
        pytest.param("mlp", F32, "none", 3, 0.9, id="mlp-fp32-none"),
        pytest.param("mlp", F32, "sqrt-numel", 3, 0.9, id="mlp-fp32-sqrt-numel"),
        pytest.param("mlp", F32, "max", 3, 0.0, id="mlp-fp32-mu0"),
        pytest.param("lora", F32, "max", 1, 0.9, id="lora-fp32-save-before-A-init"),
        pytest.param("lora", BF16, "max", 1, 0.9, id="lora-bf16-save-before-A-init"),
        pytest.param("lora", F32, "sqrt-numel", 1, 0.9, id="lora-fp32-sqrt-numel-before-A-init"),
    ],
)
def test_state_dict_round_trip_is_bitwise(kind, dtype, normalize, k, momentum, tmp_path):
    """Save after k steps to a real file, torch.load(weights_only=True), load into a fresh
    optimizer over fresh params, continue to 8 steps: params and state are bitwise equal
    (torch.equal, same dtypes) to an uninterrupted 8-step run. The LoRA cases save before A is
    initialised (A initialises at step 2 against the restored, frozen G_max); for bf16 params the
    momentum buffer stays fp32 after the load (torch's default load casts state to the param
    dtype)."""
    lr = 0.05 if normalize == "max" else 1e-3
    hp = dict(lr=lr, momentum=momentum, weight_decay=0.1, normalize=normalize)

    model_ref, params_ref, loss_ref = _build(kind, dtype)
    opt_ref = SGDSaI(params_ref, **hp)
    _train(model_ref, params_ref, loss_ref, opt_ref, range(8))

    model_a, params_a, loss_a = _build(kind, dtype)
    opt_a = SGDSaI(params_a, **hp)
    _train(model_a, params_a, loss_a, opt_a, range(k))
    if kind == "lora":
        a_first = [
            p for (n, _), p in zip(trainable(model_a), params_a, strict=True) if ".lora_A." in n
        ]
        assert not any(is_initialised(opt_a, p) for p in a_first), "save should precede A's init"
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model_a.state_dict(), "optim": opt_a.state_dict()}, path)
    del model_a, opt_a, params_a

    blob = torch.load(path, weights_only=True)
    model_b, params_b, loss_b = _build(kind, dtype)
    model_b.load_state_dict(blob["model"])
    opt_b = SGDSaI(params_b, **hp)
    opt_b.load_state_dict(blob["optim"])
    if dtype == BF16 and momentum > 0:
        for p in params_b:
            if "momentum_buffer" in opt_b.state.get(p, {}):
                assert opt_b.state[p]["momentum_buffer"].dtype == F32, "buffer cast to bf16 on load"
    _train(model_b, params_b, loss_b, opt_b, range(k, 8))

    for i, (p, q) in enumerate(zip(params_ref, params_b, strict=True)):
        assert torch.equal(p, q), f"param {i} differs after resume"
    for i, (s, t) in enumerate(
        zip(_state_tensors(opt_ref, params_ref), _state_tensors(opt_b, params_b), strict=True)
    ):
        assert s.keys() == t.keys(), f"param {i}: state keys {sorted(s)} vs {sorted(t)}"
        for key in s:
            v, w = s[key], t[key]
            if isinstance(v, torch.Tensor):
                assert v.dtype == w.dtype, (
                    f"param {i} {key}: dtype {v.dtype} vs {w.dtype} after resume"
                )
                assert bitwise_equal(v, w), f"param {i} {key}: {v} vs {w} after resume"
            else:
                assert v == w or (v != v and w != w), f"param {i} {key}"


def test_resume_restores_gmax_when_the_first_block_is_degenerate(tmp_path):
    """Resume must find the frozen G_max even when the first block in the state is a degenerate
    scalar initialised before G_max existed, and a block deferred past the save point must still
    get min(gsnr / G_max, 1): bitwise equal (torch.equal) to an uninterrupted run."""
    shapes = [(), (6, 5), (9,), (4, 4)]
    g = torch.Generator().manual_seed(8)
    steps = [[torch.tensor(0.3, dtype=F64), None, None, None]]
    for step in range(1, 7):
        late = torch.randn(4, 4, generator=g, dtype=F64) if step >= 4 else None
        steps.append(
            [torch.randn((), generator=g, dtype=F64)]
            + [torch.randn(s, generator=g, dtype=F64) + 0.5 for s in shapes[1:3]]
            + [late]
        )
    hp = dict(lr=0.1, momentum=0.9, weight_decay=0.1)

    full = make_params(shapes, F32)
    opt_full = SGDSaI(full, **hp)
    run_steps(opt_full, full, steps)

    first = make_params(shapes, F32)
    opt_first = SGDSaI(first, **hp)
    run_steps(opt_first, first, steps[:3])
    path = tmp_path / "ckpt.pt"
    torch.save({"params": [p.detach() for p in first], "optim": opt_first.state_dict()}, path)
    blob = torch.load(path, weights_only=True)
    resumed = [nn.Parameter(t.clone()) for t in blob["params"]]
    opt_resumed = SGDSaI(resumed, **hp)
    opt_resumed.load_state_dict(blob["optim"])
    run_steps(opt_resumed, resumed, steps[3:])

    ref = sgd_sai_reference(make_params(shapes, F32), steps, **hp)
    assert ref.init_step == [1, 2, 2, 5]
    assert_matches_reference(opt_full, full, ref, F32)
    for i, (p, q) in enumerate(zip(full, resumed, strict=True)):
        assert torch.equal(p, q), f"block {i} differs after resume"
        assert bitwise_equal(opt_full.state[p]["scale"], opt_resumed.state[q]["scale"]), (
            f"block {i} scale"
        )


# ------------------------------------------------------------------------- 8. param groups


@pytest.mark.parametrize("path", PATHS)
def test_param_groups_own_hyperparameters_global_max(path):
    """Each group steps with its own lr, weight_decay, momentum and eps, and the g-SNR max is
    global over all groups: a group of low-g-SNR blocks (few entries, zero-mean gradients; g-SNR
    is invariant to gradient magnitude, so "small" means noisy, not tiny) keeps scales well below
    1 instead of being normalised within its group. Float64 reference with per-block
    hyperparameters, rtol 1e-5."""
    shapes = [(16, 16), (32,), (3, 3), (4,)]
    params = make_params(shapes, F32)
    init = [p.detach().clone() for p in params]
    g = torch.Generator().manual_seed(5)
    steps = [
        [1.0 + 0.2 * torch.randn(s, generator=g, dtype=F64) for s in shapes[:2]]
        + [1e-3 * torch.randn(s, generator=g, dtype=F64) for s in shapes[2:]]
        for _ in range(5)
    ]
    groups = [
        dict(params=params[:2], lr=0.1, weight_decay=0.0, momentum=0.9),
        dict(params=params[2:], lr=0.02, weight_decay=0.3, momentum=0.5, eps=1e-4),
    ]
    opt = SGDSaI(groups, lr=1.0, momentum=0.0, weight_decay=0.0, eps=1e-8, **path)
    run_steps(opt, params, steps)
    ref = sgd_sai_reference(
        init,
        steps,
        lr=[0.1, 0.1, 0.02, 0.02],
        weight_decay=[0, 0, 0.3, 0.3],
        momentum=[0.9, 0.9, 0.5, 0.5],
        eps=[1e-8, 1e-8, 1e-4, 1e-4],
    )
    assert_matches_reference(opt, params, ref, F32)
    scales = [opt.state[p]["scale"].item() for p in params]
    assert max(scales[:2]) == pytest.approx(1.0, rel=1e-6)
    assert max(scales[2:]) < 0.5, f"second group normalised within itself? {scales}"


# ---------------------------------------------------------------------------- 9. read-out


def test_gsnr_table_reports_the_state():
    """gsnr_table (method and function) returns one row per param with name, shape, numel, gsnr,
    scale, degenerate, initialised; scales of initialised rows are in (0, 1] under "max" and
    equal the optimizer state; an uninitialised param is reported as such."""
    torch.manual_seed(0)
    model = WithScalar()
    model.unused = nn.Linear(3, 3)  # never gets a gradient
    opt = SGDSaI(model.parameters(), lr=0.05)
    with_scalar_grads(model, 0)
    opt.step()
    names = {p: n for n, p in model.named_parameters()}
    required = {"name", "shape", "numel", "gsnr", "scale", "degenerate", "initialised"}

    rows = opt.gsnr_table(names)
    rows_fn = gsnr_table(opt, list(model.named_parameters()))
    assert sorted(r["name"] for r in rows_fn) == sorted(r["name"] for r in rows)
    assert sorted(r["name"] for r in rows) == sorted(names.values())
    by_name = {n: p for n, p in model.named_parameters()}
    for table in (rows, rows_fn):
        for row in table:
            assert required <= row.keys()
            p = by_name[row["name"]]
            assert tuple(row["shape"]) == tuple(p.shape) and row["numel"] == p.numel()
            init = row["name"] not in ("unused.weight", "unused.bias")
            assert bool(row["initialised"]) == init == is_initialised(opt, p)
            if not init:
                continue
            st = opt.state[p]
            assert 0.0 < row["scale"] <= 1.0
            assert row["scale"] == pytest.approx(st["scale"].item(), rel=1e-7)
            assert bool(row["degenerate"]) == (row["name"] in ("fc2.bias", "temp"))
            if not row["degenerate"]:
                assert row["gsnr"] == pytest.approx(st["gsnr"].item(), rel=1e-7)
                expected = block_gsnr(p.grad, 1e-8, "max")
                assert row["gsnr"] == pytest.approx(expected, rel=1e-5)
    unnamed = opt.gsnr_table(None)
    assert len(unnamed) == len(names) and all(isinstance(r["name"], str) for r in unnamed)


# ------------------------------------------------------------------------ 10. validation


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(lr=math.nan), "lr"),
        (dict(lr=math.inf), "lr"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(weight_decay=-1e-4), "weight_decay"),
        (dict(eps=-1e-8), "eps"),
        (dict(normalize="foo"), "normalize"),
    ],
)
def test_invalid_arguments_raise_value_error(kwargs, match):
    """Invalid hyperparameters raise ValueError naming the argument (spec: lr > 0 and finite,
    momentum in [0, 1), weight_decay >= 0, eps >= 0, normalize in {"max", "none",
    "sqrt-numel"})."""
    params = make_params([(3, 3)], F32)
    with pytest.raises(ValueError, match=match) as info:
        SGDSaI(params, **kwargs)
    if "normalize" in kwargs:
        assert all(m in str(info.value) for m in ("max", "none", "sqrt-numel")), "list them"


@pytest.mark.parametrize(
    "key,value", [("lr", -0.1), ("momentum", 1.5), ("weight_decay", -1.0), ("eps", -1.0)]
)
def test_invalid_group_hyperparameter_raises(key, value):
    """A param group's own lr / momentum / weight_decay / eps is validated like the defaults."""
    params = make_params([(3, 3), (4,)], F32)
    with pytest.raises(ValueError, match=key):
        SGDSaI([{"params": params[:1]}, {"params": params[1:], key: value}], lr=0.1)


# --------------------------------------------------------------------- 11. foreach on/off


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kw", CASES[:1] + CASES[4:5] + CASES[6:7])
def test_foreach_equals_loop_bitwise(seed, kw):
    """foreach=True and foreach=False give bitwise identical params and state (torch.equal) over
    random shapes and a mix of fp32 / fp64 / bf16 params in one group: both paths do the same
    elementwise ops, so any difference is an inconsistency, not roundoff."""
    g = torch.Generator().manual_seed(100 + seed)
    n = 7
    shapes = []
    for _ in range(n):
        ndim = int(
            torch.randint(1, 5, (), generator=g)
        )  # 1-D .. 4-D, sizes 1..8 (numel 1 possible)
        shapes.append(tuple(torch.randint(1, 9, (ndim,), generator=g).tolist()))
    dtypes = [(F32, F64, BF16)[i % 3] for i in range(n)]
    grads = make_grad_steps(shapes, 6, seed=200 + seed)
    results = []
    for foreach in (False, True):
        params = [
            p.detach().to(dt).requires_grad_()
            for p, dt in zip(make_params(shapes, F64, seed), dtypes, strict=True)
        ]
        opt = SGDSaI(params, foreach=foreach, fused=False, **kw)
        run_steps(opt, params, grads)
        results.append((params, opt))
    (p0, o0), (p1, o1) = results
    for a, b in zip(p0, p1, strict=True):
        assert torch.equal(a, b), f"{tuple(a.shape)} {a.dtype}: foreach differs from the loop"
        assert o0.state[a].keys() == o1.state[b].keys()
        for key, v in o0.state[a].items():
            if isinstance(v, torch.Tensor):
                assert bitwise_equal(v, o1.state[b][key]), f"{tuple(a.shape)} {a.dtype} state {key}"


def test_loading_a_state_saved_under_the_other_normalize_mode_is_refused():
    """normalize travels with the state: raw g-SNR scales ("none") must never be read as
    max-normalised ones (a flag outside the state dict would mix them silently)."""
    params = make_params([(4, 3), (5,)], F32)
    opt = SGDSaI(params, lr=1e-2, normalize="none")
    run_steps(opt, params, make_grad_steps([(4, 3), (5,)], 2))
    with pytest.raises(ValueError, match="normalize='none'"):
        SGDSaI(params, lr=1e-2, normalize="max").load_state_dict(opt.state_dict())


# ------------------------------------------------------------- 12. copies, groups, bad grads


@pytest.mark.parametrize("copy_with", ["deepcopy", "pickle"])
def test_a_copied_optimizer_keeps_its_normalize_mode_and_trains_on(copy_with):
    """Guards the bug where torch's __getstate__ (defaults, state, param_groups only) dropped
    ``normalize``: a deepcopy or unpickled SGDSaI failed its next step and load_state_dict.
    The copy steps exactly like the original (bitwise)."""
    import copy
    import pickle

    shapes = [(4, 3), (5,)]
    params = make_params(shapes, F32)
    opt = SGDSaI(params, lr=1e-2, normalize="none")
    grads = make_grad_steps(shapes, 4)
    run_steps(opt, params, grads[:2])
    twin_params, twin = (
        copy.deepcopy((params, opt))
        if copy_with == "deepcopy"
        else pickle.loads(pickle.dumps((params, opt)))
    )
    assert twin.normalize == "none"
    twin.load_state_dict(opt.state_dict())
    run_steps(opt, params, grads[2:])
    run_steps(twin, twin_params, grads[2:])
    for a, b in zip(params, twin_params, strict=True):
        assert torch.equal(a, b)


def test_a_param_group_with_another_normalize_mode_is_refused():
    """``normalize`` is optimizer-wide (one max over all groups); a group asking for another
    mode used to be accepted and silently ignored."""
    params = make_params([(3, 3), (4,)], F32)
    with pytest.raises(ValueError, match="optimizer-wide"):
        SGDSaI([{"params": params[:1]}, {"params": params[1:], "normalize": "none"}], lr=0.1)
    opt = SGDSaI(params[:1], lr=0.1)
    with pytest.raises(ValueError, match="optimizer-wide"):
        opt.add_param_group({"params": params[1:], "normalize": "none"})
    opt.add_param_group({"params": params[1:], "normalize": "max"})  # the same mode is fine


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("path", PATHS)
def test_a_non_finite_first_gradient_leaves_the_block_untouched_and_fresh(bad, path):
    """Guards NaN * scale 0 = NaN: a fresh block whose first gradient holds a NaN or inf keeps
    its values (weight decay included), gets no scale and does not enter the max. From then on
    it trains exactly (bitwise) as a block whose first gradient was None (the deferred-block
    rule, checked against the float64 reference above)."""
    shapes = [(4, 3), (6,)]
    good = make_grad_steps(shapes, 4, seed=7)
    poisoned = [g.clone() for g in good[0]]
    poisoned[0][1, 2] = bad
    runs = []
    for first in (poisoned, [None, good[0][1]]):
        params = make_params(shapes, F32)
        opt = SGDSaI(params, lr=0.1, momentum=0.9, weight_decay=0.1, **path)
        run_steps(opt, params, [first])
        runs.append((params, opt))
    (params, opt), (deferred, _) = runs
    assert torch.equal(params[0], make_params(shapes, F32)[0]), "the poisoned block moved"
    assert not bool(opt.state[params[0]]["initialised"])
    assert torch.isfinite(opt.state[params[1]]["gsnr_max"])
    for p, q in runs:
        run_steps(q, p, good[1:])
    for a, b in zip(params, deferred, strict=True):
        assert torch.isfinite(a).all() and torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_parameters_on_a_device_other_than_the_current_one_train_as_on_the_cpu():
    """Guards the event recorded on the current device's stream: with the parameters on
    cuda:1 and cuda:0 current, the host could read the first step's flags before the copy
    landed and initialise a block twice. The run must equal the CPU run (rtol 1e-5) and the
    host view of the scales must equal the state's."""
    shapes = [(64, 32), (32,), (8, 8)]
    grads = make_grad_steps(shapes, 5)
    results = []
    for device in ("cpu", "cuda:1"):
        params = [p.detach().to(device).requires_grad_() for p in make_params(shapes, F32)]
        opt = SGDSaI(params, lr=0.1, momentum=0.9, weight_decay=0.01)
        with torch.cuda.device(0):
            for step in grads:
                for p, g in zip(params, step, strict=True):
                    p.grad = g.to(device, F32)
                opt.step()
        opt._drain_in_flight()
        assert {p: float(opt.state[p]["scale"]) for p in params} == opt._scales
        results.append([p.detach().cpu() for p in params])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- 13. the fused CPU update


@NO_KERNEL
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kw", [CASES[0], CASES[1], CASES[2], CASES[6]])
def test_fused_update_equals_foreach_to_rounding(kw, dtype):
    """The one-pass C++ kernel (optim/csrc/sgd_sai_cpu.cpp) against the foreach path over ten
    steps, with tensors below and above its parallel grain (32768 elements) and one element.
    Not bitwise: the compiler may contract p * decay - step * m into one FMA, and the g-SNR
    sums run in float64 in another order, which can move a scale (fp32 state) by one fp32 ulp
    (6e-8 relative): rtol 1e-5 for fp32, 1e-6 for fp64 (and the g-SNRs themselves to 1e-6)."""
    shapes = [(3, 5), (1,), (70000,), (256, 160), (4,)]
    grads = make_grad_steps(shapes, 10, seed=11)
    results = []
    for path in (dict(fused=False), dict(fused=True)):
        params = make_params(shapes, dtype)
        opt = SGDSaI(params, **path, **kw)
        run_steps(opt, params, grads)
        results.append((params, opt))
    (p_ref, o_ref), (p_fused, o_fused) = results
    # fp64 atol: one fp32 ulp of a scale (6e-8) over ten steps of ~lr |m| ~ 1e-2 each
    rtol, atol = (1e-5, 1e-7) if dtype == F32 else (1e-6, 1e-8)
    for a, b in zip(p_fused, p_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        for key in ("gsnr", "scale"):
            torch.testing.assert_close(
                o_fused.state[a][key], o_ref.state[b][key], rtol=1e-6, atol=0
            )
        assert bool(o_fused.state[a]["degenerate"]) == bool(o_ref.state[b]["degenerate"])
        if "momentum_buffer" in o_ref.state[b]:
            torch.testing.assert_close(
                o_fused.state[a]["momentum_buffer"], o_ref.state[b]["momentum_buffer"],
                rtol=rtol, atol=atol,
            )  # fmt: skip


@NO_KERNEL
def test_fused_update_leaves_non_contiguous_gradients_to_foreach():
    """A gradient the kernel cannot stream (a transposed view) takes the foreach path: the run
    is then bitwise the foreach run."""
    shapes = [(8, 6), (6, 8)]
    grads = make_grad_steps(shapes, 4)
    grads = [[g[0].t().contiguous().t(), g[1]] for g in grads]  # (8, 6) with strides of (6, 8)^T
    assert not grads[0][0].is_contiguous()
    results = []
    for path in (dict(fused=False), dict(fused=True)):
        params = make_params(shapes, F32)
        opt = SGDSaI(params, lr=0.1, **path)
        for step in grads:
            for p, g in zip(params, step, strict=True):
                p.grad = g.to(F32)  # keeps the strides
            opt.step()
        results.append(params)
    assert torch.equal(results[0][0], results[1][0])


@pytest.mark.skipif(
    shutil.which("c++") is None or not fused.enabled(),
    reason="no C++ compiler on this machine, or SAI_FUSED=0",
)
def test_the_fused_kernel_builds_where_a_compiler_is():
    """With a compiler (and ninja, a dependency) the fused update must build: otherwise every
    "fused" case above is skipped and the foreach fallback runs silently."""
    assert fused.cpu_kernel() is not None, fused.failure()


@NO_KERNEL
def test_the_fused_path_really_runs_the_kernel(monkeypatch):
    """Guards a silent fallback: the "fused" cases would pass on the foreach path too. Both
    kernel entry points are called: once for the g-SNR step, then every steady step."""
    kernel = fused.cpu_kernel()
    calls = {"gsnr_stats": 0, "sgd_sai_step_": 0}
    for name in calls:
        original = getattr(kernel, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(kernel, name, counted)
    shapes = [(40, 8), (8,)]
    params = make_params(shapes, F32)
    run_steps(SGDSaI(params, lr=0.1, fused=True), params, make_grad_steps(shapes, 3))
    assert calls == {"gsnr_stats": 1, "sgd_sai_step_": 3}


@NO_KERNEL
def test_fused_group_of_float32_and_float64_tensors():
    """Found in review: the first fused step batched a param group's blocks whatever their
    dtype and the kernel refused the mix. Now each (group, dtype) is its own call, equal to the
    foreach path to rounding."""
    shapes = [(6, 5), (7,)]
    grads = make_grad_steps(shapes, 3)
    results = []
    for path in (dict(fused=False), dict(fused=True)):
        params = [p.to(dt).detach().requires_grad_()
                  for p, dt in zip(make_params(shapes, F64), (F32, F64), strict=True)]  # fmt: skip
        run_steps(SGDSaI(params, lr=0.1, weight_decay=0.1, **path), params, grads)
        results.append(params)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
