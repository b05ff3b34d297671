"""The recipe: frozen, typed dataclasses read from YAML and validated once, here.

Every other module receives a `Recipe` (or plain numbers) and trusts it: unknown keys,
wrong types and out-of-range values are rejected at load time with a `RecipeError`
that names the dotted key, the value and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import numbers
import sys
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class RecipeError(ValueError):
    """A recipe or override that cannot be used; the message names the key."""


@dataclass(frozen=True)
class DataConfig:
    path: str = "bentrevett/multi30k"  # anything `datasets.load_dataset` takes, or a local folder of split files
    name: str | None = None  # the hub dataset's configuration, e.g. "de-en" for wmt14
    src_lang: str = "de"
    tgt_lang: str = "en"
    train_split: str = "train"
    valid_split: str = "validation"
    test_split: str | None = "test"  # scored once at the end of training (None: no test split)
    max_len: int = 128  # training pairs with more subword tokens on either side are dropped
    num_proc: int | None = None  # processes for tokenizing with datasets.map (None: this one)
    max_ratio: float = 9.0  # training pairs whose longer side has more than this many times the shorter's tokens are dropped (0: off)
    subword_sampling: float = 0.0  # training pairs segmented anew each epoch by sampling (unigram: alpha, e.g. 0.3-0.5; bpe: BPE-dropout, e.g. 0.1); 0: off
    streaming: bool = False  # read the training split as a stream (a corpus too large for the disk): pools of it are shuffled and bucketed as they arrive

    def validate(self) -> None:
        _check(self.src_lang != self.tgt_lang, "data.tgt_lang", self.tgt_lang, "a language other than data.src_lang")
        _check(self.max_len > 0, "data.max_len", self.max_len, "a positive number of tokens")
        _check(self.num_proc is None or self.num_proc >= 1, "data.num_proc", self.num_proc, "a positive integer or null")
        _check(self.max_ratio == 0 or self.max_ratio >= 1, "data.max_ratio", self.max_ratio, "0 (off) or at least 1")
        _check(0 <= self.subword_sampling <= 1, "data.subword_sampling", self.subword_sampling, "in [0, 1] (0: off)")
        _check(not (self.streaming and self.subword_sampling), "data.subword_sampling", self.subword_sampling, "0 with data.streaming")


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 8000
    model_type: Literal["unigram", "bpe"] = "unigram"
    character_coverage: float = 1.0
    input_sentence_size: int = 2_000_000  # sentences sampled to train SentencePiece (bounds its memory)

    def validate(self) -> None:
        _check(8 <= self.vocab_size < 2**31, "tokenizer.vocab_size", self.vocab_size, "at least 8 (and under 2**31)")
        _check(0.98 <= self.character_coverage <= 1, "tokenizer.character_coverage", self.character_coverage,
               "in [0.98, 1] (SentencePiece's range)")
        _check(100 < self.input_sentence_size < 2**31, "tokenizer.input_sentence_size", self.input_sentence_size,
               "over 100 sentences (SentencePiece's least) and under 2**31")


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 256
    n_heads: int = 4
    d_ff: int = 1024
    encoder_layers: int = 3
    decoder_layers: int = 3
    dropout: float = 0.1  # on embeddings and on every sublayer's output (Vaswani et al., 5.4)
    attention_dropout: float | None = None  # on attention weights (None: model.dropout)
    activation_dropout: float | None = None  # inside the feed-forward, after the ReLU (None: model.dropout)
    max_positions: int = 1024  # longest source or target the sinusoidal table covers
    norm: Literal["pre", "post"] = "pre"  # pre: LayerNorm on each sublayer's input, and after each stack; post: on each residual sum (Vaswani et al.; fairseq's default)

    def __post_init__(self):
        for key in ("attention_dropout", "activation_dropout"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, self.dropout)  # frozen: resolved once, here

    def validate(self) -> None:
        for key in ("d_model", "n_heads", "d_ff", "encoder_layers", "decoder_layers", "max_positions"):
            _check(getattr(self, key) > 0, f"model.{key}", getattr(self, key), "a positive integer")
        _check(self.d_model % self.n_heads == 0, "model.d_model", self.d_model, f"a multiple of model.n_heads={self.n_heads}")
        _check(self.d_model % 2 == 0, "model.d_model", self.d_model, "an even number (the position table pairs a sine and a cosine)")
        _check(self.max_positions <= 65_536, "model.max_positions", self.max_positions, "at most 65,536 (a table row a position)")
        for key in ("dropout", "attention_dropout", "activation_dropout"):
            _check(0 <= getattr(self, key) < 1, f"model.{key}", getattr(self, key), "in [0, 1)")


@dataclass(frozen=True)
class TrainConfig:
    max_tokens: int = 4096  # per batch: sentences x longest side, padding included
    accum_steps: int = 1  # batches whose gradients add up to one update (an effective batch of accum_steps x max_tokens)
    max_steps: int = 3000
    lr: float = 1e-3  # peak, reached at the end of warmup
    warmup_steps: int = 500
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    label_smoothing: float = 0.1
    clip_norm: float = 1.0
    on_nan: Literal["stop", "skip"] = "stop"  # a non-finite loss: stop (the last checkpoint stays good) or skip that update with a warning
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: the fastest that keeps quality here (devices.py); fp16 adds a gradient scaler
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: the GPU when torch sees one; under torchrun, GPU LOCAL_RANK
    log_every: int = 50
    valid_every: int = 500
    checkpoint_every: int = 500  # steps between training checkpoints (resumable; also written at the end and on SIGINT/SIGTERM)
    keep_checkpoints: int = 2  # the newest this many are kept, and the one with the best validation BLEU
    patience: int | None = None  # stop after this many validations without a better BLEU (None: never)
    average_last: int = 0  # at the end, the model's weights become the mean of the last N checkpoints (0: the best by BLEU)
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (one per core)
    rdrop_alpha: float = 0.0  # R-Drop (Liang et al., 2021): each batch twice under two dropout masks, + alpha x their symmetric KL (0: off)
    init_from: str | None = None  # fine-tuning: a model directory whose weights and SentencePiece model the run starts from (None: fresh ones)

    def validate(self) -> None:
        for key in ("max_tokens", "accum_steps", "max_steps", "log_every", "valid_every", "checkpoint_every", "keep_checkpoints"):
            _check(getattr(self, key) > 0, f"train.{key}", getattr(self, key), "a positive integer")
        _check(self.lr > 0, "train.lr", self.lr, "a positive learning rate")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "zero or more")
        _check(all(0 <= b < 1 for b in self.betas), "train.betas", list(self.betas), "two numbers in [0, 1)")
        _check(0 <= self.label_smoothing < 1, "train.label_smoothing", self.label_smoothing, "in [0, 1)")
        _check(self.clip_norm >= 0, "train.clip_norm", self.clip_norm, "zero (off) or more")
        _check(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "zero (off) or more")
        _check(self.threads is None or 0 < self.threads <= 4096, "train.threads", self.threads, "1 to 4096, or null")
        _check(self.rdrop_alpha >= 0, "train.rdrop_alpha", self.rdrop_alpha, "zero (off) or more")
        _check(self.patience is None or self.patience > 0, "train.patience", self.patience, "a positive integer or null")
        _check(self.average_last == 0 or 2 <= self.average_last <= self.keep_checkpoints, "train.average_last",
               self.average_last, f"0, or 2 to train.keep_checkpoints={self.keep_checkpoints}")


@dataclass(frozen=True)
class DecodeConfig:
    beam_size: int = 5
    alpha: float = 0.6  # GNMT length penalty ((5 + len) / 6) ** alpha; 0 ranks by raw log-probability
    beam_stop: Literal["exact", "first_k"] = "exact"  # exact: a sentence ends once no open hypothesis can beat its K best finished ones;
    # first_k: at its first K finished hypotheses (fairseq's and CTranslate2's rule): fewer steps, may miss a longer better one
    max_len_a: float = 1.5  # output length limit: a * source_length + b
    max_len_b: int = 10
    max_tokens: int = 8192  # per inference batch: source sentences x longest source
    precision: Literal["auto", "fp32", "bf16", "fp16", "int8"] = "auto"  # auto: bf16 where the CPU or GPU runs it natively, else fp32 (CPU) or fp16 (GPU); int8: CPU only
    rerank_weight: float = 1.0  # with a reverse model (translate(rerank=...), --rerank-with): its weight in reranking the beam

    def validate(self) -> None:
        _check(self.beam_size >= 1, "decode.beam_size", self.beam_size, "at least 1")
        _check(self.rerank_weight >= 0, "decode.rerank_weight", self.rerank_weight, "zero or more")
        _check(0 <= self.alpha <= 10, "decode.alpha", self.alpha, "0 to 10 (past that, the length alone ranks the hypotheses)")
        _check(self.max_len_a >= 0, "decode.max_len_a", self.max_len_a, "zero or more")
        _check(self.max_len_b >= 1, "decode.max_len_b", self.max_len_b, "at least 1")
        _check(self.max_tokens > 0, "decode.max_tokens", self.max_tokens, "a positive integer")


# sacreBLEU's BLEU tokenizers (ja-mecab and ko-mecab need `pip install sacrebleu[ja]` / `sacrebleu[ko]`)
BleuTokenizer = Literal["13a", "intl", "zh", "ja-mecab", "ko-mecab", "char", "none", "flores101", "flores200", "spm"]


@dataclass(frozen=True)
class EvaluateConfig:
    tokenize: BleuTokenizer | None = None  # BLEU's tokenizer; None: sacreBLEU's choice for data.tgt_lang (zh, ja-mecab, ko-mecab, else 13a)
    lowercase: bool = False  # BLEU and chrF on lowercased text (sacreBLEU's lowercase=True, "case:lc" in the signature); default cased


@dataclass(frozen=True)
class Recipe:
    name: str = "run"
    out_dir: str = "runs/run"
    seed: int = 1234
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def validate(self) -> None:
        _check(0 <= self.seed < 2**32, "seed", self.seed, "0 to 2**32 - 1 (numpy's seed range)")
        _check(self.data.max_len + 1 <= self.model.max_positions, "data.max_len", self.data.max_len,
               f"at most model.max_positions - 1 = {self.model.max_positions - 1} (a sentence takes one more position for bos/eos)")

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    """asdict keeps tuples; YAML and JSON want lists."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise RecipeError(f"{key}: got {value!r}, expected {expected}")


