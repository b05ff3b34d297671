"""Recipe loading: YAML + dotted overrides -> a frozen, validated Recipe; every error names the key."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from translator.config import (
    DataConfig,
    DecodeConfig,
    ModelConfig,
    Recipe,
    RecipeError,
    TokenizerConfig,
    TrainConfig,
    apply_overrides,
    load_recipe,
    recipe_from_dict,
)
from translator.train import fine_tuning_mismatches

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"
MULTI30K = ROOT / "recipes" / "multi30k_de_en.yaml"
SHIPPED = sorted((ROOT / "recipes").glob("*.yaml"))


def write_recipe(tmp_path: Path, values: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def tiny_values() -> dict:
    return yaml.safe_load(TINY.read_text(encoding="utf-8"))


# --- the shipped recipes ---------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_recipes_load(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    # Every value written in the file arrives in the Recipe (tuples for lists, floats for ints).
    for section, values in raw.items():
        if isinstance(values, dict):
            for key, value in values.items():
                got = getattr(getattr(recipe, section), key)
                assert got == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"
        else:
            assert getattr(recipe, section) == values, section


def test_tiny_recipe_values():
    recipe = load_recipe(TINY)
    assert recipe.name == "tiny"
    assert (recipe.model.d_model, recipe.model.n_heads) == (32, 2)
    assert recipe.train.precision == "fp32"
    assert recipe.decode.beam_size == 3
    # Keys left out take the dataclass defaults.
    assert recipe.train.betas == TrainConfig().betas
    assert recipe.decode.alpha == DecodeConfig().alpha


def test_multi30k_recipe_types():
    recipe = load_recipe(MULTI30K)
    assert recipe.data.name is None
    assert recipe.train.betas == (0.9, 0.98) and isinstance(recipe.train.betas, tuple)
    assert isinstance(recipe.train.lr, float)
    assert recipe.train.threads is None


def test_recipe_is_frozen():
    recipe = load_recipe(TINY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.seed = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.model.d_model = 64  # type: ignore[misc]


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"], ids=["empty", "blank", "comment", "document-marker"])
def test_empty_recipe_file_is_an_error_naming_it(tmp_path, text):
    # Not the defaults: those read bentrevett/multi30k from the hub, which the user never asked for.
    path = tmp_path / "empty.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}: the recipe is empty"):
        load_recipe(path)


@pytest.mark.parametrize(
    "content, line",
    [(b"name: caf\xe9\n", 1), (b"name: tiny\nseed: 1\ndata: {path: d\xff\xfe}\n", 3), (bytes(range(256)), 2)],  # byte 10 is a newline
    ids=["latin-1", "third-line", "binary"],
)
def test_recipe_that_is_not_utf8_names_the_file_and_line(tmp_path, content, line):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}, line {line}: not valid UTF-8"):
        load_recipe(path)


@pytest.mark.parametrize("text, line", [("train:\n  lr: 0.1\nseed: 3\ntrain:\n  max_steps: 5\n", 4), ("train:\n  lr: 0.1\n  lr: 0.2\n", 3)],
                         ids=["section", "key"])
def test_a_key_given_twice_names_its_second_line(tmp_path, text, line):
    # PyYAML keeps the last one silently: the first train section's settings would be lost.
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}, line {line}, column \d+: not valid YAML \('(train|lr)' is given twice\)$"):
        load_recipe(path)


def test_yaml_merge_keys_work_and_a_key_that_is_not_a_name_is_refused_by_its_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("model:\n  <<: {d_model: 64, n_heads: 2, d_ff: 256}\n  d_ff: 128\n", encoding="utf-8")
    model = load_recipe(path).model
    assert (model.d_model, model.n_heads, model.d_ff) == (64, 2, 128)  # merged, and overridden by the mapping's own key
    path.write_text("name: tiny\n[a, b]: 1\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(path))}, line 2, column 1: not valid YAML \(a key must be a name, got a list\)$"):
        load_recipe(path)


def test_recipe_with_a_control_character_names_the_line_on_one_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"name: tiny\nseed: \x00\x01\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert str(info.value).startswith(f"{path}, line 2: not valid YAML") and "\n" not in str(info.value)


# --- unknown keys ----------------------------------------------------------------------------


def test_unknown_key_in_file_suggests_nearest(tmp_path):
    values = tiny_values()
    values["model"]["d_modle"] = 64
    with pytest.raises(RecipeError, match=r"model\.d_modle.*did you mean model\.d_model"):
        load_recipe(write_recipe(tmp_path, values))


def test_unknown_key_in_override_suggests_nearest():
    with pytest.raises(RecipeError, match=r"model\.d_modle.*did you mean model\.d_model"):
        load_recipe(TINY, ["model.d_modle=64"])


def test_unknown_section_suggests_nearest(tmp_path):
    values = tiny_values()
    values["modle"] = values.pop("model")
    with pytest.raises(RecipeError, match=r"modle.*did you mean model\b"):
        load_recipe(write_recipe(tmp_path, values))


def test_unknown_key_without_near_match_lists_valid_keys():
    with pytest.raises(RecipeError, match=r"train\.zzzzzz.*valid keys:.*max_tokens"):
        load_recipe(TINY, ["train.zzzzzz=1"])


# --- wrong types -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, expected",
    [
        ('model.n_heads="four"', "model.n_heads", "an integer"),
        ("model.n_heads=four", "model.n_heads", "an integer"),
        ("model.d_model=32.0", "model.d_model", "an integer"),
        ("train.max_steps=true", "train.max_steps", "an integer"),  # bool is not an int here, although it is in Python
        ("seed=false", "seed", "an integer"),
        ("seed=1.5", "seed", "an integer"),
        ("train.lr=true", "train.lr", "a finite number"),
        ("train.lr=fast", "train.lr", "a finite number"),
        ("train.lr=[0.1]", "train.lr", "a finite number"),
        ("train.precision=fp8", "train.precision", "one of 'auto', 'fp32', 'bf16', 'fp16'"),
        ("tokenizer.model_type=wordpiece", "tokenizer.model_type", "one of 'unigram', 'bpe'"),
        ("model.norm=sandwich", "model.norm", "one of 'pre', 'post'"),
        ("train.betas=0.9", "train.betas", "a list of 2 values"),
        ("train.betas=[0.9, 0.98, 0.999]", "train.betas", "a list of 2 values"),
        ("train.betas=[0.9, yes]", "train.betas[1]", "a finite number"),
        ("train.threads=two", "train.threads", "an integer"),
        ("data.name=3", "data.name", "a non-empty string"),
        ("data.path=[a, b]", "data.path", "a non-empty string"),
        ("model=3", "model", "a mapping of ModelConfig keys"),
    ],
)
def test_wrong_type_names_the_key(override, key, expected):
    with pytest.raises(RecipeError, match=rf"^{re.escape(key)}: got .*, expected {re.escape(expected)}"):
        load_recipe(TINY, [override])


def test_wrong_type_in_file_names_the_key(tmp_path):
    values = tiny_values()
    values["model"]["n_heads"] = "four"
    with pytest.raises(RecipeError, match=r"model\.n_heads.*'four'.*integer"):
        load_recipe(write_recipe(tmp_path, values))


def test_string_float_is_accepted(tmp_path):
    # PyYAML (YAML 1.1) reads `1e-3` (no dot) as a string: the recipe must still take it as a number.
    path = tmp_path / "recipe.yaml"
    path.write_text("train:\n  lr: 1e-3\n  label_smoothing: 5e-2\n", encoding="utf-8")
    assert isinstance(yaml.safe_load(path.read_text())["train"]["lr"], str)  # the premise
    recipe = load_recipe(path)
    assert recipe.train.lr == pytest.approx(1e-3) and isinstance(recipe.train.lr, float)
    assert recipe.train.label_smoothing == pytest.approx(0.05)
    assert load_recipe(TINY, ["train.lr=1e-3"]).train.lr == pytest.approx(1e-3)


def test_ints_are_accepted_for_floats():
    recipe = load_recipe(TINY, ["train.lr=1", "model.dropout=0"])
    assert recipe.train.lr == 1.0 and isinstance(recipe.train.lr, float)
    assert recipe.model.dropout == 0.0 and isinstance(recipe.model.dropout, float)


# --- out-of-range values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.dropout=-0.1"], "model.dropout"),
        (["model.dropout=1.0"], "model.dropout"),
        (["model.d_model=30", "model.n_heads=4"], "model.d_model"),
        (["model.n_heads=0"], "model.n_heads"),
        (["model.d_ff=-1"], "model.d_ff"),
        (["model.encoder_layers=0"], "model.encoder_layers"),
        (["decode.beam_size=0"], "decode.beam_size"),
        (["decode.alpha=-1"], "decode.alpha"),
        (["decode.max_len_b=0"], "decode.max_len_b"),
        (["decode.max_tokens=0"], "decode.max_tokens"),
        (["data.src_lang=en", "data.tgt_lang=en"], "data.tgt_lang"),
        (["data.max_len=0"], "data.max_len"),
        (["tokenizer.vocab_size=4"], "tokenizer.vocab_size"),
        (["tokenizer.character_coverage=0"], "tokenizer.character_coverage"),
        (["tokenizer.character_coverage=1.5"], "tokenizer.character_coverage"),
        (["train.lr=0"], "train.lr"),
        (["train.lr=-1e-3"], "train.lr"),
        (["train.max_tokens=0"], "train.max_tokens"),
        (["train.warmup_steps=-1"], "train.warmup_steps"),
        (["train.betas=[0.9, 1.0]"], "train.betas"),
        (["train.label_smoothing=1"], "train.label_smoothing"),
        (["train.clip_norm=-1"], "train.clip_norm"),
        (["train.weight_decay=-0.1"], "train.weight_decay"),
        (["tokenizer.input_sentence_size=0"], "tokenizer.input_sentence_size"),
        (["tokenizer.input_sentence_size=100"], "tokenizer.input_sentence_size"),  # SentencePiece refuses 1-100 only once it has read the data
        (["train.threads=0"], "train.threads"),
        (["train.rdrop_alpha=-1"], "train.rdrop_alpha"),
        (["decode.rerank_weight=-0.5"], "decode.rerank_weight"),
        (["data.subword_sampling=1.5"], "data.subword_sampling"),
        (["data.subword_sampling=0.3", "data.streaming=true"], "data.subword_sampling"),
        # values that validated and then failed deep inside, after the data had loaded (or a model directory would not load)
        (["model.d_model=33", "model.n_heads=3"], "model.d_model"),  # odd: the position table pairs sines and cosines
        (["model.max_positions=1000000000000"], "model.max_positions"),
        (["tokenizer.character_coverage=0.97"], "tokenizer.character_coverage"),  # SentencePiece takes [0.98, 1]
        (["tokenizer.vocab_size=1099511627776"], "tokenizer.vocab_size"),
        (["tokenizer.input_sentence_size=18446744073709551616"], "tokenizer.input_sentence_size"),
        (["train.threads=2147483648"], "train.threads"),
        ([f"decode.rerank_weight=1{'0' * 400}"], "decode.rerank_weight"),  # float() of it would overflow
    ],
)
def test_out_of_range_names_the_key(overrides, key):
    with pytest.raises(RecipeError, match=rf"^{re.escape(key)}: got "):
        load_recipe(TINY, overrides)


def test_d_model_not_divisible_message_mentions_n_heads():
    with pytest.raises(RecipeError, match=r"model\.d_model: got 30.*multiple of model\.n_heads=4"):
        load_recipe(TINY, ["model.d_model=30", "model.n_heads=4"])


def test_negative_max_len_a_names_max_len_a():
    with pytest.raises(RecipeError, match=r"^decode\.max_len_a: got "):
        load_recipe(TINY, ["decode.max_len_a=-1"])


@pytest.mark.parametrize("seed", [-1, 2**32, 2**70])
def test_seed_outside_numpys_range_is_rejected(seed):
    with pytest.raises(RecipeError, match=rf"^seed: got {seed}"):
        load_recipe(TINY, [f"seed={seed}"])
    assert load_recipe(TINY, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


NUMBER_KEYS = [
    f"{section}.{f.name}"
    for section, cls in (("data", DataConfig), ("tokenizer", TokenizerConfig), ("model", ModelConfig), ("train", TrainConfig), ("decode", DecodeConfig))
    for f in dataclasses.fields(cls)
    if f.type in ("float", "float | None")
]


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "inf", "nan", "'Infinity'", "1e999"])
@pytest.mark.parametrize("key", NUMBER_KEYS)
def test_non_finite_numbers_are_rejected_for_every_float_key(key, value):
    # Range checks let these through: `nan >= 0` is False but so is `nan < 0`, and inf passes every lower bound.
    with pytest.raises(RecipeError, match=rf"^{re.escape(key)}: got .*, expected a finite number"):
        load_recipe(TINY, [f"{key}={value}"])


def test_non_finite_numbers_are_rejected_inside_lists_and_files(tmp_path):
    assert "train.clip_norm" in NUMBER_KEYS and "data.max_ratio" in NUMBER_KEYS  # the keys with no upper bound
    with pytest.raises(RecipeError, match=r"^train\.betas\[1\]: got nan, expected a finite number"):
        load_recipe(TINY, ["train.betas=[0.9, .nan]"])
    values = tiny_values()
    values["train"]["clip_norm"] = float("inf")
    with pytest.raises(RecipeError, match=r"^train\.clip_norm: got inf"):
        load_recipe(write_recipe(tmp_path, values))


STRING_KEYS = ["name", "out_dir"] + [f"data.{f.name}" for f in dataclasses.fields(DataConfig) if f.type in ("str", "str | None")]


@pytest.mark.parametrize("value", ["''", "'  '", "'\t'"], ids=["empty", "spaces", "tab"])
@pytest.mark.parametrize("key", STRING_KEYS)
def test_empty_strings_are_rejected_for_paths_and_names(key, value):
    # An empty data.path or out_dir is the current directory: training would read or write there.
    assert {"out_dir", "data.path", "data.name", "data.train_split"} <= set(STRING_KEYS)
    with pytest.raises(RecipeError, match=rf"^{re.escape(key)}: got .*, expected a non-empty string"):
        load_recipe(TINY, [f"{key}={value}"])


def test_valid_edge_values_are_accepted():
    recipe = load_recipe(
        TINY,
        ["model.dropout=0", "decode.beam_size=1", "decode.alpha=0", "train.warmup_steps=0", "train.clip_norm=0", "train.threads=1"],
    )
    assert (recipe.model.dropout, recipe.decode.beam_size, recipe.train.warmup_steps) == (0.0, 1, 0)


# --- files and overrides ---------------------------------------------------------------------


def test_missing_recipe_file_names_the_file(tmp_path):
    missing = tmp_path / "nope" / "missing.yaml"
    with pytest.raises(RecipeError, match=re.escape(str(missing))):
        load_recipe(missing)


def test_invalid_yaml_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [1, 2\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=re.escape(str(path))):
        load_recipe(path)


def test_top_level_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=re.escape(str(path))):
        load_recipe(path)


@pytest.mark.parametrize("override", ["foo", "model.d_model", "=3", " =3"])
def test_malformed_override_is_an_error(override):
    with pytest.raises(RecipeError, match=r"expected KEY=VALUE"):
        load_recipe(TINY, [override])


def test_override_into_a_scalar_is_an_error():
    with pytest.raises(RecipeError, match=r"name is not a section"):
        load_recipe(TINY, ["name.x=1"])


def test_override_with_invalid_yaml_is_an_error():
    with pytest.raises(RecipeError, match=r"train\.betas=\[0\.9.*not valid YAML"):
        load_recipe(TINY, ["train.betas=[0.9, 0.98"])


def test_overrides_parse_yaml_values():
    recipe = load_recipe(
        MULTI30K,
        ["train.betas=[0.8, 0.9]", "data.name=null", "model.dropout=0.25", "train.max_steps=7", "data.path=some/folder", "name=x=y"],
    )
    assert recipe.train.betas == (0.8, 0.9) and isinstance(recipe.train.betas, tuple)
    assert recipe.data.name is None
    assert recipe.model.dropout == 0.25
    assert recipe.train.max_steps == 7
    assert recipe.data.path == "some/folder"
    assert recipe.name == "x=y"  # only the first '=' separates key and value


def test_override_sets_a_name_left_null_in_the_file():
    recipe = load_recipe(MULTI30K, ["data.name=de-en"])
    assert recipe.data.name == "de-en"


def test_later_override_wins():
    assert load_recipe(TINY, ["train.max_steps=5", "train.max_steps=9"]).train.max_steps == 9


def test_override_creates_a_missing_section():
    # A section absent from the file is created by an override into it.
    values = {"name": "x"}
    out = apply_overrides(values, ["tokenizer.model_type=bpe"])
    assert out == {"name": "x", "tokenizer": {"model_type": "bpe"}}
    assert values == {"name": "x"}  # the input is not modified


def test_apply_overrides_does_not_modify_sections_of_the_input():
    values = tiny_values()
    before = tiny_values()
    apply_overrides(values, ["model.d_model=64"])
    assert values == before


def test_overrides_are_validated_like_the_file():
    with pytest.raises(RecipeError, match=r"^model\.d_model: got 33"):
        load_recipe(TINY, ["model.d_model=33"])  # tiny has n_heads 2


# --- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_to_dict_round_trips(path):
    recipe = load_recipe(path, ["train.betas=[0.8, 0.9]", "train.threads=2"])
    as_dict = recipe.to_dict()
    assert isinstance(as_dict["train"]["betas"], list)  # plain YAML/JSON types
    again = recipe_from_dict(as_dict)
    assert again == recipe
    # ... and through YAML text, as a model directory or a resumed run would store it.
    assert recipe_from_dict(yaml.safe_load(yaml.safe_dump(as_dict))) == recipe


def test_to_dict_round_trips_defaults():
    assert recipe_from_dict(Recipe().to_dict()) == Recipe()


def test_recipe_from_dict_validates_nested_sections():
    values = Recipe().to_dict()
    values["model"]["n_heads"] = 3  # 256 is not a multiple of 3
    with pytest.raises(RecipeError, match=r"^model\.d_model"):
        recipe_from_dict(values)


def test_leaf_configs_default_valid():
    for cls in (DataConfig, ModelConfig, TrainConfig, DecodeConfig):
        cls().validate()


def test_attention_and_activation_dropout_follow_model_dropout_unless_set():
    model = load_recipe(TINY, ["model.dropout=0.2"]).model
    assert model.attention_dropout == model.activation_dropout == 0.2
    model = load_recipe(TINY, ["model.dropout=0.2", "model.activation_dropout=0"]).model
    assert (model.attention_dropout, model.activation_dropout) == (0.2, 0.0)


def test_the_multi30k_recipes_differ_only_in_their_languages_names_and_length_penalty():
    """The en-de and en-fr recipes promise the de-en recipe's settings; the length penalty and the reranking weight are
    chosen per pair on validation."""
    main = load_recipe(MULTI30K).to_dict()
    for pair in ("en_de", "en_fr"):
        other = load_recipe(ROOT / "recipes" / f"multi30k_{pair}.yaml").to_dict()
        src, tgt = pair.split("_")
        assert (other["data"]["src_lang"], other["data"]["tgt_lang"]) == (src, tgt)
        for recipe in (main, other):
            recipe.update(name=None, out_dir=None)
            recipe["data"].update(src_lang=None, tgt_lang=None)
            recipe["decode"].update(alpha=None, rerank_weight=None)
        assert other == main


def test_the_distilled_recipe_trains_the_en_de_settings_on_the_distilled_folder():
    """Its figures compare a student with its teachers: only the data, the model it starts from, the names and the
    decoding it chose may differ. It starts from the quick de-en recipe's model, which it must describe key for key."""
    plain = load_recipe(ROOT / "recipes" / "multi30k_en_de.yaml")
    distilled = load_recipe(ROOT / "recipes" / "multi30k_en_de_distilled.yaml")
    quick = load_recipe(ROOT / "recipes" / "multi30k_de_en_quick.yaml")
    assert distilled.data.path == "runs/multi30k_en_de_distilled_data"  # where the commands in its header write
    assert distilled.train.init_from == quick.out_dir  # what the first command in its header trains
    assert fine_tuning_mismatches(quick, distilled) == []  # or init_from would refuse it
    plain, distilled = plain.to_dict(), distilled.to_dict()
    for recipe in (plain, distilled):
        recipe.update(name=None, out_dir=None)
        recipe["data"].update(path=None)
        recipe["train"].update(init_from=None)
        recipe["decode"].update(alpha=None, rerank_weight=None)
    assert distilled == plain
