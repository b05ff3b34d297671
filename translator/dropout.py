"""Dropout whose mask costs a quarter of a random number per element on the CPU.

`F.dropout` draws one number from torch's CPU generator per element, about 6 ns each: at the
Multi30k recipe's sizes that was a tenth of a bf16 training step. Here one 64-bit draw gives
four 15-bit uniforms (torch's int64 draws leave the top bit 0, so each 16-bit lane keeps its
low 15), so an element is dropped with probability round(p * 2^15) / 2^15, within 2^-16 of p.
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
    words = torch.empty((x.numel() + 3) // 4, dtype=torch.int64).random_()
    uniform = words.view(torch.int16)[: x.numel()].view(x.shape) & 0x7FFF  # 15 random bits an element
    return torch.where(uniform >= round(p * 2**15), x * (1 / (1 - p)), 0)


class Dropout(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
