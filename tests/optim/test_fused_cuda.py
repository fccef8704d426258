"""Tests for sai_diffusion/optim/fused_cuda.py: SGD-SaI's steady step as one Triton kernel.

On the CPU the real kernel runs in Triton's interpreter (``TRITON_INTERPRET=1`` while it is
first built; the ``interpreted`` fixture), driven by SGDSaI itself: the fixture lets CPU blocks
take the Triton path that CUDA blocks take. The first step (g-SNR) is the foreach path's, every
later step the kernel's. Small tensors keep the interpreter fast; the block size is the real one
(1024), and the shapes give one element, a partial block, exactly one block, one block and one
element, and three blocks with a tail, all in one launch.

Oracles and tolerances (the kernel does fp32 math without FMA contraction):
- tests/optim/reference.py, the float64 re-derivation, as in test_sgd_sai.py: fp32 params rtol
  1e-5, atol 1e-6 (a few roundings per step, around 1e-6 relative after five steps); bf16 params
  per tensor in norm, ||p - ref|| / ||ref|| <= 2e-2, since one fp32-vs-fp64 difference can flip
  a rounding (one bf16 ulp = 0.4-0.8 %); fp16 the same at 4e-3 (one fp16 ulp is 0.05-0.1 %);
  the fp32 momentum buffers rtol 1e-5 with an atol of 1e-6 of their largest entry.
- the foreach path: the same fp32 operations. What differs: the step
  coefficient is fp32(lr) * scale rounded on the device rather than lr * scale rounded once
  (one fp32 ulp), and torch's lerp may fuse a multiply-add (the momentum within a few ulps). So
  fp32 params agree to a few ulps of values of order 1, rtol 1e-6 and atol 1e-6; bf16 / fp16
  params are rounded once to nearest even in both, and a flipped rounding is the most that can
  differ: within one ulp of their dtype (rtol 2^-7 bf16, 2^-10 fp16), in at most 1 % of the
  elements (a truncating cast would differ in about half; in practice they are bitwise equal);
  momentum buffers rtol 1e-6, atol 1e-6 of their largest entry.

The GPU tests (marked ``gpu``, one CUDA device) check the compiled kernel against the same
oracles, that the steady step never waits for the device, and one kernel per (group, dtype).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from collections import Counter

import pytest
import torch

from sai_diffusion.optim import SGDSaI, fused_cuda, sgd_sai

from .reference import sgd_sai_reference
from .test_sgd_sai import as_dtype, make_grad_steps, make_params, run_steps

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
DTYPES = [pytest.param(F32, id="fp32"), pytest.param(BF16, id="bf16"), pytest.param(F16, id="fp16")]
NO_TRITON = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (the dev extra installs it on Linux x86-64): the Triton "
    "kernel can neither be interpreted nor compiled",
)
NO_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BLOCK = fused_cuda.BLOCK
SHAPES = [(1,), (3, 5), (BLOCK,), (BLOCK + 1,), (2, 1100)]
# momentum 0.9 and 0.3 take the two branches of torch's lerp (weight below / above 0.5)
CASES = [
    pytest.param(dict(lr=0.1, momentum=0.9, weight_decay=0.1), id="mu0.9-wd"),
    pytest.param(dict(lr=0.1, momentum=0.0), id="mu0"),
    pytest.param(dict(lr=0.1, momentum=0.3, weight_decay=0.01, maximize=True), id="mu0.3-max"),
    # scales of 1 to 47 (sqrt of the blocks' sizes), not <= 1
    pytest.param(
        dict(lr=2e-3, momentum=0.9, weight_decay=0.1, normalize="sqrt-numel"), id="sqrt-numel"
    ),
]
REF_NORM_RTOL = {BF16: 2e-2, F16: 4e-3}
FOREACH_RTOL = {F32: 1e-6, BF16: 2**-7, F16: 2**-10}


@pytest.fixture
def cpu_as_cuda(monkeypatch):
    """SGDSaI treats CPU blocks as it treats CUDA ones: steady steps take the Triton path, and
    the C++ kernel (CPU only) is never used, for the g-SNR step either."""
    monkeypatch.setattr(sgd_sai, "_TRITON_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(sgd_sai, "_fusable", lambda group, p: False)


@pytest.fixture
def interpreted(cpu_as_cuda, monkeypatch):
    """... and the Triton kernel runs in Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert fused_cuda.triton_kernel() is not None, fused_cuda.failure()


