"""The encoder-decoder Transformer, read top to bottom.

    pre-norm (the default):  x = x + dropout(sublayer(LayerNorm(x)))   for each sublayer, then a final LayerNorm per stack
    post-norm (model.norm):  x = LayerNorm(x + dropout(sublayer(x)))   for each sublayer (Vaswani et al.), nothing after

Training and decoding run the same layer code: training decodes a whole target from an
empty past; incremental decoding feeds new tokens with the `DecoderState` the previous
call returned. Shapes: B batch, S source length, T target length, D model size, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import KV, KVCache, MultiHeadAttention, causal_mask, padding_mask
from .config import ModelConfig
from .dropout import Dropout


class SinusoidalPositions(nn.Module):
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(...)  (Vaswani et al., 3.5).

    Sinusoids rather than learned positions: no parameters, the same quality in the paper,
    and a decoding step at position p needs only row p, with no table to outgrow.
    """

    def __init__(self, d_model: int, max_positions: int):
        super().__init__()
        position = torch.arange(max_positions, dtype=torch.float32)[:, None]
        inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_positions, d_model)
        table[:, 0::2] = torch.sin(position * inv_freq)
        table[:, 1::2] = torch.cos(position * inv_freq)
        self.register_buffer("table", table, persistent=False)

    def forward(self, start: int, length: int) -> Tensor:
        if start + length > len(self.table):
            raise ValueError(f"position {start + length - 1} is past model.max_positions={len(self.table)}")
        return self.table[start:start + length]  # (length, D)


class FeedForward(nn.Sequential):
    def __init__(self, cfg: ModelConfig):
        super().__init__(nn.Linear(cfg.d_model, cfg.d_ff), nn.ReLU(), Dropout(cfg.activation_dropout), nn.Linear(cfg.d_ff, cfg.d_model))


class SublayerNorm(nn.LayerNorm):
    """One residual sublayer's LayerNorm: on its input (pre-norm) or on the residual sum (post-norm)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.d_model)
        self.pre = cfg.norm == "pre"

    def before(self, x: Tensor) -> Tensor:
        return self(x) if self.pre else x

    def after(self, x: Tensor) -> Tensor:
        return x if self.pre else self(x)


class EncoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn_norm = SublayerNorm(cfg)
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = SublayerNorm(cfg)
        self.ffn = FeedForward(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, src_mask: Tensor) -> Tensor:
        h = self.self_attn_norm.before(x)
        x = self.self_attn_norm.after(x + self.drop(self.self_attn(h, self.self_attn.project_kv(h), src_mask)))
        x = self.ffn_norm.after(x + self.drop(self.ffn(self.ffn_norm.before(x))))
        return x


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attn_norm = SublayerNorm(cfg)
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.cross_attn_norm = SublayerNorm(cfg)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout)
        self.ffn_norm = SublayerNorm(cfg)
        self.ffn = FeedForward(cfg)
        self.drop = Dropout(cfg.dropout)

    def forward(self, x: Tensor, past: KVCache | None, memory_kv: KV, src_mask: Tensor) -> tuple[Tensor, KVCache]:
        """x: (B, T, D) new positions; past: their predecessors' K/V. Returns x and all K/V so far."""
        h = self.self_attn_norm.before(x)
        kv = self.self_attn.project_kv(h)
        cache = KVCache.of(kv) if past is None else past.append(kv)
        x = self.self_attn_norm.after(x + self.drop(self.self_attn(h, cache.kv, causal_mask(x.size(1), cache.length, x.device))))
        x = self.cross_attn_norm.after(x + self.drop(self.cross_attn(self.cross_attn_norm.before(x), memory_kv, src_mask)))
        x = self.ffn_norm.after(x + self.drop(self.ffn(self.ffn_norm.before(x))))
        return x, cache