def _convert(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against a type hint (and convert lists to tuples); raise naming the key."""
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: got {value!r}, expected a mapping of {hint.__name__} keys")
        return _build(hint, value, key + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _convert(value, inner, key)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise RecipeError(f"{key}: got {value!r}, expected one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        items = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(items):
            raise RecipeError(f"{key}: got {value!r}, expected a list of {len(items)} values")
        return tuple(_convert(v, h, f"{key}[{i}]") for i, (v, h) in enumerate(zip(value, items)))
    if hint is float:
        # YAML 1.1 reads "1e-3" as a string; accept what float() accepts, but never a bool.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        # No key means anything by infinity or NaN (off is 0 or null), and `nan > 0` is False: every range check would pass it.
        # numbers.Real: numpy's numbers too (a value from an array), as Sampling takes them
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and abs(value) <= sys.float_info.max:  # an int past it would overflow float()
            return float(value)
        raise RecipeError(f"{key}: got {value!r:.40}, expected a finite number")
    if hint is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise RecipeError(f"{key}: got {value!r}, expected an integer")
    if hint is str:
        if isinstance(value, str) and value.strip():  # "" as a path is the current directory; as a name, nothing
            return value
        raise RecipeError(f"{key}: got {value!r}, expected a non-empty string")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{key}: got {value!r}, expected true or false")
    raise TypeError(f"unsupported type hint {hint!r} for {key}")  # a bug in this file, not in the recipe


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(names)}"
            raise RecipeError(f"unknown recipe key {prefix}{key}{hint}")
        kwargs[key] = _convert(value, hints[key], prefix + key)
    built = cls(**kwargs)
    if hasattr(built, "validate"):
        built.validate()
    return built


def recipe_from_dict(values: dict[str, Any]) -> Recipe:
    if not isinstance(values, dict):
        raise RecipeError(f"expected a mapping of recipe sections, got {type(values).__name__}")
    return _build(Recipe, values)


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.key=value` strings; values are parsed as YAML (`3`, `0.1`, `null`, `[0.9, 0.98]`)."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted.strip():
            raise RecipeError(f"override {item!r}: expected KEY=VALUE, e.g. data.path=../shared/data/multi30k")
        *sections, key = dotted.strip().split(".")
        target = values
        for section in sections:
            target = target.setdefault(section, {})
            if not isinstance(target, dict):
                raise RecipeError(f"override {item!r}: {section} is not a section")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise RecipeError(f"override {item!r}: the value is not valid YAML ({e.problem})") from None
        # YAML 1.1 reads no/yes/on/off as booleans: data.tgt_lang=no means Norwegian.
        target[key] = raw.strip() if isinstance(value, bool) and raw.strip().lower() not in ("true", "false") else value
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping: PyYAML keeps the last silently, so a second
    `train:` section would drop the first one's settings."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden here, as YAML says
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                raise yaml.constructor.ConstructorError(None, None, f"a key must be a name, got a {type(key).__name__}", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"{key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read a YAML recipe, apply dotted overrides, and validate everything."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: {path}" + (" (that is a directory)" if path.exists() else ""))
    try:
        values = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise RecipeError(f"{path}, line {line}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except yaml.reader.ReaderError as e:  # a control character: the file is binary, or was damaged
        line = path.read_text(encoding="utf-8")[: e.position].count("\n") + 1
        raise RecipeError(f"{path}, line {line}: not valid YAML (character {chr(e.character)!r}: {e.reason})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if values is None:  # an empty file would silently train the defaults, from the hub
        raise RecipeError(f"{path}: the recipe is empty; start from one in recipes/")
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: expected a mapping of recipe sections at the top level")
    return recipe_from_dict(apply_overrides(values, list(overrides)))
