"""Dropout whose mask costs a quarter of a random number per element on the CPU.

`F.dropout` draws one number from torch's CPU generator per element, about 6 ns each: at the
Multi30k recipe's sizes that was a tenth of a bf16 training step. Here one 64-bit draw over the
whole int64 range gives four uniform 16-bit lanes, so an element is dropped with probability
round(p * 2^16) / 2^16, within 2^-17 of p. The output is x times a mask of 0 and 1 / (1 - p) in
x's dtype, so the backward pass is one multiplication too (`torch.where` and bool tensors take
torch's slow scalar loops on the CPU: a bf16 training step spent a fifth of its time there).
In bf16 the kept scale is rounded to bf16 (1 / 0.9 becomes 1.109), as x itself is, and as
F.dropout's. The mask kept for backward takes x's dtype (2 bytes an element in bf16, a bool 1).
Masks come from torch's generator, so they are seeded and resume like F.dropout's. On other
devices F.dropout is a fused kernel already, and is used as is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return x * keep_mask(x, p)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """0 (probability p) or 1 / (1 - p), in x's shape and dtype."""
    # from=-2^63, to=None: torch's full 64-bit kernel, a plain cast of each draw (an explicit `to`
    # takes a modulo per draw, 2x the time).
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_(-(2**63), None)
    lanes = words.view(torch.int16)[: x.numel()].view(x.shape)  # uniform over [-2^15, 2^15)
    dropped = min(round(p * 2**16), 2**16 - 1)  # of 2^16 lane values; at 2^16 the int16 threshold would wrap
    keep = lanes >= dropped - 2**15
    return keep.view(torch.uint8).to(x.dtype).mul_(1 / (1 - p))  # via uint8: bool -> float is a scalar loop


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
