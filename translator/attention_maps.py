"""Attention maps: the weights of the three attention modes for one translation, with its pieces.

    with capture_attention(model) as captured:    # forward hooks on every MultiHeadAttention
        model(src, tgt_in)
    captured.cross[0]                             # layer 0's cross-attention weights, one tensor per call

Nothing in the model knows about capturing: the hooks exist only inside the `with` block,
so decoding without it runs exactly the code it ran before. A hook computes the weights
again from the module's inputs (`MultiHeadAttention.weights`), written out on every
device, because a GPU's fused attention kernel never materialises them.

`attention_maps` replays a finished hypothesis through the decoder in one teacher-forced
pass: incremental decoding with its K/V cache computes the same weights step by step
(tests/test_attention_maps.py checks this against a capture of the search itself), and
the replay needs no bookkeeping of beam reorderings.
Shapes: H heads, S source pieces, T target pieces.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention import MultiHeadAttention
from .batching import source_tensor, target_tensors
from .model import Transformer
from .tokenizer import Tokenizer


@dataclass
class CapturedAttention:
    """Per mode, per layer: the weights of each call, (B, H, T, L) in fp32, in call order."""

    encoder: list[list[Tensor]] = field(default_factory=list)
    decoder: list[list[Tensor]] = field(default_factory=list)
    cross: list[list[Tensor]] = field(default_factory=list)


@contextmanager
def capture_attention(model: Transformer) -> Iterator[CapturedAttention]:
    """Record the attention weights of every forward call of the model's attention modules while open."""
    captured = CapturedAttention()
    modules = {
        "encoder": [layer.self_attn for layer in model.encoder],
        "decoder": [layer.self_attn for layer in model.decoder],
        "cross": [layer.cross_attn for layer in model.decoder],
    }
    handles = []
    for mode, layers in modules.items():
        for module in layers:
            calls: list[Tensor] = []
            getattr(captured, mode).append(calls)
            handles.append(module.register_forward_hook(_recorder(calls)))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def _recorder(calls: list[Tensor]):
    def hook(module: MultiHeadAttention, args: tuple, output: Tensor) -> None:
        calls.append(module.weights(*args).detach().float())

    return hook


@dataclass(frozen=True)
class AttentionMaps:
    """The attention weights behind one translation, every layer and head."""

    source: list[str]  # S source pieces, eos included: rows and columns of `encoder`, columns of `cross`
    target: list[str]  # T pieces the decoder wrote, eos included unless cut at the length limit: rows of `decoder` and `cross`
    target_input: list[str]  # T pieces the decoder read (bos, then `target` without eos): columns of `decoder`
    encoder: Tensor  # (layers, H, S, S) encoder self-attention
    decoder: Tensor  # (layers, H, T, T) decoder self-attention: causal, zero above the diagonal
    cross: Tensor  # (layers, H, T, S) cross-attention: the alignment of target to source

    def to_dict(self, decimals: int = 4) -> dict:
        """Plain lists for JSON, weights rounded to `decimals`."""
        return {
            "source": self.source, "target": self.target, "target_input": self.target_input,
            **{mode: getattr(self, mode).round(decimals=decimals).tolist() for mode in ("encoder", "decoder", "cross")},
        }


@torch.inference_mode()
def attention_maps(model: Transformer, tokenizer: Tokenizer, src_ids: list[int], tgt_ids: list[int], ended: bool = True) -> AttentionMaps:
    """The weights the decoder computes for source `src_ids` while writing `tgt_ids` (both without specials),
    then eos unless the search cut the translation at its length limit (`ended` False)."""
    device = next(model.parameters()).device
    src = source_tensor([src_ids]).to(device)  # (1, S): the source and eos
    tgt_in, tgt_out = (t.to(device) for t in target_tensors([tgt_ids]))  # (1, T): bos y1 .. yn, and y1 .. yn eos
    if not ended:  # no eos was written, and the last token never read
        tgt_in, tgt_out = tgt_in[:, :-1], tgt_out[:, :-1]
    with capture_attention(model) as captured:
        memory, src_mask = model.encode(src)
        model.decode(tgt_in, model.start(memory, src_mask))

    def stacked(per_layer: list[list[Tensor]]) -> Tensor:
        return torch.stack([calls[0][0] for calls in per_layer]).cpu()  # the one call's one row, per layer

    return AttentionMaps(
        source=tokenizer.id_pieces(src[0].tolist()),
        target=tokenizer.id_pieces(tgt_out[0].tolist()),
        target_input=tokenizer.id_pieces(tgt_in[0].tolist()),
        encoder=stacked(captured.encoder),
        decoder=stacked(captured.decoder),
        cross=stacked(captured.cross),
    )
