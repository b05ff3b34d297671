"""The Transformer: incremental decoding equals full recomputation, and the parts are what the recipe says."""

from dataclasses import replace

import pytest
import torch

from conftest import DEVICES
from translator.config import ModelConfig
from translator.model import DecoderLayer, EncoderLayer, SinusoidalPositions, Transformer

PAD = 0


def make_model(dropout=0.0, norm="pre") -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=2, decoder_layers=3, dropout=dropout, max_positions=64, norm=norm)
    return Transformer(cfg, vocab_size=50)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_cached_step_by_step_logits_equal_full_recomputation_with_padded_sources(device, norm):
    model = make_model(norm=norm).eval().to(device)
    g = torch.Generator().manual_seed(1)
    src = torch.randint(4, 50, (3, 9), generator=g)
    src[0, 5:] = PAD
    src[2, 7:] = PAD
    tgt = torch.randint(4, 50, (3, 8), generator=g)
    src, tgt = src.to(device), tgt.to(device)
    full = model(src, tgt)
    memory, src_mask = model.encode(src)
    state = model.start(memory, src_mask)
    steps = []
    for t in range(tgt.size(1)):
        outputs, state = model.decode(tgt[:, t : t + 1], state)
        steps.append(model.logits(outputs))
        assert state.position == t + 1
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_decoding_in_chunks_equals_one_pass(device, norm):
    model = make_model(norm=norm).eval().to(device)
    src, tgt = torch.randint(4, 50, (2, 6), device=device), torch.randint(4, 50, (2, 7), device=device)
    memory, src_mask = model.encode(src)
    first, state = model.decode(tgt[:, :3], model.start(memory, src_mask))
    rest, _ = model.decode(tgt[:, 3:], state)
    assert torch.allclose(model.logits(torch.cat([first, rest], dim=1)), model(src, tgt), atol=1e-5)


@torch.inference_mode()  # as decoding runs: selecting from the cache tracks no gradients
def test_state_select_reorders_every_tensor_together():
    model = make_model().eval()
    src, tgt = torch.randint(4, 50, (3, 6)), torch.randint(4, 50, (3, 4))
    memory, src_mask = model.encode(src)
    _, state = model.decode(tgt[:, :3], model.start(memory, src_mask))
    order = torch.tensor([2, 0])
    picked, _ = model.decode(tgt[order, 3:], state.select(order, order))
    assert torch.allclose(model.logits(picked), model(src[order], tgt[order])[:, 3:], atol=1e-5)


def test_dropout_is_active_in_training_and_off_in_eval():
    model = make_model(dropout=0.3)
    src, tgt = torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 5))
    model.train()
    assert not torch.allclose(model(src, tgt), model(src, tgt))
    model.eval()
    assert torch.equal(model(src, tgt), model(src, tgt))


@pytest.mark.parametrize("knob", ["dropout", "attention_dropout", "activation_dropout"])
def test_each_dropout_knob_alone_makes_training_random(knob):
    torch.manual_seed(0)
    off = {"dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0}
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=1, decoder_layers=1, max_positions=64, **off)
    src, tgt = torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 5))
    quiet = Transformer(cfg, vocab_size=50).train()
    assert torch.equal(quiet(src, tgt), quiet(src, tgt))
    noisy = Transformer(replace(cfg, **{knob: 0.3}), vocab_size=50).train()
    assert not torch.equal(noisy(src, tgt), noisy(src, tgt))


def test_embeddings_are_shared_and_the_default_size_has_about_7_6m_parameters():
    cfg = ModelConfig()  # the defaults: d 256, 4 heads, ff 1024, 3 + 3 layers (the Multi30k recipe before session 29)
    model = Transformer(cfg, vocab_size=8000)
    names = [n for n, _ in model.named_parameters()]
    assert sum("embedding" in n for n in names) == 1  # one table: source, target and output projection
    assert 7.4e6 < model.num_parameters() < 7.8e6


def test_training_changes_no_buffer():
    """Data-parallel training does not broadcast buffers (train.py): that holds while every buffer is
    built alike on each rank and no training step changes it, as batch norm's running means would."""
    model = make_model(dropout=0.1).train()
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    assert list(before) == ["positions.table"]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randint(4, 50, (2, 6)), torch.randint(4, 50, (2, 5))).sum().backward()
    optimizer.step()
    assert all(torch.equal(buffer, before[name]) for name, buffer in model.named_buffers())
    assert torch.equal(make_model().positions.table, before["positions.table"])  # another rank's model builds the same


