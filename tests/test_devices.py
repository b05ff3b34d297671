"""Device and precision are chosen at run time from the machine: `auto` is bf16 only where the CPU
or GPU runs it natively, nothing machine-specific is stored with a model, and the properties that
must hold everywhere hold on a GPU too when there is one."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import DEVICES, TINY_RECIPE
from translator import Translator, load_recipe, train
from translator import devices
from translator.batching import source_tensor
from translator.checkpoint import WEIGHTS, training_checkpoints
from translator.config import RecipeError
from translator.search import beam_search, greedy_search, max_output_lengths
from translator.tokenizer import PAD_ID


SENTENCES = ["Ein hund.", "Der alte mann sieht ein rotes fahrrad und der hut.", "Ein kind trägt der ball.", "Die frau."]


@pytest.fixture
def cpu_with(monkeypatch):
    def set_flags(*flags):
        monkeypatch.setattr(devices, "cpu_flags", lambda: frozenset(flags))
    return set_flags


@pytest.fixture
def gpu_with(monkeypatch):
    def set_capability(capability: tuple[int, int]):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as torch says of emulated bf16 too
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Test GPU")
    return set_capability


@pytest.mark.parametrize("flags, expected", [
    (("avx512f", "avx512_vnni", "avx512_bf16"), "bf16"),  # AMD Zen 4/5, Intel Cooper Lake
    (("avx512f", "amx_tile", "amx_bf16"), "bf16"),  # Intel Sapphire Rapids
    (("avx512f", "avx512_vnni"), "fp32"),  # Intel Cascade Lake / Ice Lake: bf16 emulated, 2.6x slower
    (("avx2", "fma"), "fp32"),
    ((), "fp32"),  # flags unknown (not Linux)
])
def test_auto_on_a_cpu_is_bf16_only_with_native_bf16(cpu_with, flags, expected):
    cpu_with(*flags)
    chosen = devices.resolve_precision("auto", torch.device("cpu"))
    assert chosen.name == expected and chosen.reason.startswith("auto: ")
    assert ("no native bf16" in chosen.reason) == (expected == "fp32")


@pytest.mark.parametrize("flags", [("avx512f", "avx512_bf16"), ("amx_tile", "amx_bf16"), ("avx512f", "avx512_vnni"), ()])
def test_auto_for_small_batches_on_a_cpu_is_fp32_and_an_explicit_bf16_is_honoured(cpu_with, gpu_with, flags):
    cpu_with(*flags)  # a service: bf16 calls cost ~30 us however few their rows, where fp32's shrink with them
    gpu_with((9, 0))
    assert devices.resolve_precision("auto", torch.device("cpu"), small_batches=True).name == "fp32"
    assert devices.resolve_precision("bf16", torch.device("cpu"), small_batches=True).name == "bf16"
    assert devices.resolve_precision("auto", torch.device("cuda", 0), small_batches=True).name == "bf16"  # not measured on GPUs


@pytest.mark.parametrize("capability, expected", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((7, 0), "fp16")])
def test_auto_on_a_gpu_is_bf16_where_native_else_fp16(gpu_with, capability, expected):  # H100, A100; T4, V100
    gpu_with(capability)
    chosen = devices.resolve_precision("auto", torch.device("cuda", 0))
    assert chosen.name == expected and "Test GPU" in chosen.reason
    assert chosen.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[expected]


@pytest.mark.parametrize("asked", ["fp32", "bf16", "fp16"])
def test_an_explicit_precision_is_honoured_whatever_the_machine(cpu_with, gpu_with, asked):
    cpu_with()
    gpu_with((7, 5))
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        assert devices.resolve_precision(asked, device).name == asked


def test_cuda_without_a_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert devices.pick_device("auto") == torch.device("cpu")
    with pytest.raises(RecipeError, match="train.device: 'cuda', but torch sees no CUDA device"):
        devices.pick_device("cuda")


@pytest.mark.slow
@pytest.mark.parametrize("flags, expected", [(("avx512_bf16",), "bf16"), (("avx512_vnni",), "fp32")])
def test_training_records_what_auto_picked_and_the_model_stores_auto(tmp_path, toy_corpus, cpu_with, capfd, flags, expected):
    cpu_with(*flags)
    out = tmp_path / "run"
    recipe = load_recipe(TINY_RECIPE, [f"data.path={toy_corpus}", f"out_dir={out}", "train.max_steps=10", "train.valid_every=10",
                                       "train.precision=auto", "decode.precision=auto"])
    train(recipe, progress=False)
    assert f"precision: {expected} (auto: " in capfd.readouterr().err
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["precision"] for e in entries if "precision" in e] == [expected]
    stored = json.loads((out / "config.json").read_text())["recipe"]
    assert stored["train"]["precision"] == stored["decode"]["precision"] == "auto"  # decided again where it is loaded
    cpu_with()  # another machine: no native bf16
    assert Translator.from_pretrained(out, "cpu").precision().name == "fp32"


@pytest.mark.parametrize("device", DEVICES)
def test_a_sentence_translates_the_same_alone_and_in_a_mixed_batch_on_every_device(tiny_model_dir, device):
    model = Translator.from_pretrained(tiny_model_dir, device).model
    tokenizer = Translator.from_pretrained(tiny_model_dir, "cpu").tokenizer

    def encode(sentences):
        src = source_tensor(tokenizer.encode(sentences)).to(device)
        return src, max_output_lengths(src, PAD_ID, 1.5, 5, 256)

    src, max_lens = encode(SENTENCES)
    assert (src == PAD_ID).any()  # the batch really mixes lengths
    batched_greedy, batched_beam = greedy_search(model, src, max_lens), beam_search(model, src, max_lens, 4, 0.6)
    for i, sentence in enumerate(SENTENCES):
        alone, alone_lens = encode([sentence])
        assert greedy_search(model, alone, alone_lens)[0].tokens == batched_greedy[i].tokens
        assert beam_search(model, alone, alone_lens, 4, 0.6)[0][0].tokens == batched_beam[i][0].tokens


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_a_run_stopped_and_resumed_ends_where_an_uninterrupted_one_does_on_every_device(tmp_path, toy_corpus, device):
    """Bitwise on the CPU; on a GPU within 1e-5, as atomics in some CUDA kernels add in any order."""
    def train_to(out, steps, resume=False):
        settings = [f"data.path={toy_corpus}", f"out_dir={out}", f"train.max_steps={steps}", "train.valid_every=20",
                    "train.checkpoint_every=10", "model.dropout=0.1", f"train.device={device}"]
        train(load_recipe(TINY_RECIPE, settings), progress=False, resume=resume)
        return load_file(training_checkpoints(out)[-1] / WEIGHTS)

    straight = train_to(tmp_path / "straight", 30)
    train_to(tmp_path / "stopped", 20)
    resumed = train_to(tmp_path / "stopped", 30, resume=True)
    tolerance = 0 if device == "cpu" else 1e-5
    assert all(torch.allclose(straight[k], resumed[k], rtol=0, atol=tolerance) for k in straight)


FAULTS_PER_ALLOCATION = """
import resource, sys, torch
from translator.devices import keep_freed_memory
acted = keep_freed_memory()
for _ in range(8):  # the heap settles: its first few blocks may still come from fresh pages
    torch.ones(16 * 2**20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 * 2**20)  # 64 MB, allocated, written and freed
