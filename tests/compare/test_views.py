"""compare.views on hand-written run files: smoothing, torn logs, g-SNR grouping, costs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sai_diffusion.compare import views
from sai_diffusion.compare.views import BlockKey
from sai_diffusion.files.lora_files import lora_numel


def test_ema_is_debiased_like_tensorboard():
    """A constant series stays constant from the first point (no pull towards 0)."""
    assert views.ema([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])
    assert views.ema([1.0, 3.0], 0.0) == [1.0, 3.0]
    # second point: (0.9 * 0.1 * 1 + 0.1 * 3) / (1 - 0.81)
    assert views.ema([1.0, 3.0], 0.9)[1] == pytest.approx((0.09 + 0.3) / 0.19)
    with pytest.raises(ValueError):
        views.ema([1.0], 1.0)


def test_metrics_survive_a_torn_last_line(tmp_path: Path):
    """A run still writing metrics.jsonl: the half line is skipped, steps come out sorted."""
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 2, "loss": 0.5, "step_time": 0.2}\n'
        '{"step": 1, "loss": 0.7, "step_time": 0.4}\n'
        "[1, 2]\n"
        '{"step": 3, "loss": 0.'
    )
    curve = views.loss_curve(tmp_path, smoothing=0.0)
    assert curve.steps == [1, 2] and curve.loss == [0.7, 0.5] == curve.smoothed
    assert views.loss_curve(tmp_path / "missing").steps == []


@pytest.mark.parametrize(
    ("name", "key"),
    [
        (
            "unet.up_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.lora_B.default.weight",
            BlockKey("up_blocks.2", "attn2", "k", "B"),
        ),
        (
            "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0.lora_A.default.weight",
            BlockKey("mid_block", "attn1", "out", "A"),
        ),
        (
            "text_encoder.text_model.encoder.layers.11.self_attn.v_proj.lora_A.default.weight",
            BlockKey("text_encoder.layers.11", "self_attn", "v", "A"),
        ),
        (
            "unet.down_blocks.1.attentions.0.proj_in.lora.down.weight",
            BlockKey("down_blocks.1", "", "proj_in", "A"),
        ),
        ("text_encoder.text_model.embeddings.token_embedding.vectors", BlockKey("token embedding", "", "", "")),
    ],
)  # fmt: skip
def test_block_key_names_unet_block_attention_projection_and_factor(name, key):
    assert views.block_key(name) == key


def _row(name: str, scale: float | None) -> dict:
    return {"name": name, "initialised": scale is not None, "scale": scale, "numel": 8}


def test_gsnr_groups_in_unet_order_with_range_and_untrained_count():
    """Blocks come down -> mid -> up; a group's bar is the mean with min/max whiskers; a
    tensor that never got a gradient is counted, not plotted."""
    t = "attentions.{}.transformer_blocks.0.attn1.to_q.lora_A.default.weight"
    rows = [
        _row("unet.up_blocks.1." + t.format(0), 0.2),
        _row("unet.down_blocks.0." + t.format(0), 0.1),
        _row("unet.down_blocks.0." + t.format(1), 0.3),
        _row("unet.mid_block." + t.format(0), 1.0),
        _row("unet.mid_block." + t.format(1), None),
    ]
    groups, missing = views.gsnr_by_block(rows)
    assert [g.key.block for g in groups] == ["down_blocks.0", "mid_block", "up_blocks.1"]
    down = groups[0]
    assert (down.mean, down.low, down.high, down.count) == (pytest.approx(0.2), 0.1, 0.3, 2)
    assert missing == 1


def test_state_bytes_measured_or_estimated(tmp_path: Path):
    """The newest checkpoint's optimizer state is measured; without one, buffers x LoRA size x 4;
    step time and memory come from metrics.jsonl."""
    run = tmp_path / "run"
    run.mkdir()
    save_file({"a": torch.zeros(4, 8), "b": torch.zeros(8, 4)}, str(run / "lora.safetensors"))
    assert lora_numel(run) == 64
    est = views.run_cost(run, optimizer="adamw")
    assert (est.state_bytes, est.state_source) == (2 * 64 * 4, "estimate")
    assert views.run_cost(run, optimizer="sgd-sai").state_bytes == 64 * 4
    assert views.run_cost(run).state_source == ""

    ckpt = run / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    shared = torch.zeros(())  # one tensor shared by two parameters' state counts once
    state = {0: {"exp_avg": torch.zeros(10), "m": shared}, 1: {"m": shared}}
    torch.save({"state": state, "param_groups": []}, ckpt / "optimizer.pt")
    measured = views.run_cost(run, optimizer="adamw")
    assert (measured.state_bytes, measured.state_source) == (10 * 4 + 4, "checkpoint")

    newer = run / "checkpoints" / "step-000004"
    newer.mkdir()
    torch.save({"state": {0: {"m": torch.zeros(3)}}, "param_groups": []}, newer / "optimizer.pt")
    assert views.run_cost(run).state_bytes == 3 * 4  # the newest checkpoint counts

    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "step_time": 0.3, "data_wait": 0.02, "peak_mem_mb": 10})
        + "\n"
        + json.dumps({"step": 2, "step_time": 0.1, "data_wait": 0.04, "peak_mem_mb": 12})
        + "\n"
    )
    cost = views.run_cost(run, optimizer="adamw")
    assert cost.steps_logged == 2
    assert cost.median_step_time == pytest.approx(0.2) and cost.peak_mem_mb == 12
    assert cost.median_data_wait == pytest.approx(0.03)
    assert views.format_bytes(3 * 2**20) == "3.0 MiB" and views.format_bytes(None) == "–"
