"""Multi-head scaled dot-product attention: one module, three modes.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(head_size)) V       (Vaswani et al., 2017, eq. 1)

Q is what a token looks for, K what each token contains, V what it hands over. The
module never decides where K/V come from; the caller does, and that is the mode:

    encoder self-attention   kv = project_kv(x)                      mask = padding_mask(src)
    decoder self-attention   kv = past.append(project_kv(x)).kv      mask = causal_mask(T, L)
    cross-attention          kv = project_kv(memory), once a source  mask = padding_mask(src)

Masks are bool, True = may attend. Shapes: B batch, H heads, T queries, L keys,
Dh head size, D = H * Dh model size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dropout import dropout


class KV(NamedTuple):
    """Per-head keys and values, each (B, H, L, Dh)."""

    k: Tensor
    v: Tensor

    def select(self, index: Tensor) -> KV:
        """Pick rows of the batch: beam reordering, finished sentences leaving."""
        return KV(self.k.index_select(0, index), self.v.index_select(0, index))


@dataclass(frozen=True)
class KVCache:
    """Decoder self-attention K/V that grow by a few positions a step.

    They live in buffers with room to spare that double when full (as a Python list does),
    so appending costs the new positions only, at position 256 as at 16, where a torch.cat
    would copy the whole past every step. Only the cache at the buffer's end writes into
    it in place; appending to an older one (decoding twice from the same state) copies.
    """

    buffers: KV  # (B, H, capacity, Dh) each; positions past `length` are free room
    length: int
    _end: list[int] = field(default_factory=list, repr=False, compare=False)  # shared by caches of one buffer

    @classmethod
    def of(cls, kv: KV) -> KVCache:
        return cls(kv, kv.k.size(2), [kv.k.size(2)])

    @property
    def kv(self) -> KV:
        return KV(self.buffers.k[:, :, : self.length], self.buffers.v[:, :, : self.length])

    def append(self, new: KV) -> KVCache:
        length = self.length + new.k.size(2)
        buffers, end = self.buffers, self._end
        if length > buffers.k.size(2) or end != [self.length]:
            B, H, _, Dh = new.k.shape
            empty = new.k.new_empty(B, H, max(2 * self.length, length, 16), Dh)
            buffers, end = KV(empty, torch.empty_like(empty)), [self.length]
            buffers.k[:, :, : self.length], buffers.v[:, :, : self.length] = self.kv
        buffers.k[:, :, self.length : length], buffers.v[:, :, self.length : length] = new
        end[0] = length
        return KVCache(buffers, length, end)

    def select(self, index: Tensor) -> KVCache:
        """Pick rows (beam reordering, rows leaving). Only the filled positions are copied,
        into buffers with room for one more step: beam search appends once between selects.
        Decoding runs without gradients, and so does this copy (autograd refuses `out=`)."""
        buffers = []
        for past in self.kv:
            B, H, L, Dh = index.numel(), past.size(1), self.length, past.size(3)
            buffer = past.new_empty(B, H, L + 1, Dh)
            torch.index_select(past, 0, index, out=buffer[:, :, :L])
            buffers.append(buffer)
        return KVCache(KV(*buffers), self.length, [self.length])


def padding_mask(ids: Tensor, pad_id: int) -> Tensor:
    """(B, S) token ids -> (B, 1, 1, S), True where the key is a real token."""
    real = ids != pad_id
    # A row of nothing but padding would softmax over no keys and give NaN; let it see every
    # key instead. Its output is never used, and NaN must not reach shared reductions.
    real = real | ~real.any(dim=-1, keepdim=True)
    return real[:, None, None, :]


def causal_mask(q_len: int, k_len: int, device: torch.device | None = None) -> Tensor | None:
    """(T, L), True where query i may see key j: j <= i + (L - T); None for one query (T = 1), which sees every key.

    Bottom-right aligned, so the last query is the newest position whether the keys are
    the same T positions (training) or T new ones after L - T cached ones (decoding).
    SDPA's `is_causal=True` is top-left aligned and would be wrong for the second case.
    A decoding step's one query needs no mask at all, and skipping it saves a pass over its scores.
    The only (T, L) mask: a square one goes to torch's fused kernel as `is_causal` (fused_attention).
    """
    if q_len == 1:
        return None
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
        # Contiguous once here, or every matmul over them would copy them again (decoding: every step).
        return KV(self._split_heads(k).contiguous(), self._split_heads(v).contiguous())

    def forward(self, x: Tensor, kv: KV, mask: Tensor | None) -> Tensor:
        """Queries from x (B*G, T, D) attend over kv of B rows under mask (broadcastable to (B, H, G*T, L)) -> (B*G, T, D).

        G is 1 but in beam search, where the G hypotheses of a sentence (consecutive rows)
        share its memory: their queries attend together, as G*T queries of one row, so the
        memory is never copied per hypothesis. The mask then must not depend on the query
        (a padding mask, as cross-attention's is).
        """
        rows, T, _ = x.shape
        H, Dh = self.n_heads, self.head_size
        y = self._attend(self._queries(x, kv), kv, mask)  # (B, H, G*T, Dh)
        G = rows // kv.k.size(0)
        y = y.view(-1, H, G, T, Dh).permute(0, 2, 3, 1, 4).reshape(rows, T, H * Dh)  # heads side by side: (B*G, T, D)
        return self.out_proj(y)

    def weights(self, x: Tensor, kv: KV, mask: Tensor | None) -> Tensor:
        """The attention weights `forward(x, kv, mask)` applies, dropout aside: (B, H, G*T, L).

        For inspection (`attention_maps.capture_attention`): computed again from the same inputs,
        written out on every device, so forward keeps its fused GPU kernel and pays nothing."""
        return self._weights(self._queries(x, kv), kv, mask)

    def _queries(self, x: Tensor, kv: KV) -> Tensor:
        """(B*G, T, D) -> (B, H, G*T, Dh): the G query rows sharing one row of kv side by side."""
        q = self._split_heads(self.q_proj(x))  # (B*G, H, T, Dh)
        rows, H, T, Dh = q.shape
        G = rows // kv.k.size(0)
        return q.view(-1, G, H, T, Dh).transpose(1, 2).reshape(-1, H, G * T, Dh)

    def _weights(self, q: Tensor, kv: KV, mask: Tensor | None) -> Tensor:
        """softmax(Q K^T / sqrt(Dh)) under mask: (B, H, T, L)."""
        # In place: the scores are this function's own, and no backward needs them before the softmax.
        scores = (q @ kv.k.transpose(-2, -1)).div_(math.sqrt(self.head_size))  # (B, H, T, L)
        if mask is not None:
            scores.masked_fill_(~mask, float("-inf"))
        return scores.softmax(dim=-1)

    def _attend(self, q: Tensor, kv: KV, mask: Tensor | None) -> Tensor:
        """softmax(Q K^T / sqrt(Dh)) V: (B, H, T, Dh) queries over (B, H, L, Dh) keys and values."""
        if q.is_cuda:  # fused kernels (flash / memory-efficient attention) on GPUs
            return fused_attention(q, kv, mask, self.dropout if self.training else 0.0)
        # Written out on the CPU: for decoding's one query a row and for bf16, the fused kernel
        # measured 1.5-6x slower than these two matmuls.
        return dropout(self._weights(q, kv, mask), self.dropout, self.training) @ kv.v


def fused_attention(q: Tensor, kv: KV, mask: Tensor | None, dropout_p: float) -> Tensor:
    """torch's fused attention. A square causal mask (training's decoder self-attention, the only (T, L) mask with
    T = L) goes as SDPA's own `is_causal`, which lets it take the flash kernel: a mask tensor rules that one out."""
    causal = mask is not None and mask.dim() == 2 and mask.size(0) == mask.size(1) == q.size(-2) == kv.k.size(-2)
    return F.scaled_dot_product_attention(q, kv.k, kv.v, attn_mask=None if causal else mask, dropout_p=dropout_p, is_causal=causal)
