"""SGD-SaI's third scale rule, normalize="sqrt-numel" (the trainer's ``sai_scale=sqrt-numel``),
and the trainer's ``sai_scale`` reaching SGDSaI.

The rule is the authors' later one: github.com/AnonymousAlethiometer/SGD_SaI, branch
v1.1.0-nightly, commit 6c13d903414379de7ee61681112259a4b920b6cd, ``sgd_sai/sgd_sai.py``, whose
``warmup_step`` sets ``param_state['gsnr'] = d_p.numel() ** 0.5`` in place of the g-SNR, and whose
``step`` steps by ``lr * param_state['gsnr']`` (raw: no max, no eps). The branch is not on PyPI,
so ``sgd_sai_v110`` below transcribes its update line by line, in float64.

The float64 reference (reference.py, normalize="sqrt-numel") runs through every numerical test
of test_sgd_sai.py (the paths, dtypes, LoRA deferral, the state_dict round trip); this file
checks it and the optimizer against the branch, and the rule's own points. Tolerances as in
test_sgd_sai.py: fp32 parameters rtol 1e-5, atol 1e-6; the reference against the
transcription, both float64, atol 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch

from sai_diffusion.optim import SAI_SCALES, SGDSaI

from .reference import sgd_sai_reference
from .test_sgd_sai import (
    F32,
    F64,
    PATHS,
    SHAPES,
    make_grad_steps,
    make_params,
    quiet,
    run_steps,
)

HP = dict(lr=2e-3, momentum=0.9, weight_decay=0.1)


def sgd_sai_v110(params, grad_steps, *, lr, momentum, weight_decay):
    """``SGD_sai`` of the v1.1.0 branch over ``grad_steps``, transcribed (float64): on the first
    step every block with a gradient gets gsnr = numel ** 0.5 (``warmup_step``); every step,
    buf = g on a block's first step, else buf * momentum + g * (1 - momentum), and
    p <- p * (1 - weight_decay * lr) - lr * gsnr * buf. (The branch needs momentum > 0: with 0
    its ``buf`` is undefined.)"""
    theta = [p.detach().to(F64).clone() for p in params]
    gsnr: dict[int, float] = {}
    buf: dict[int, torch.Tensor] = {}
    for step, grads in enumerate(grad_steps):
        if step == 0:  # has_warmup is False only on the first step
            for i, g in enumerate(grads):
                if g is not None:
                    gsnr[i] = g.numel() ** 0.5
        for i, g in enumerate(grads):
            if g is None:
                continue
            g = g.to(F64)
            buf[i] = g.clone() if i not in buf else buf[i] * momentum + g * (1 - momentum)
            theta[i] = theta[i] * (1 - weight_decay * lr) - lr * gsnr[i] * buf[i]
    return theta


def grads_with_degenerate_blocks(shapes, steps):
    """make_grad_steps, plus a one-element block and a block whose first gradient is constant
    (variance 0: "degenerate" under the g-SNR rules, sqrt(numel) here like any other)."""
    grads = make_grad_steps(shapes, steps)
    gen = torch.Generator().manual_seed(7)
    for i, step in enumerate(grads):
        step.append(torch.tensor([0.3 + 0.1 * i], dtype=F64))
        constant = torch.full((12,), -0.2, dtype=F64)
        step.append(constant if i == 0 else torch.randn(12, generator=gen, dtype=F64))
    return grads


SHAPES_ALL = [*SHAPES, (1,), (12,)]


def test_reference_matches_the_v110_branch():
    """Guards the oracle: reference.py under "sqrt-numel" equals the branch's update in float64
    (atol 1e-12) where the two agree, i.e. every block's first gradient is non-zero."""
    params = make_params(SHAPES_ALL, F64)
    grads = grads_with_degenerate_blocks(SHAPES, 6)
    ref = sgd_sai_reference(params, grads, normalize="sqrt-numel", **HP)
    theirs = sgd_sai_v110(params, grads, **HP)
    assert ref.scale == [math.sqrt(math.prod(s)) for s in SHAPES_ALL]
    for r, t in zip(ref.params, theirs, strict=True):
        torch.testing.assert_close(r, t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("path", PATHS)
def test_sqrt_numel_reproduces_the_v110_branch(path):
    """SGDSaI(normalize="sqrt-numel") on each update path (loop, foreach, fused CPU kernel)
    equals the branch's update over eight steps, a one-element block and a zero-variance
    first gradient included: fp32 params rtol 1e-5, atol 1e-6."""
    params = make_params(SHAPES_ALL, F32)
    init = [p.detach().clone() for p in params]
    grads = grads_with_degenerate_blocks(SHAPES, 8)
    opt = SGDSaI(params, normalize="sqrt-numel", **path, **HP)
    run_steps(opt, params, grads)
    theirs = sgd_sai_v110(init, [[g.to(F32) for g in step] for step in grads], **HP)
    for i, (p, t) in enumerate(zip(params, theirs, strict=True)):
        torch.testing.assert_close(p.detach().to(F64), t, rtol=1e-5, atol=1e-6, msg=f"block {i}")


@pytest.mark.parametrize("path", PATHS)
def test_sqrt_numel_scale_is_the_size_whatever_the_gradient_and_eps(path):
    """Every block's scale and g-SNR is fp32(sqrt(numel)) exactly, whatever its gradient (the
    gradients times 1e-6 or 1e3 give the same) and eps; no block is degenerate (one element:
    sqrt(1) = 1)."""
    tables = []
    for factor, eps in ((1.0, 1e-8), (1e-6, 0.0), (1e3, 0.5)):
        params = make_params(SHAPES_ALL, F32)
        grads = grads_with_degenerate_blocks(SHAPES, 1)
        opt = SGDSaI(params, normalize="sqrt-numel", eps=eps, **path, **HP)
        run_steps(opt, params, [[g * factor for g in grads[0]]])
        for p in params:
            expected = torch.tensor(math.sqrt(p.numel()), dtype=F32)
            assert torch.equal(opt.state[p]["scale"], expected), tuple(p.shape)
            assert torch.equal(opt.state[p]["gsnr"], expected), tuple(p.shape)
            assert not bool(opt.state[p]["degenerate"])
        tables.append([(r["scale"], r["degenerate"], r["initialised"]) for r in opt.gsnr_table()])
    assert tables[0] == tables[1] == tables[2]
    assert tables[0][-2] == (1.0, False, True)  # the one-element block


def test_a_state_saved_under_sqrt_numel_loads_only_into_sqrt_numel():
    """The mode travels with the state: sqrt(numel) scales must not be read as another rule's."""
    params = make_params([(3, 4)], F32)
    opt = SGDSaI(params, normalize="sqrt-numel", **HP)
    run_steps(opt, params, make_grad_steps([(3, 4)], 1))
    for other in ("max", "none"):
        with pytest.raises(ValueError, match="normalize='sqrt-numel'"):
            SGDSaI(params, normalize=other, **HP).load_state_dict(opt.state_dict())
    twin = SGDSaI(params, normalize="sqrt-numel", **HP)
    twin.load_state_dict(opt.state_dict())
    assert twin.state[params[0]]["scale"].item() == pytest.approx(math.sqrt(12))


# ------------------------------------------------------- the trainer's sai_scale -> SGDSaI


def _trainer_optimizer(cfg, params):
    """The optimizer the trainer builds for ``cfg`` over ``params`` (recipe._setup_optimizer)."""
    from sai_diffusion.training import recipe
    from sai_diffusion.training.adapters import Adapters

    adapters = Adapters(token_ids=[], trainable={f"unet.b{i}": p for i, p in enumerate(params)})
    optimizer, _ = recipe._setup_optimizer(cfg, adapters, {"unet": 1e-3}, accelerator=None)
    return optimizer


@pytest.mark.parametrize(
    ("sai_scale", "normalize"),
    [("paper", "max"), ("released", "none"), ("sqrt-numel", "sqrt-numel")],
)
def test_the_trainer_builds_sgd_sai_with_the_chosen_scale_rule(sai_scale, normalize):
    from sai_diffusion import config

    assert SAI_SCALES[sai_scale] == normalize
    cfg, _ = config.resolve("demo", {}, [f"sai_scale={sai_scale}"])
    optimizer = _trainer_optimizer(cfg, make_params([(4, 3)], F32))
    assert isinstance(optimizer, SGDSaI) and optimizer.normalize == normalize
    assert {g["normalize"] for g in optimizer.param_groups} == {normalize}


def test_sai_scale_released_trains_as_sgd_sai_1_0_3():
    """``--set sai_scale=released sai_eps=1e-8``: the trainer's optimizer steps as the released
    sgd-sai 1.0.3 ``SGD_sai`` (same lr, momentum, eps, no decay) over six steps of blocks with
    more than one element (1.0.3 gives a one-element block |g| / 1e-8): rtol 1e-5, atol 1e-6."""
    from sgd_sai import SGD_sai

    from sai_diffusion import config

    cfg, _ = config.resolve("demo", {}, ["sai_scale=released", "sai_eps=1e-8"])
    assert (cfg.optimizer.weight_decay, cfg.optimizer.momentum) == (0.0, 0.9)
    shapes = [(8, 16), (16,), (4, 3, 3, 3), (5, 7)]
    grads = make_grad_steps(shapes, 6)
    ours = make_params(shapes, F32)
    theirs = make_params(shapes, F32)
    run_steps(_trainer_optimizer(cfg, ours), ours, grads)
    with quiet():
        run_steps(SGD_sai(theirs, lr=1e-3, momentum=0.9, eps=1e-8, weight_decay=0.0), theirs, grads)
    for p, q in zip(ours, theirs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
