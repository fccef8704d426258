"""Mix-of-Show's attention regularisation: the concept words' cross-attention outside the
subject mask, penalised.

Every cross-attention layer records its attention probabilities (``models.edlora``'s
processors, ``record``). Layers of one spatial size are averaged over all their heads; for
each word, its map is divided by its largest value in the batch, and the mean of the map over
the latent cells outside the subject mask is the penalty. The penalties of every word and
every spatial size add up (Mix-of-Show's ``cal_attn_reg`` with ``reg_full_identity: false``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from .loss import downsample_mask


def _level_size(latent_hw: tuple[int, int], queries: int) -> tuple[int, int]:
    """The (h, w) grid of the UNet level with ``queries`` cells: each downsampling (a stride-2
    conv, padding 1) takes h to ceil(h / 2), which a non-square grid needs exactly."""
    h, w = latent_hw
    while h * w > queries:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != queries:
        raise ValueError(f"no UNet level of a {latent_hw} latent has {queries} cells")
    return h, w


def word_positions(ids: torch.Tensor, word_ids: list[int]) -> torch.Tensor:
    """(B, W): the first position of each word's token in each row of ``ids`` (B, T), -1 where
    the row lacks it."""
    match = ids.unsqueeze(-1) == torch.tensor(word_ids, device=ids.device)  # (B, T, W)
    first = match.float().argmax(1)  # (B, W)
    return torch.where(match.any(1), first, torch.full_like(first, -1))


def attention_penalty(
    records: list[tuple[int, torch.Tensor]],
    positions: torch.Tensor,
    mask: torch.Tensor,
    latent_hw: tuple[int, int],
) -> torch.Tensor:
    """The summed penalty (a scalar; 0 when no cell lies outside the mask).

    Args:
        records: ``(layer index, probs (B, heads, Q, T))`` of every cross-attention layer.
        positions: (B, W) from ``word_positions``.
        mask: (B, 1, H, W) subject mask in pixels.
        latent_hw: the latent grid (h, w) the UNet ran on.
    """
    by_size: dict[int, list[torch.Tensor]] = defaultdict(list)
    for _, probs in records:
        by_size[probs.shape[2]].append(probs)
    cells = downsample_mask(mask.float(), latent_hw)  # (B, 1, h, w): share inside the mask
    total = positions.new_zeros((), dtype=torch.float32)
    for queries, maps in by_size.items():
        hw = _level_size(latent_hw, queries)
        mean = torch.cat(maps, dim=1).float().mean(1)  # (B, Q, T), over the heads of all layers
        outside = F.interpolate(cells, size=hw, mode="nearest").flatten(1) == 0  # (B, Q)
        for j in range(positions.shape[1]):
            rows = positions[:, j] >= 0
            if not rows.any():
                continue
            index = positions[rows, j].view(-1, 1, 1).expand(-1, queries, 1)
            word_map = mean[rows].gather(2, index).squeeze(2)  # (b, Q)
            word_map = word_map / word_map.max().clamp_min(1e-12)
            out = outside[rows]
            if out.any():
                total = total + word_map[out].mean()
    return total
