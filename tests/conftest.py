"""Shared fixtures: a tiny synthetic parallel corpus the tests build themselves, and a tiny trained model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

from translator import Translator, load_recipe, train
from translator.devices import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
TINY_RECIPE = ROOT / "recipes" / "tiny.yaml"
MULTI30K = ROOT.parent / "shared" / "data" / "multi30k"

# int8 copies built in different processes (the CLI's, this one's) must decode alike: one engine for the
# output projection instead of the one each process times faster (translator/quantize.py).
os.environ.setdefault("TRANSLATOR_INT8_ENGINE", torch.backends.quantized.engine)

# On AMD CPUs CTranslate2 multiplies int8 through oneDNN, whose kernels on a CPU without VNNI (AVX2
# only: AMD before Zen 4) add products in 16 bits, which saturate: on a Zen 3, 2 of test_export's 67
# int8 greedy outputs equal ours, against 60 on Intel MKL's kernels (CT2_USE_MKL=1, CTranslate2's
# default on Intel CPUs; docs/deployment.md, session 26). So that the test checks the export rather
# than oneDNN's rounding, MKL is asked for there; CTranslate2 reads the variable when it is imported.
if "avx2" in cpu_flags() and not cpu_flags() & {"avx512_vnni", "avx_vnni"}:
    os.environ.setdefault("CT2_USE_MKL", "1")

# Tests of properties that must hold on every device take `device` from DEVICES: on a machine with a
# GPU they run there too (fused attention, F.cross_entropy); elsewhere the CUDA case is skipped.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))]

# A word-for-word "German -> English" toy language: learnable in a minute, real enough for BLEU.
LEXICON = {
    "ein": "a", "der": "the", "mann": "man", "frau": "woman", "hund": "dog", "kind": "child",
    "rote": "red", "kleine": "small", "alte": "old", "fährt": "rides", "sieht": "sees", "trägt": "carries",
    "ball": "ball", "fahrrad": "bicycle", "hut": "hat", "und": "and",
}
SUBJECTS, ADJECTIVES, VERBS, OBJECTS = ["mann", "frau", "hund", "kind"], ["rote", "kleine", "alte"], ["fährt", "sieht", "trägt"], ["ball", "fahrrad", "hut"]


def toy_pair(rng: random.Random) -> dict[str, str]:
    words = [rng.choice(["ein", "der"])]
    if rng.random() < 0.5:
        words.append(rng.choice(ADJECTIVES))
    words += [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(["ein", "der"]), rng.choice(OBJECTS)]
    if rng.random() < 0.3:
        words += ["und", rng.choice(["ein", "der"]), rng.choice(OBJECTS)]
    de = " ".join(words)
    en = " ".join(LEXICON[w] for w in words)
    return {"de": de.capitalize() + ".", "en": en.capitalize() + "."}


def write_toy_corpus(folder: Path, sizes=(("train", 1200), ("validation", 60), ("test", 60)), seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for _ in range(n):
                f.write(json.dumps(toy_pair(rng), ensure_ascii=False) + "\n")
    return folder


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy CPU OpenMP's waiting makes them ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_corpus(tmp_path_factory) -> Path:
    return write_toy_corpus(tmp_path_factory.mktemp("toy_corpus"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, toy_corpus) -> Path:
    """The tiny recipe trained on the toy corpus (once per test session)."""
    return train_tiny(tmp_path_factory.mktemp("tiny_model"), toy_corpus, steps=150)


def train_tiny(out: Path, corpus: Path, steps: int, *overrides: str) -> Path:
    """The tiny recipe trained on `corpus` for `steps` updates (validated once, at the end) into `out`."""
    recipe = load_recipe(TINY_RECIPE, [f"data.path={corpus}", f"out_dir={out}", f"train.max_steps={steps}", f"train.valid_every={steps}", *overrides])
    train(recipe, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_translator(tiny_model_dir) -> Translator:
    return Translator.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def reverse_model_dir(tmp_path_factory, toy_corpus) -> Path:
    """A tiny model of the reverse pair (en to de) on the same corpus: reranking tiny_translator's beam."""
    return train_tiny(tmp_path_factory.mktemp("tiny_en_de"), toy_corpus, 100, "data.src_lang=en", "data.tgt_lang=de")


@pytest.fixture(scope="session")
def reverse(reverse_model_dir) -> Translator:
    return Translator.from_pretrained(reverse_model_dir)
