"""int8 and bf16 decoding on the CPU: the copy stays close to the model, leaves it untouched, and searches like it."""

import copy

import pytest
import torch

from test_search import SENTENCES, encode
from translator import Translator
from translator.config import RecipeError
from translator.devices import resolve_precision
from translator import quantize
from translator.quantize import bf16_model, fastest_int8_linear, int8_engines, int8_model
from translator.search import beam_search, greedy_search


@pytest.fixture(scope="module")
def int8(tiny_translator):
    return int8_model(tiny_translator.model)


def teacher_forced(model, translator):
    src, _ = encode(translator, SENTENCES)
    tgt_in = torch.cat([torch.full((len(SENTENCES), 1), 2), src[:, :-1]], dim=1)  # any target prefix will do
    with torch.inference_mode():
        return model(src, tgt_in)


def test_int8_logits_stay_close_to_fp32(tiny_translator, int8):
    fp32, quantized = teacher_forced(tiny_translator.model, tiny_translator), teacher_forced(int8, tiny_translator)
    assert (quantized - fp32).abs().max() < fp32.std()
    assert (quantized - fp32).abs().mean() < 0.05 * fp32.std()
    assert (quantized.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("engine", int8_engines())
def test_the_output_projection_is_int8_under_each_engine(tiny_translator, monkeypatch, engine):
    monkeypatch.setenv(quantize.ENGINE_VARIABLE, engine)
    int8 = int8_model(tiny_translator.model)
    outputs = torch.randn(7, tiny_translator.model.d_model)
    with torch.inference_mode():
        tied, projected = tiny_translator.model.logits(outputs), int8.logits(outputs)
    assert not torch.equal(tied, projected)  # the tied projection really runs on int8 weights ...
    assert torch.allclose(tied, projected, atol=0.05 * tied.abs().max().item())  # ... of the same table


class Built(torch.nn.Module):
    """A stand-in for a quantized Linear that remembers the engine it was built under."""

    def __init__(self):
        super().__init__()
        self.engine = torch.backends.quantized.engine

    def forward(self, rows):
        return rows


@pytest.mark.skipif(len(int8_engines()) < 2, reason="one int8 engine in this torch build: nothing to choose")
@pytest.mark.parametrize("winner", int8_engines())
def test_the_faster_engine_builds_the_copy_and_the_engine_setting_is_restored(monkeypatch, winner):
    monkeypatch.delenv(quantize.ENGINE_VARIABLE, raising=False)  # conftest names one for the other tests
    monkeypatch.setattr(quantize, "_seconds", lambda module, rows: 0.0 if module.engine == winner else 1.0)
    before = torch.backends.quantized.engine
    quantize._fastest_engine.cache_clear()
    try:
        assert fastest_int8_linear(torch.nn.Linear(8, 4), lambda linear: Built()).engine == winner
    finally:
        quantize._fastest_engine.cache_clear()
    assert torch.backends.quantized.engine == before


def test_an_unknown_engine_in_the_variable_is_an_error_naming_it(tiny_translator, monkeypatch):
    monkeypatch.setenv(quantize.ENGINE_VARIABLE, "mkl-int8")
    with pytest.raises(ValueError, match=r"TRANSLATOR_INT8_ENGINE='mkl-int8': expected one of this torch's int8 engines: "):
        int8_model(tiny_translator.model)


def test_bf16_copy_is_bf16_throughout_and_its_logits_stay_close_to_fp32(tiny_translator):
    bf16 = bf16_model(tiny_translator.model)
    assert {p.dtype for p in bf16.parameters()} == {p.dtype for p in bf16.buffers()} == {torch.bfloat16}
    fp32, low = teacher_forced(tiny_translator.model, tiny_translator), teacher_forced(bf16, tiny_translator).float()
    assert (low - fp32).abs().mean() < 0.02 * fp32.std()  # bf16 keeps 8 bits of mantissa: about 0.4% per rounding
    assert (low.argmax(-1) == fp32.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("make_copy", [int8_model, bf16_model])
def test_a_copy_leaves_the_model_untouched(tiny_translator, make_copy):
    model = copy.deepcopy(tiny_translator.model).train()  # a model being trained, validated on a copy
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not make_copy(model).training
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert "logits" not in vars(model) and model.training  # dropout still on


@pytest.mark.parametrize("make_copy", [int8_model, bf16_model])
def test_beam_size_one_is_greedy_on_a_copy(tiny_translator, make_copy):
    low = make_copy(tiny_translator.model)
    src, max_lens = encode(tiny_translator, SENTENCES)
    greedy = greedy_search(low, src, max_lens)
    beam = beam_search(low, src, max_lens, beam_size=1, alpha=0.0)
    assert [h.tokens for h in greedy] == [hyps[0].tokens for hyps in beam]


def test_int8_translations_agree_with_fp32_and_n_best_is_sorted(tiny_translator):
    sentences = SENTENCES * 2
    for beam_size in (1, 4):
        fp32 = tiny_translator.translate(sentences, beam_size=beam_size, precision="fp32")
        int8 = tiny_translator.translate(sentences, beam_size=beam_size, precision="int8")
        # The toy model's next-token choices are often near-ties, so one rounding flips a token and the rest
        # of the sentence follows it: how many sentences survive whole depends on the CPU that trained the
        # toy (8 or more of 10 on the AMD EPYCs, 6 on an Intel Xeon with AMX). Closeness itself is checked token by
        # token above (teacher forced); a broken int8 path agrees on almost none.
        assert sum(a == b for a, b in zip(fp32, int8)) >= 0.5 * len(sentences)
    for hyps in tiny_translator.translate(SENTENCES, beam_size=4, n_best=4, precision="int8"):
        assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)


def negate_in_place(model):
    with torch.no_grad():
        model.embedding.weight.mul_(-1)  # as an optimizer step would


def negate_by_assigning(model):
    # New tensors, whose in-place write counts start at 0 again, as the old ones' did
    model.load_state_dict({name: -p if name == "embedding.weight" else p.clone() for name, p in model.state_dict().items()}, assign=True)


@pytest.mark.parametrize("change", [negate_in_place, negate_by_assigning])
@pytest.mark.parametrize("name", ["int8", "bf16"])
def test_a_copy_is_built_once_and_again_when_the_weights_change(tiny_translator, name, change):
    translator = Translator(copy.deepcopy(tiny_translator.model), tiny_translator.tokenizer, tiny_translator.recipe)
    low = translator.precision(name)
    first = translator.decoding_model(low)
    assert translator.decoding_model(low) is first
    assert translator.decoding_model(translator.precision("fp32")) is translator.model
    change(translator.model)
    second = translator.decoding_model(low)
    assert second is not first
    outputs = torch.ones(1, translator.model.d_model, dtype=second.embedding.weight.dtype)  # bf16 for the bf16 copy
    with torch.inference_mode():
        before, after = first.logits(outputs).float(), second.logits(outputs).float()
    assert torch.allclose(after, -before, atol=0.02 * before.abs().max().item())  # the new weights, quantized


def test_a_model_made_under_inference_mode_decodes_at_every_precision(tiny_translator):
    with torch.inference_mode():  # its weights are inference tensors, which count no writes
        model = copy.deepcopy(tiny_translator.model)
    translator, reference = (Translator(m, tiny_translator.tokenizer, tiny_translator.recipe, workers=2) for m in (model, tiny_translator.model))
    for precision in ("fp32", "bf16", "int8"):  # int8 in two workers as well: a share's activation scales are its own
        assert translator.translate(SENTENCES, beam_size=1, precision=precision) == reference.translate(SENTENCES, beam_size=1, precision=precision)
    translator.close(), reference.close()


def test_int8_is_refused_on_a_gpu_naming_the_key():
    with pytest.raises(RecipeError, match=r"decode.precision: int8 runs on the CPU only"):
        resolve_precision("int8", torch.device("cuda"))
    assert resolve_precision("int8", torch.device("cpu")).name == "int8"


def test_nothing_to_decode_builds_no_copy(tiny_translator, monkeypatch):
    # The server checks a request's options with translate([]): that must not build (and time) an int8 copy on its event loop.
    import translator.api as api

    built = []
    monkeypatch.setattr(api, "int8_model", lambda model: built.append(model) or int8_model(model))
    translator = Translator(tiny_translator.model, tiny_translator.tokenizer, tiny_translator.recipe, workers=2)
    assert translator.translate([], precision="int8") == [] and translator.translate(["", " "], precision="int8") == ["", ""]
    assert built == []
    with pytest.raises(RecipeError, match="precision"):
        translator.translate([], precision="int4")  # still checked with nothing to decode
    assert translator.translate(SENTENCES[:1], precision="int8") and len(built) == 1
