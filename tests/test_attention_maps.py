"""Attention maps: the weights are the ones forward applies, the replay equals the search's own
steps, and capturing leaves nothing behind."""

from dataclasses import replace

import pytest
import torch

from translator import Translator
from translator.attention import MultiHeadAttention, causal_mask, padding_mask
from translator.attention_maps import capture_attention
from translator.search import greedy_search, max_output_lengths
from translator.batching import source_tensor
from translator.tokenizer import PAD_ID

SENTENCE = "Der alte hund trägt ein ball und der hut."


@pytest.mark.parametrize("groups", [1, 3])
def test_weights_are_the_ones_forward_applies(groups):
    """weights(x, kv, mask) @ V, heads merged and projected, is forward's output: for self-attention
    under a causal mask and for grouped (beam) queries over a padded memory."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, 4, dropout=0.0).eval()
    memory = torch.randn(2, 5, 16)
    mask = padding_mask(torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]), PAD_ID)
    x = torch.randn(2 * groups, 3, 16)
    kv = attn.project_kv(memory)
    cases = [(x, kv, mask)]
    if groups == 1:
        cases.append((memory, kv, causal_mask(5, 5)))
    for queries, keys, m in cases:
        weights = attn.weights(queries, keys, m)  # (B, H, G*T, L)
        y = weights @ keys.v  # (B, H, G*T, Dh)
        rows, T, D = queries.shape
        y = y.view(-1, 4, rows // keys.k.size(0), T, 4).permute(0, 2, 3, 1, 4).reshape(rows, T, D)
        torch.testing.assert_close(attn.out_proj(y), attn(queries, keys, m))
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_maps_have_the_pieces_dimensions_and_the_modes_shapes(tiny_translator):
    result = tiny_translator.translate(SENTENCE, beam_size=1, return_attention=True)
    maps, tokenizer = result.attention, tiny_translator.tokenizer
    assert maps.source == tokenizer.pieces(SENTENCE) + ["</s>"]
    assert maps.target[-1] == "</s>" and maps.target_input == ["<s>"] + maps.target[:-1]
    assert tokenizer.sp.decode_pieces(maps.target[:-1]) == result.text
    cfg = tiny_translator.recipe.model
    S, T = len(maps.source), len(maps.target)
    assert maps.encoder.shape == (cfg.encoder_layers, cfg.n_heads, S, S)
    assert maps.decoder.shape == (cfg.decoder_layers, cfg.n_heads, T, T)
    assert maps.cross.shape == (cfg.decoder_layers, cfg.n_heads, T, S)
    for weights in (maps.encoder, maps.decoder, maps.cross):
        torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))
    assert torch.all(maps.decoder.triu(diagonal=1) == 0)  # causal: no position sees a later one
    assert torch.all(maps.decoder.diagonal(dim1=-2, dim2=-1) > 0)


@pytest.mark.parametrize("max_len_a, max_len_b", [(1.5, 5), (0, 4)])  # the second cuts the translation at 3 tokens, without eos
def test_replay_equals_the_weights_of_incremental_decoding(tiny_translator, max_len_a, max_len_b):
    """The maps equal what greedy search computed step by step with its K/V cache: a row per step it took."""
    model, tokenizer, recipe = tiny_translator.model, tiny_translator.tokenizer, tiny_translator.recipe
    limited = Translator(model, tokenizer, replace(recipe, decode=replace(recipe.decode, max_len_a=max_len_a, max_len_b=max_len_b)))
    maps = limited.translate(SENTENCE, beam_size=1, return_attention=True).attention
    src = source_tensor(tokenizer.encode([SENTENCE]))
    with capture_attention(model) as captured:
        (hypothesis,) = greedy_search(model, src, max_output_lengths(src, PAD_ID, max_len_a, max_len_b, 256))
    T = len(captured.decoder[0])  # the steps taken
    assert maps.target == tokenizer.id_pieces(hypothesis.tokens) + ["</s>"] * (T > len(hypothesis.tokens))
    assert T == len(maps.target) == len(maps.target_input)
    assert max_len_b != 4 or (T == 3 and "</s>" not in maps.target)  # the premise: the limit did cut it
    torch.testing.assert_close(torch.stack([calls[0][0] for calls in captured.encoder]), maps.encoder)
    for layer, calls in enumerate(captured.decoder):
        assert len(calls) == T  # one call per step, the newest query over the cache
        steps = torch.stack([torch.nn.functional.pad(w[0, :, 0], (0, T - w.size(-1))) for w in calls], dim=1)
        torch.testing.assert_close(steps, maps.decoder[layer])
    for layer, calls in enumerate(captured.cross):
        torch.testing.assert_close(torch.cat([w[0] for w in calls], dim=1), maps.cross[layer])


def test_capture_changes_no_result_and_leaves_no_hook(tiny_translator):
    sentences = [SENTENCE, "", "Ein kind fährt."]
    plain = tiny_translator.translate(sentences, beam_size=3, n_best=2)
    with_maps = tiny_translator.translate(sentences, beam_size=3, n_best=2, return_attention=True)
    assert [[(t.text, t.score) for t in hyps] for hyps in with_maps] == [[(t.text, t.score) for t in hyps] for hyps in plain]
    assert with_maps[1][0].attention is None  # blank input is not decoded
    for hyps in (with_maps[0], with_maps[2]):
        for t in hyps:  # each hypothesis has its own maps
            assert tiny_translator.tokenizer.sp.decode_pieces(t.attention.target[:-1]) == t.text
    attention_modules = [m for m in tiny_translator.model.modules() if isinstance(m, MultiHeadAttention)]
    assert attention_modules and all(not m._forward_hooks for m in attention_modules)
    assert tiny_translator.translate(SENTENCE) == tiny_translator.translate(SENTENCE, return_attention=True).text


def test_to_dict_is_plain_json(tiny_translator):
    import json

    maps = tiny_translator.translate(SENTENCE, return_attention=True).attention
    data = json.loads(json.dumps(maps.to_dict()))
    assert data["source"] == maps.source and len(data["cross"][0][0]) == len(maps.target)
    torch.testing.assert_close(torch.tensor(data["cross"]), maps.cross, atol=1e-4, rtol=0)


def test_maps_are_in_the_models_own_precision_when_the_search_ran_under_autocast(tiny_model_dir, monkeypatch):
    # A GPU decodes bf16 under autocast with the model itself (a CPU decodes with a bf16 copy): CPU autocast stands in for it.
    translator = Translator.from_pretrained(tiny_model_dir, device="cpu")
    expected = translator.translate(SENTENCE, beam_size=1, precision="fp32", return_attention=True).attention
    monkeypatch.setattr(Translator, "_decoding", lambda self, precision: (self.model, torch.autocast("cpu", dtype=torch.bfloat16)))
    maps = translator.translate(SENTENCE, beam_size=1, precision="fp32", return_attention=True).attention
    assert maps.target == expected.target  # the premise: the same tokens, whose maps then differ only by their precision
    for mode in ("encoder", "decoder", "cross"):
        torch.testing.assert_close(getattr(maps, mode), getattr(expected, mode), atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path (fused attention in forward) is not run")
def test_capture_on_the_gpu_equals_the_cpu(tiny_model_dir):
    from translator import Translator

    gpu = Translator.from_pretrained(tiny_model_dir, device="cuda")
    on_gpu = gpu.translate(SENTENCE, beam_size=1, precision="fp32", return_attention=True)
    on_cpu = Translator.from_pretrained(tiny_model_dir, device="cpu").translate(SENTENCE, beam_size=1, precision="fp32", return_attention=True)
    assert on_gpu.text == on_cpu.text
    for mode in ("encoder", "decoder", "cross"):
        torch.testing.assert_close(getattr(on_gpu.attention, mode), getattr(on_cpu.attention, mode), atol=1e-4, rtol=1e-3)


def test_plot_attention_writes_a_png_and_refuses_bad_arguments_without_writing(tiny_model_dir, tmp_path):
    import subprocess
    import sys

    pytest.importorskip("matplotlib")

    def plot(*args):
        return subprocess.run([sys.executable, "-m", "translator", "plot", "--attention", str(tiny_model_dir), *args],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)

    written = plot(SENTENCE, "-o", "maps.png", "--head", "2")
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "maps.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in ([SENTENCE, "--head", "3"], [SENTENCE, "--head", "first"], [], ["  "], ["\u200b"]):  # U+200B: no pieces
        failed = plot(*bad, "-o", "bad.png")
        assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
        assert not (tmp_path / "bad.png").exists()


def test_plot_attention_titles_the_figure_with_the_sentence(tiny_translator, tmp_path, monkeypatch):
    figure = pytest.importorskip("matplotlib.figure")
    from translator.plot import plot_attention

    titles = []
    real = figure.Figure.suptitle
    monkeypatch.setattr(figure.Figure, "suptitle", lambda self, text, **kw: titles.append(text) or real(self, text, **kw))
    maps = tiny_translator.translate(SENTENCE, beam_size=1, return_attention=True).attention
    plot_attention(maps, tmp_path / "maps.png", head=None, title="Ein hund. -> A dog.")
    assert titles == ["Ein hund. -> A dog.  (mean over heads)"]