@dataclass(frozen=True)
class DecoderState:
    """Everything decoding carries from step to step, as a value (modules hold no cache)."""

    memory_kv: tuple[KV, ...]  # cross-attention K/V per layer, projected once per source: B rows
    src_mask: Tensor  # (B, 1, 1, S)
    self_kv: tuple[KVCache, ...] = ()  # decoder self-attention K/V per layer, one position longer each step:
    # one row per hypothesis, G consecutive rows per source (G = 1, or the beam size)

    @property
    def position(self) -> int:
        """How many target positions have been decoded: where the next token's position starts."""
        return self.self_kv[0].length if self.self_kv else 0

    def select(self, rows: Tensor, sources: Tensor | None = None) -> DecoderState:
        """Pick hypothesis rows (beam reordering, rows leaving) and, if given, the sources
        they now belong to (sentences leaving the batch); everything else stays shared."""
        return DecoderState(
            memory_kv=self.memory_kv if sources is None else tuple(kv.select(sources) for kv in self.memory_kv),
            src_mask=self.src_mask if sources is None else self.src_mask.index_select(0, sources),
            self_kv=tuple(cache.select(rows) for cache in self.self_kv),
        )


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, vocab_size: int, pad_id: int = 0):
        super().__init__()
        self.pad_id, self.d_model = pad_id, cfg.d_model
        # One table for source, target and output: the SentencePiece vocabulary is joint.
        self.embedding = nn.Embedding(vocab_size, cfg.d_model, padding_idx=pad_id)
        self.positions = SinusoidalPositions(cfg.d_model, cfg.max_positions)
        self.drop = Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.encoder_layers))
        # Pre-norm stacks end un-normalised (each layer adds to the residual stream); post-norm ones end on a LayerNorm.
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.decoder_layers))
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm == "pre" else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # N(0, D^-1/2) and a sqrt(D) scale on lookup: unit-size inputs, O(1) logits through the tied output.
        nn.init.normal_(self.embedding.weight, std=self.d_model**-0.5)
        with torch.no_grad():
            self.embedding.weight[self.pad_id].zero_()

    def _embed(self, ids: Tensor, start: int) -> Tensor:
        x = self.embedding(ids) * math.sqrt(self.d_model) + self.positions(start, ids.size(1))  # (B, L, D)
        return self.drop(x)

    def encode(self, src: Tensor) -> tuple[Tensor, Tensor]:
        """src (B, S) -> memory (B, S, D) and src_mask (B, 1, 1, S)."""
        src_mask = padding_mask(src, self.pad_id)
        x = self._embed(src, start=0)
        for layer in self.encoder:
            x = layer(x, src_mask)
        return self.encoder_norm(x), src_mask

    def start(self, memory: Tensor, src_mask: Tensor) -> DecoderState:
        return DecoderState(tuple(layer.cross_attn.project_kv(memory) for layer in self.decoder), src_mask)

    def decode(self, tgt_in: Tensor, state: DecoderState) -> tuple[Tensor, DecoderState]:
        """New target tokens (B, T) after `state` -> their decoder outputs (B, T, D) and the extended state."""
        x = self._embed(tgt_in, start=state.position)
        self_kv = []
        for i, layer in enumerate(self.decoder):
            past = state.self_kv[i] if state.self_kv else None
            x, kv = layer(x, past, state.memory_kv[i], state.src_mask)
            self_kv.append(kv)
        return self.decoder_norm(x), replace(state, self_kv=tuple(self_kv))

    def logits(self, outputs: Tensor) -> Tensor:
        """Decoder outputs (..., D) -> next-token logits (..., V), through the tied embedding.

        Apart from `decode` so that search can project a block of rows at a time."""
        return F.linear(outputs, self.embedding.weight)

    def forward(self, src: Tensor, tgt_in: Tensor) -> Tensor:
        """Teacher forcing: (B, S), (B, T) -> logits (B, T, V)."""
        memory, src_mask = self.encode(src)
        outputs, _ = self.decode(tgt_in, self.start(memory, src_mask))
        return self.logits(outputs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
