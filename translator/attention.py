"""Multi-head scaled dot-product attention: one module, three modes.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(head_size)) V       (Vaswani et al., 2017, eq. 1)

Q is what a token looks for, K what each token contains, V what it hands over. The
module never decides where K/V come from; the caller does, and that is the mode:

    encoder self-attention   kv = project_kv(x)                      mask = padding_mask(src)
    decoder self-attention   kv = past.extend(project_kv(x))         mask = causal_mask(T, L)
    cross-attention          kv = project_kv(memory), once a source  mask = padding_mask(src)

Masks are bool, True = may attend. Shapes: B batch, H heads, T queries, L keys,
Dh head size, D = H * Dh model size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class KV(NamedTuple):
    """Per-head keys and values, each (B, H, L, Dh)."""

    k: Tensor
    v: Tensor

    def extend(self, new: KV) -> KV:
        """Append new positions (decoder self-attention grows by one position a step)."""
        return KV(torch.cat([self.k, new.k], dim=2), torch.cat([self.v, new.v], dim=2))

    def select(self, index: Tensor) -> KV:
        """Pick rows of the batch: beam reordering, finished sentences leaving."""
        return KV(self.k.index_select(0, index), self.v.index_select(0, index))


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(B, S) token ids -> (B, 1, 1, S), True where the key is a real token."""
    real = ids != pad_id
    # A row of nothing but padding would softmax over no keys and give NaN; let it see every
    # key instead. Its output is never used, and NaN must not reach shared reductions.
    real = real | ~real.any(dim=-1, keepdim=True)
    return real[:, None, None, :]


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor:
    """(T, L), True where query i may see key j: j <= i + (L - T).

    Bottom-right aligned, so the last query is the newest position whether the keys are
    the same T positions (training) or T new ones after L - T cached ones (decoding).
    SDPA's `is_causal=True` is top-left aligned and would be wrong for the second case.
    """
    return torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)


class MultiHeadAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not a multiple of n_heads={n_heads}")
        self.n_heads, self.head_size = n_heads, d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)  # K and V in one matmul
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _split_heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.n_heads, self.head_size).transpose(1, 2)  # (B, L, D) -> (B, H, L, Dh)

    def project_kv(self, source: Tensor) -> KV:
        """(B, L, D) -> per-head keys and values."""
        k, v = self.kv_proj(source).chunk(2, dim=-1)
        return KV(self._split_heads(k), self._split_heads(v))

    def forward(self, x: Tensor, kv: KV, mask: Tensor | None) -> Tensor:
        """Queries from x (B*G, T, D) attend over kv of B rows under mask (broadcastable to (B, H, G*T, L)) -> (B*G, T, D).

        G is 1 but in beam search, where the G hypotheses of a sentence (consecutive rows)
        share its memory: their queries attend together, as G*T queries of one row, so the
        memory is never copied per hypothesis. The mask then must not depend on the query
        (a padding mask, as cross-attention's is).
        """
        q = self._split_heads(self.q_proj(x))  # (B*G, H, T, Dh)
        rows, H, T, Dh = q.shape
        G = rows // kv.k.size(0)
        q = q.view(-1, G, H, T, Dh).transpose(1, 2).reshape(-1, H, G * T, Dh)  # (B, H, G*T, Dh)
        y = F.scaled_dot_product_attention(
            q, kv.k, kv.v, attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            scale=1.0 / math.sqrt(self.head_size),
        )  # (B, H, G*T, Dh)
        y = y.view(-1, H, G, T, Dh).permute(0, 2, 3, 1, 4).reshape(rows, T, H * Dh)  # heads side by side: (B*G, T, D)
        return self.out_proj(y)