@pytest.fixture
def launches(monkeypatch):
    """Counts calls of fused_cuda._launch (one per kernel launch)."""
    calls = []
    original = fused_cuda._launch

    def counted(kernel, table, **kwargs):
        calls.append((table.programs, kwargs["dtype"]))
        return original(kernel, table, **kwargs)

    monkeypatch.setattr(fused_cuda, "_launch", counted)
    return calls


def train(dtype, kw, *, fused, device="cpu", steps=5, shapes=SHAPES):
    params = [p.detach().to(device).requires_grad_() for p in make_params(shapes, dtype)]
    grads = make_grad_steps(shapes, steps)
    opt = SGDSaI(params, fused=fused, **kw)
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.to(device, dtype)
        opt.step()
    return params, opt, grads


def assert_matches_reference(params, opt, grads, dtype, kw):
    init = make_params([tuple(p.shape) for p in params], dtype)
    ref = sgd_sai_reference(
        init, as_dtype(grads, dtype), round_to=None if dtype == F32 else dtype, **kw
    )
    for i, p in enumerate(params):
        actual, expected = p.detach().cpu().to(F64), ref.params[i]
        if dtype == F32:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=f"block {i}")
        else:
            err = ((actual - expected).norm() / expected.norm()).item()
            assert err <= REF_NORM_RTOL[dtype], f"block {i}: relative error {err:.3g}"
        if kw.get("momentum", 0.9) != 0:
            m = ref.momentum[i]
            torch.testing.assert_close(
                opt.state[p]["momentum_buffer"].cpu().to(F64), m,
                rtol=1e-5, atol=1e-6 * m.abs().max().item(), msg=f"block {i}: momentum",
            )  # fmt: skip


def assert_matches_foreach(kernel_run, foreach_run, dtype):
    (params, opt, _), (twins, twin_opt, _) = kernel_run, foreach_run
    for p, q in zip(params, twins, strict=True):
        assert p.dtype == dtype
        torch.testing.assert_close(
            p.detach().cpu().to(F64), q.detach().cpu().to(F64),
            rtol=FOREACH_RTOL[dtype], atol=1e-6 if dtype == F32 else 0,
        )  # fmt: skip
        if "momentum_buffer" in twin_opt.state[q]:
            m, n = opt.state[p]["momentum_buffer"], twin_opt.state[q]["momentum_buffer"]
            assert m.dtype == F32
            torch.testing.assert_close(
                m.cpu(), n.cpu(), rtol=1e-6, atol=1e-6 * n.abs().max().item()
            )
    if dtype != F32:  # flipped roundings are rare; a cast that truncated would differ in ~half
        differ = sum(int((p != q).sum()) for p, q in zip(params, twins, strict=True))
        assert differ <= 0.01 * sum(p.numel() for p in params), "not rounded to nearest even"


# ---------------------------------------------------------------- the kernel, interpreted


@NO_TRITON
@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_interpreted_kernel_matches_reference_and_foreach(interpreted, launches, dtype, kw):
    """Five steps over blocks of 1, 15, 1024, 1025 and 2200 elements, in one launch per step:
    the Triton kernel equals the float64 reference and the foreach path (tolerances: module
    docstring)."""
    run = train(dtype, kw, fused=True)
    assert len(launches) == 4, "steps 2-5 are the kernel's, one launch each"
    assert launches[0][0] == 1 + 1 + 1 + 2 + 3  # programs: one per started block
    assert_matches_reference(*run, dtype, kw)
    assert_matches_foreach(run, train(dtype, kw, fused=False), dtype)


@NO_TRITON
def test_one_launch_per_param_group_and_dtype(interpreted, launches):
    """Two param groups, one with fp32 and bf16 blocks and one with fp32 and fp16 blocks:
    four launches per steady step, none on the g-SNR step; fused=False launches nothing."""
    shapes = [(4, 6), (7,), (3,)]
    steps = make_grad_steps(shapes * 2, 3)

    def run(fused):
        params = [
            p.detach().to(dtype).requires_grad_()
            for p, dtype in zip(
                make_params(shapes * 2, F32), [F32, BF16, F32, F32, F16, F16], strict=True
            )
        ]
        groups = [{"params": params[:3]}, {"params": params[3:], "lr": 0.05}]
        run_steps(SGDSaI(groups, lr=0.1, weight_decay=0.1, fused=fused), params, steps)

    run(fused=True)
    assert Counter(dtype for _, dtype in launches) == Counter([F32, BF16, F32, F16] * 2)
    launches.clear()
    run(fused=False)
    assert launches == []