def test_sinusoidal_positions_follow_the_formula():
    table = SinusoidalPositions(d_model=8, max_positions=20)(0, 20)
    pos, i = 7, 2
    assert torch.isclose(table[pos, 2 * i], torch.sin(torch.tensor(pos / 10000 ** (2 * i / 8))))
    assert torch.isclose(table[pos, 2 * i + 1], torch.cos(torch.tensor(pos / 10000 ** (2 * i / 8))))
    assert torch.equal(SinusoidalPositions(8, 20)(5, 3), table[5:8])


@torch.inference_mode()  # as decoding runs: selecting from the cache tracks no gradients
def test_hypotheses_sharing_a_source_equal_copies_of_it():
    """Beam search decodes G rows per source without copying the memory: same logits as G copies."""
    model = make_model().eval()
    src, G = torch.randint(4, 50, (2, 6)), 3
    src[1, 4:] = PAD
    tgt = torch.randint(4, 50, (2 * G, 5))
    memory, src_mask = model.encode(src)
    shared, state = model.decode(tgt, model.start(memory, src_mask))
    copies = src.repeat_interleave(G, dim=0)
    assert torch.allclose(model.logits(shared), model(copies, tgt), atol=1e-5)
    order = torch.tensor([2, 0, 1, 5, 5, 3])  # reorder within each source's block, as beam search does
    nxt = torch.randint(4, 50, (2 * G, 1))
    step, _ = model.decode(nxt, state.select(order))
    full = model(copies, torch.cat([tgt[order], nxt], dim=1))[:, -1:]
    assert torch.allclose(model.logits(step), full, atol=1e-5)


def _copy_into_torch_layer(ours, theirs) -> None:
    """Our layer's weights into torch's nn.Transformer{Encoder,Decoder}Layer (Q, K, V fused in one in_proj)."""
    attentions = [(ours.self_attn, theirs.self_attn)] + ([(ours.cross_attn, theirs.multihead_attn)] if hasattr(ours, "cross_attn") else [])
    norms = [ours.self_attn_norm] + ([ours.cross_attn_norm] if hasattr(ours, "cross_attn") else []) + [ours.ffn_norm]
    with torch.no_grad():
        for mine, torchs in attentions:
            torchs.in_proj_weight.copy_(torch.cat([mine.q_proj.weight, mine.kv_proj.weight]))
            torchs.in_proj_bias.copy_(torch.cat([mine.q_proj.bias, mine.kv_proj.bias]))
            torchs.out_proj.weight.copy_(mine.out_proj.weight)
            torchs.out_proj.bias.copy_(mine.out_proj.bias)
        for mine, torchs in zip(norms, [theirs.norm1, theirs.norm2, getattr(theirs, "norm3", None)]):
            mine.weight.normal_(1.0, 0.3)  # not the identity, so a misplaced norm shows
            mine.bias.normal_(0.0, 0.3)
            torchs.weight.copy_(mine.weight)
            torchs.bias.copy_(mine.bias)
        theirs.linear1.load_state_dict(ours.ffn[0].state_dict())
        theirs.linear2.load_state_dict(ours.ffn[-1].state_dict())


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_layers_equal_torchs_own_transformer_layers(norm):
    """Pre-norm is torch's norm_first=True, post-norm its default (Vaswani et al.): same outputs, padding and causality included."""
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, dropout=0.0, norm=norm)
    kwargs = dict(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=True, norm_first=norm == "pre")
    encoder, torch_encoder = EncoderLayer(cfg).eval(), torch.nn.TransformerEncoderLayer(**kwargs).eval()
    decoder, torch_decoder = DecoderLayer(cfg).eval(), torch.nn.TransformerDecoderLayer(**kwargs).eval()
    _copy_into_torch_layer(encoder, torch_encoder)
    _copy_into_torch_layer(decoder, torch_decoder)
    src, tgt = torch.randn(3, 7, 32), torch.randn(3, 5, 32)
    real = torch.ones(3, 7, dtype=torch.bool)
    real[0, 4:], real[2, 6:] = False, False
    memory = encoder(src, real[:, None, None, :])
    torch_memory = torch_encoder(src, src_key_padding_mask=~real)
    assert torch.allclose(memory[real], torch_memory[real], atol=1e-5)  # padded positions' outputs are never read
    out, _ = decoder(tgt, None, decoder.cross_attn.project_kv(memory), real[:, None, None, :])
    future = torch.ones(5, 5, dtype=torch.bool).triu(diagonal=1)
    torch_out = torch_decoder(tgt, memory, tgt_mask=future, memory_key_padding_mask=~real)
    assert torch.allclose(out, torch_out, atol=1e-5)
