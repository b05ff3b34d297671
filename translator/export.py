"""Export a model directory to CTranslate2 (`pip install 'translator[ctranslate2]'`), through its
Python spec API, the way CTranslate2's own converters (OpenNMT-py, fairseq) build their specs.

What must match for CTranslate2 to decode exactly as we do:
- pre-norm layers with a final LayerNorm per stack, or post-norm ones without; LayerNorm eps 1e-5 (torch's), ReLU feed-forward;
- embeddings times sqrt(D), one table for source, target and the output projection (no bias);
- our sinusoidal table itself (sin and cos interleaved: CTranslate2's built-in one puts all sines
  first), row p at position p, from 0 on both sides;
- self-attention's Q, K and V as one fused matrix; cross-attention's K and V fused (our kv_proj already is);
- the source ends with </s> (add_source_eos) and the target starts from <s>.
At translation time, `min_decoding_length=0` lets </s> win at the first step, as ours can.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import SPM, CheckpointError, load_model_dir, staged_directory
from .model import Transformer
from .tokenizer import Tokenizer

def _array(tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


def _linear(spec, *layers) -> None:
    """One CTranslate2 linear from one of our Linear layers, or from several fused along the outputs."""
    spec.weight = _array(torch.cat([layer.weight for layer in layers]))
    spec.bias = _array(torch.cat([layer.bias for layer in layers]))


def _layer_norm(spec, norm) -> None:
    spec.gamma, spec.beta = _array(norm.weight), _array(norm.bias)


def _attention(spec, attention, self_attention: bool) -> None:
    if self_attention:  # [Q; K; V] in one matrix
        _linear(spec.linear[0], attention.q_proj, attention.kv_proj)
    else:  # Q from the decoder, [K; V] from the memory
        _linear(spec.linear[0], attention.q_proj)
        _linear(spec.linear[1], attention.kv_proj)
    _linear(spec.linear[-1], attention.out_proj)


def _feed_forward(spec, norm, ffn) -> None:
    _layer_norm(spec.layer_norm, norm)
    _linear(spec.linear_0, ffn[0])
    _linear(spec.linear_1, ffn[-1])


def ctranslate2_spec(model: Transformer, tokenizer: Tokenizer):
    """Our model as a CTranslate2 TransformerSpec (weights in fp32; `optimize` quantizes them)."""
    from ctranslate2.specs import common_spec, transformer_spec

    heads, pre_norm = model.encoder[0].self_attn.n_heads, model.encoder[0].ffn_norm.pre
    spec = transformer_spec.TransformerSpec.from_config(
        (len(model.encoder), len(model.decoder)), heads, pre_norm=pre_norm, activation=common_spec.Activation.RELU)
    spec.config.layer_norm_epsilon = model.encoder[0].ffn_norm.eps
    spec.config.add_source_eos = True  # our sources end with </s>; the decoder starts from <s>, CTranslate2's default
    embedding, table = _array(model.embedding.weight), _array(model.positions.table)
    for stack in (spec.encoder, spec.decoder):
        stack.scale_embeddings = True  # times sqrt(D)
        stack.position_encodings.encodings = table
    spec.encoder.embeddings[0].weight = embedding
    spec.decoder.embeddings.weight = embedding
    spec.decoder.projection.weight = embedding  # tied; CTranslate2 stores one copy (aliases equal variables)
    for layer_spec, layer in zip(spec.encoder.layer, model.encoder):
        _layer_norm(layer_spec.self_attention.layer_norm, layer.self_attn_norm)
        _attention(layer_spec.self_attention, layer.self_attn, self_attention=True)
        _feed_forward(layer_spec.ffn, layer.ffn_norm, layer.ffn)
    for layer_spec, layer in zip(spec.decoder.layer, model.decoder):
        _layer_norm(layer_spec.self_attention.layer_norm, layer.self_attn_norm)
        _attention(layer_spec.self_attention, layer.self_attn, self_attention=True)
        _layer_norm(layer_spec.attention.layer_norm, layer.cross_attn_norm)
        _attention(layer_spec.attention, layer.cross_attn, self_attention=False)
        _feed_forward(layer_spec.ffn, layer.ffn_norm, layer.ffn)
    if pre_norm:  # post-norm stacks have no final LayerNorm, in either model
        _layer_norm(spec.encoder.layer_norm, model.encoder_norm)
        _layer_norm(spec.decoder.layer_norm, model.decoder_norm)
    pieces = [tokenizer.sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    return spec


def export_ctranslate2(model_dir: str | Path, out: str | Path, quantization: str | None = None) -> Path:
    """Write a CTranslate2 model directory (with the SentencePiece model) to `out`, which must not exist.
    It is built in a temporary directory beside `out` and renamed: a failure leaves nothing behind."""
    try:
        from ctranslate2.converters.converter import Converter
        from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES
    except ImportError:
        raise CheckpointError("export --to ctranslate2 needs CTranslate2: pip install 'translator[ctranslate2]'") from None
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists; export writes a new directory")
    if quantization not in (None, *ACCEPTED_MODEL_TYPES):
        raise CheckpointError(f"--quantization {quantization!r}: expected one of CTranslate2's {', '.join(ACCEPTED_MODEL_TYPES)}")
    _, model, tokenizer = load_model_dir(model_dir, "cpu")
    spec = ctranslate2_spec(model, tokenizer)
    spec.register_file(str(Path(model_dir) / SPM))

    class SpecConverter(Converter):  # CTranslate2's own steps: validate, optimize (alias, quantize), save
        def _load(self):
            return spec

    with staged_directory(out) as staging:
        SpecConverter().convert(str(staging), quantization=quantization, force=True)
    return out