@NO_TRITON
def test_blocks_the_kernel_cannot_stream_take_the_foreach_path(interpreted, launches):
    """A transposed (non-contiguous) gradient and an fp64 block leave the kernel for foreach;
    the other blocks still go in one launch, and every block ends as on the foreach path."""
    shapes = [(8, 6), (6, 8), (5,)]
    steps = make_grad_steps(shapes, 3)
    results = []
    for fused in (True, False):
        params = [
            p.detach().to(dtype).requires_grad_()
            for p, dtype in zip(make_params(shapes, F64), [F32, F32, F64], strict=True)
        ]
        opt = SGDSaI(params, lr=0.1, fused=fused)
        for step in steps:
            params[0].grad = step[0].t().contiguous().t().to(F32)  # strides of a transpose
            params[1].grad, params[2].grad = step[1].to(F32), step[2]
            opt.step()
        results.append(params)
    assert not params[0].grad.is_contiguous()
    assert [programs for programs, _ in launches] == [1, 1], "only the (6, 8) block, per step"
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


class StandInDriver:
    """What triton's launcher asks a GPU driver before it compiles: device, stream, target."""

    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_current_device(self) -> int:
        return self.arch  # one device per architecture: triton caches the target per device

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)


@NO_TRITON
@pytest.mark.parametrize("arch", [80, 90])
def test_the_launch_compiles_for_the_gpu_with_vector_accesses(arch, monkeypatch, tmp_path):
    """What the interpreter cannot show: step_'s launch, through triton's own binder and
    compiler and ptxas (warm-up only, for a stand-in sm_80 / sm_90 driver: no GPU needed),
    compiles every variant to a cubin, and a full block of aligned fp32 tensors moves p, g and
    m with 16-byte loads and stores."""
    import triton

    monkeypatch.setattr(fused_cuda, "_kernels", {})  # a compiled kernel of its own
    monkeypatch.setattr(fused_cuda, "_launched", set())
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # not the home folder's cache
    monkeypatch.setattr(triton.runtime.driver, "_active", StandInDriver(arch))
    kernel = fused_cuda.triton_kernel()
    assert isinstance(kernel, triton.runtime.JITFunction), fused_cuda.failure()
    compiled = []

    def warm_up(*args, grid, warmup, **kwargs):
        compiled.append(
            triton.runtime.JITFunction.run(kernel, *args, grid=grid, warmup=True, **kwargs)
        )

    monkeypatch.setattr(kernel, "run", warm_up)
    shapes = [(2, BLOCK), (5,)]
    for dtype in (F32, BF16, F16):
        for momentum, maximize in ((0.9, False), (0.0, True)):
            params = [torch.zeros(s, dtype=dtype) for s in shapes]
            moms = [torch.zeros(s) for s in shapes] if momentum else None
            assert fused_cuda.step_(
                fused_cuda.Table(), params, [torch.zeros_like(p) for p in params], moms, [1.0, 1.0],
                lr=0.1, momentum=momentum, decay=0.99, maximize=maximize,
            ), fused_cuda.failure()  # fmt: skip
    assert len(compiled) == 6 and all(c.asm["cubin"] for c in compiled)
    ptx = compiled[0].asm["ptx"]  # fp32 with momentum: 8 elements a thread, 2 x 16 B per tensor
    assert ptx.count("ld.global.v4.b32") == 2 * 3 and ptx.count("st.global.v4.b32") == 2 * 2


# ------------------------------------------------------------------- host side, no triton


def test_the_table_is_rebuilt_only_when_an_address_changes():
    """The device table is kept while the addresses, sizes and scales are those of the last
    step (no copy at all), and rebuilt when a gradient comes back somewhere else."""
    params = [torch.zeros(5), torch.zeros(BLOCK + 3)]
    grads = [torch.ones(5), torch.ones(BLOCK + 3)]
    moms = [torch.zeros(5), torch.zeros(BLOCK + 3)]
    table = fused_cuda.Table()
    table.refresh(params, grads, moms, [0.5, 1.0])
    rows = table.rows
    assert table.programs == 3
    assert table.rows.view(-1, 5)[:, 4].view(F64).tolist() == [0.5, 1.0]
    assert table.work.view(-1, 2).tolist() == [[0, 0], [1, 0], [1, BLOCK]]
    table.refresh(params, grads, moms, [0.5, 1.0])
    assert table.rows is rows, "same addresses: the table is reused"
    table.refresh(params, [torch.ones(5), grads[1]], moms, [0.5, 1.0])
    assert table.rows is not rows
    assert table.rows.view(-1, 5)[0, 1].item() != rows.view(-1, 5)[0, 1].item()


