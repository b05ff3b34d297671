"""Ensembles: models of one vocabulary that decode together, each step's distribution the mean of theirs.

    p(y_t | y_<t, x) = (1/N) * sum_i p_i(y_t | y_<t, x)

`Ensemble` has the decoding interface of `Transformer` (encode / start / decode / logits), so greedy
search, beam search and sampling run on it unchanged: each member keeps its own memory and cache
(`EnsembleState`), the members' decoder outputs travel side by side in one tensor, and `logits`
returns the log of the mean distribution, already normalised (search's log-softmax leaves it as it
is). Members may differ in shape and training; they must share the SentencePiece model, so that an
id is the same piece to all of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import DecoderState, Transformer


@dataclass(frozen=True)
class EnsembleState:
    """One `DecoderState` per member; beam reordering and rows leaving apply to all of them alike."""

    members: tuple[DecoderState, ...]

    def select(self, rows: Tensor, sources: Tensor | None = None) -> EnsembleState:
        return EnsembleState(tuple(state.select(rows, sources) for state in self.members))


class Ensemble(nn.Module):
    def __init__(self, models: list[Transformer]):
        super().__init__()
        if len(models) < 2:
            raise ValueError(f"an ensemble takes 2 or more models, got {len(models)}")
        self.members = nn.ModuleList(models)
        self.widths = [model.d_model for model in models]  # each member's share of the decoder outputs' last dim

    def encode(self, src: Tensor) -> tuple[tuple[Tensor, ...], Tensor]:
        """src (B, S) -> each member's memory (B, S, D_i) and the source mask (B, 1, 1, S), which all share."""
        encoded = [model.encode(src) for model in self.members]
        return tuple(memory for memory, _ in encoded), encoded[0][1]

    def start(self, memories: tuple[Tensor, ...], src_mask: Tensor) -> EnsembleState:
        return EnsembleState(tuple(model.start(memory, src_mask) for model, memory in zip(self.members, memories)))

    def decode(self, tgt_in: Tensor, state: EnsembleState) -> tuple[Tensor, EnsembleState]:
        """New target tokens (B, T) -> the members' decoder outputs side by side (B, T, sum of D_i), and the state."""
        decoded = [model.decode(tgt_in, member) for model, member in zip(self.members, state.members)]
        return torch.cat([outputs for outputs, _ in decoded], dim=-1), EnsembleState(tuple(member for _, member in decoded))

    def logits(self, outputs: Tensor) -> Tensor:
        """Decoder outputs side by side (..., sum of D_i) -> log of the members' mean next-token distribution (..., V), fp32."""
        log_probs = [F.log_softmax(model.logits(part).float(), dim=-1) for model, part in zip(self.members, outputs.split(self.widths, dim=-1))]
        return torch.logsumexp(torch.stack(log_probs), dim=0) - math.log(len(self.members))