print(acted, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults_unless_the_user_set_glibcs_malloc():
    """glibc maps a block over 32 MB afresh on every allocation (smaller ones too, until its threshold has
    adapted, and when it trims its heap): 16,384 pages of 4 KB to fault in for 64 MB. Kept, the block
    costs next to none. A user's own glibc malloc variables (here an empty GLIBC_TUNABLES) rule instead."""
    def run(**env):
        result = subprocess.run([sys.executable, "-c", FAULTS_PER_ALLOCATION], capture_output=True, text=True, check=True,
                                env={k: v for k, v in os.environ.items() if k not in devices.GLIBC_MALLOC_ENV} | env)
        acted, faults = result.stdout.split()
        return acted == "True", float(faults)

    (kept, faults_kept), (left, faults_left) = run(), run(GLIBC_TUNABLES="")
    assert kept and not left
    assert faults_left > 10 * faults_kept, (faults_left, faults_kept)


KERNELS_COMPILED = """
import torch
from translator.devices import keep_compiled_kernels
acted = keep_compiled_kernels()
linear, rows = torch.nn.Linear(8, 8).bfloat16(), torch.ones(1100, 8, dtype=torch.bfloat16)
with torch.inference_mode():
    for _ in range(2):  # 1,100 shapes, more than oneDNN's own 1,024, twice
        for n in range(1, 1101):
            linear(rows[:n])
print("acted", acted)
"""


def test_onednn_compiles_each_bf16_matmul_shape_once_unless_the_user_set_its_cache():
    """Where oneDNN runs bf16 matmuls (CPUs with bf16 instructions), each new shape compiles a kernel (a few
    small ones share one). Kept, the second pass over 1,100 shapes compiles none; at a user's own capacity of
    1,024, every one again."""
    def compiled(**env):
        result = subprocess.run([sys.executable, "-c", KERNELS_COMPILED], capture_output=True, text=True, check=True,
                                env={k: v for k, v in os.environ.items() if k not in devices.ONEDNN_CACHE_ENV} | {"ONEDNN_VERBOSE": "2"} | env)
        matmuls = [line for line in result.stdout.splitlines() if line.startswith("onednn_verbose") and ",create:" in line]
        return "acted True" in result.stdout, sum("cache_miss" in line for line in matmuls), len(matmuls)

    (acted, kept_misses, calls), (user_acted, user_misses, _) = compiled(), compiled(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024")
    if not calls:
        pytest.skip("torch does not run bf16 matmuls through oneDNN on this CPU")
    assert acted and not user_acted
    assert kept_misses > 1024 and user_misses == 2 * kept_misses, (kept_misses, user_misses)  # first pass alike: as many kernels as shapes