def test_without_triton_none_falls_back_with_one_warning_and_true_raises(cpu_as_cuda, monkeypatch):
    """Where triton cannot be imported, fused=None trains on the foreach path (bitwise the
    fused=False run) after one warning, and fused=True raises, saying why."""

    def no_triton():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(fused_cuda, "_kernels", {})
    monkeypatch.setattr(fused_cuda, "_failure", None)
    monkeypatch.setattr(fused_cuda, "_build", no_triton)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
    with pytest.warns(RuntimeWarning, match="fused CUDA update cannot run.*triton") as caught:
        params, _, _ = train(F32, kw, fused=None, steps=3, shapes=[(4, 5), (3,)])
    assert len([w for w in caught if "fused CUDA" in str(w.message)]) == 1
    twins, _, _ = train(F32, kw, fused=False, steps=3, shapes=[(4, 5), (3,)])
    assert all(torch.equal(a, b) for a, b in zip(params, twins, strict=True))
    with pytest.raises(RuntimeError, match=r"fused=True.*No module named 'triton'"):
        train(F32, kw, fused=True, steps=2, shapes=[(4, 5)])


def test_importing_the_package_does_not_import_triton():
    """triton is optional and heavy: the optimizer, and so the trainer, import without it."""
    code = "import sys, sai_diffusion.optim.sgd_sai; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------ on a GPU


def cuda_kernel_or_skip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fused_cuda.triton_kernel() is None:
            pytest.skip(fused_cuda.failure())


@pytest.mark.gpu
@NO_CUDA
@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_kernel_matches_reference_and_foreach(dtype, kw, launches):
    """The compiled kernel on CUDA, with blocks below, at and above the block size and one of
    70000 elements (69 programs): equal to the float64 reference and the CUDA foreach path
    (tolerances: module docstring)."""
    cuda_kernel_or_skip()
    shapes = [*SHAPES, (70000,), (256, 160)]
    run = train(dtype, kw, fused=True, device="cuda", shapes=shapes)
    assert len(launches) == 4
    assert_matches_reference(*run, dtype, kw)
    assert_matches_foreach(run, train(dtype, kw, fused=False, device="cuda", shapes=shapes), dtype)


def cuda_groups(dtypes=(F32, BF16)):
    """Two param groups of fp32 and bf16 blocks on CUDA, after their g-SNR step."""
    shapes = [(64, 32), (32,), (8, 8), (1,)]
    params = [
        p.detach().to("cuda", dtype).requires_grad_()
        for dtype in dtypes
        for p in make_params(shapes, F32)
    ]
    groups = [{"params": params[::2]}, {"params": params[1::2], "weight_decay": 0.0}]
    opt = SGDSaI(groups, lr=0.1, momentum=0.9, weight_decay=0.1, fused=True)
    return params, opt


@pytest.mark.gpu
@NO_CUDA
def test_cuda_steady_step_never_waits_for_the_device():
    """torch.cuda.set_sync_debug_mode("error") around steady steps whose gradients are new
    tensors every step (as after zero_grad(set_to_none=True)): building and copying the
    table, and the launch, never synchronise."""
    cuda_kernel_or_skip()
    params, opt = cuda_groups()
    fresh = [[torch.randn_like(p) for p in params] for _ in range(6)]
    for k in range(2):  # the g-SNR step; the next one reads its flags (one wait, by design)
        for p, g in zip(params, fresh[k], strict=True):
            p.grad = g
        opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for k in range(2, 6):
            for p, g in zip(params, fresh[k], strict=True):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.gpu
@NO_CUDA
def test_cuda_one_kernel_per_group_and_dtype():
    """The profiler sees four sgd_sai_kernel launches per steady step (two groups x fp32 and
    bf16) and no foreach kernel: no block fell back."""
    cuda_kernel_or_skip()
    params, opt = cuda_groups()
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            opt.step()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("sgd_sai_kernel" in n for n in names) == 3 * 4, names
    assert not any("multi_tensor_apply" in n for n in names), names
