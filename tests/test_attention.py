"""The attention core in its three modes: properties that catch masking and wiring bugs."""

import torch

from translator.attention import KV, KVCache, MultiHeadAttention, causal_mask, fused_attention, padding_mask
from translator.config import ModelConfig
from translator.model import Transformer

PAD = 0


def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(d_model=32, n_heads=4, d_ff=64, encoder_layers=2, decoder_layers=2, dropout=0.0, max_positions=64)
    return Transformer(cfg, vocab_size=40).eval()


def random_ids(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 40, shape, generator=g)


def test_causal_mask_is_bottom_right_aligned():
    assert torch.equal(causal_mask(3, 3), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # one new query after 4 cached keys sees all 5; two new queries after 3 cached
    assert causal_mask(1, 5) is None  # one query sees every key: nothing to mask
    assert torch.equal(causal_mask(2, 5), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool))


def test_the_gpus_fused_attention_equals_the_written_out_one_for_every_mask():
    """fused_attention (the CUDA path) against the CPU's two matmuls, run here on the CPU: a square causal mask goes
    as SDPA's is_causal (top-left aligned), which a rectangular one (T new queries after L - T cached keys) must not."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, dropout=0.0).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0, 0], [5, 6, 7, 8, 9, 4]])
    for T, L, mask in ((6, 6, causal_mask(6, 6)), (2, 6, causal_mask(2, 6)), (3, 6, padding_mask(ids, 0)), (1, 6, None)):
        q, kv = torch.randn(2, 4, T, 4), attn.project_kv(torch.randn(2, L, 16))
        torch.testing.assert_close(fused_attention(q, kv, mask, 0.0), attn._weights(q, kv, mask) @ kv.v)


def test_the_square_causal_mask_reaches_sdpa_as_is_causal_which_allows_the_flash_kernel(monkeypatch):
    import translator.attention as attention

    calls = []
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k))
    kv = KV(torch.randn(2, 4, 6, 4), torch.randn(2, 4, 6, 4))
    fused_attention(torch.randn(2, 4, 6, 4), kv, causal_mask(6, 6), 0.1)
    fused_attention(torch.randn(2, 4, 2, 4), kv, causal_mask(2, 6), 0.1)
    assert [(k["attn_mask"] is None, k["is_causal"]) for k in calls] == [(True, True), (False, False)]


def test_padding_mask_marks_real_tokens_and_never_masks_a_whole_row():
    ids = torch.tensor([[5, 6, PAD], [PAD, PAD, PAD]])
    mask = padding_mask(ids, PAD)
    assert mask.shape == (2, 1, 1, 3)
    assert mask[0, 0, 0].tolist() == [True, True, False]
    assert mask[1].all()  # an all-pad row sees everything rather than nothing (no NaN)


def test_all_pad_source_row_gives_no_nan():
    model = tiny_model()
    src = random_ids(2, 5)
    src[1] = PAD
    logits = model(src, random_ids(2, 4))
    assert torch.isfinite(logits).all()


def test_scores_are_scaled_by_inverse_sqrt_head_size():
    torch.manual_seed(0)
    attn = MultiHeadAttention(d_model=8, n_heads=2, dropout=0.0).eval()
    x, source = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    kv = attn.project_kv(source)
    q = attn.q_proj(x).view(1, 3, 2, 4).transpose(1, 2)
    weights = torch.softmax(q @ kv.k.transpose(-2, -1) / 4**0.5, dim=-1)
    by_hand = attn.out_proj((weights @ kv.v).transpose(1, 2).reshape(1, 3, 8))
    assert torch.allclose(attn(x, kv, None), by_hand, atol=1e-6)


def test_encoder_is_unmasked_a_later_source_token_changes_earlier_outputs():
    model = tiny_model()
    src = random_ids(1, 6)
    changed = src.clone()
    changed[0, 5] = 4 if src[0, 5] != 4 else 5
    memory, _ = model.encode(src)
    memory2, _ = model.encode(changed)
    assert not torch.allclose(memory[0, 0], memory2[0, 0])


def test_encoder_ignores_appended_padding():
    model = tiny_model()
    src = random_ids(2, 6)
    padded = torch.cat([src, torch.full((2, 4), PAD)], dim=1)
    memory, _ = model.encode(src)
    memory_padded, _ = model.encode(padded)
    assert torch.allclose(memory, memory_padded[:, :6], atol=1e-5)
    tgt = random_ids(2, 5, seed=2)
    assert torch.allclose(model(src, tgt), model(padded, tgt), atol=1e-5)


def test_decoder_self_attention_is_causal():
    model = tiny_model()
    src, tgt = random_ids(2, 6), random_ids(2, 7, seed=3)
    logits = model(src, tgt)
    for t in range(1, 7):
        changed = tgt.clone()
        changed[:, t] = 4 if tgt[0, t] != 4 else 5
        changed_logits = model(src, changed)
        assert torch.allclose(logits[:, :t], changed_logits[:, :t], atol=1e-6), f"position < {t} saw token {t}"
        assert not torch.allclose(logits[:, t], changed_logits[:, t])


def test_cross_attention_reads_the_memory_with_queries_from_the_decoder():
    model = tiny_model()
    src, tgt = random_ids(1, 6), random_ids(1, 5, seed=4)
    memory, src_mask = model.encode(src)
    outputs, _ = model.decode(tgt, model.start(memory, src_mask))
    other_outputs, _ = model.decode(tgt, model.start(memory + 1.0, src_mask))
    assert not torch.allclose(outputs, other_outputs)  # the memory matters

    # Q comes from the decoder side: with fixed memory K/V, changing the decoder input changes the cross-attention output
    layer = model.decoder[0]
    kv = layer.cross_attn.project_kv(memory)
    x = torch.randn(1, 5, 32)
    assert not torch.allclose(layer.cross_attn(x, kv, src_mask), layer.cross_attn(x + 1.0, kv, src_mask))
    # and K/V from the memory: the number of keys is the source length, not the target length
    assert kv.k.shape == (1, 4, 6, 8)


def test_no_interaction_across_the_batch():
    model = tiny_model()
    src = random_ids(3, 6)
    src[1, 3:] = PAD
    tgt = random_ids(3, 5, seed=5)
    batched = model(src, tgt)
    for i in range(3):
        real = int((src[i] != PAD).sum())
        alone = model(src[i : i + 1, :real], tgt[i : i + 1])
        assert torch.allclose(batched[i : i + 1], alone, atol=1e-5)


def test_kv_cache_appends_like_concatenation_and_selects_rows():
    g = torch.Generator().manual_seed(0)
    steps = [KV(torch.randn(3, 2, n, 5, generator=g), torch.randn(3, 2, n, 5, generator=g)) for n in (4, 1, 1, 20, 1)]
    cache = KVCache.of(steps[0])
    for step in steps[1:]:  # grows past its first buffers more than once
        cache = cache.append(step)
    for got, parts in zip(cache.kv, zip(*steps)):
        assert torch.equal(got, torch.cat(parts, dim=2))
    picked = cache.select(torch.tensor([2, 0]))
    assert torch.equal(picked.kv.k[0], cache.kv.k[2]) and torch.equal(picked.kv.v[1], cache.kv.v[0])


def test_kv_cache_appending_twice_to_one_state_keeps_both_branches():
    start = KVCache.of(KV(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))).append(KV(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2)))
    left = start.append(KV(torch.full((1, 1, 1, 2), 2.0), torch.full((1, 1, 1, 2), 2.0)))
    right = start.append(KV(torch.full((1, 1, 1, 2), 3.0), torch.full((1, 1, 1, 2), 3.0)))
    assert left.kv.k[0, 0, :, 0].tolist() == [0.0, 1.0, 2.0]
    assert right.kv.k[0, 0, :, 0].tolist() == [0.0, 1.0, 3.0]
    assert start.kv.k[0, 0, :, 0].tolist() == [0.0, 1.0]
