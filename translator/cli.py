"""Command line: `translator train | translate | score | evaluate | distill | export | average | plot | serve`.

Results go to stdout; progress bars and logs to stderr. Exit status: 0 ok, 1 runtime
failure, 2 usage error (a bad recipe, override, dataset or model directory).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .config import RecipeError, apply_overrides, load_recipe, recipe_from_dict

EXAMPLES = """examples:
  translator train recipes/multi30k_de_en.yaml --set data.path=../shared/data/multi30k
  translator train recipes/multi30k_de_en.yaml --set train.init_from=runs/multi30k_de_en --set data.path=my_domain_data --set out_dir=runs/domain  # fine-tune
  translator translate runs/multi30k_de_en --precision int8 < input.de > output.en
  translator translate runs/multi30k_de_en -i input.de -o nbest.tsv --beam-size 5 --n-best 5
  translator translate runs/multi30k_de_en --rerank-with runs/multi30k_en_de < input.de   # the beam reranked by the reverse model
  translator score runs/multi30k_de_en --source corpus.de --target corpus.en > scores.txt   # log p(target | source) a line
  translator evaluate runs/multi30k_de_en --split test --beam-size 5 --output hyps.en
  translator evaluate runs/en_de_seed1 runs/en_de_seed2 --split test     # an ensemble of two models
  translator distill runs/multi30k_en_de runs/multi30k_en_de_distilled_data  # a teacher's training data for a student
  translator serve runs/multi30k_de_en --port 8000
  translator export runs/multi30k_de_en --to ctranslate2 ct2_model --quantization int8

exit status: 0 ok, 1 runtime failure, 2 usage error (recipe, override, dataset or model directory)
"""


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train  # the trainer is imported only by the command that trains

    recipe = load_recipe(args.recipe, args.set)
    results = train(recipe, progress=not args.quiet, resume="auto" if args.auto_resume else args.resume)
    for name, scores in results.items():  # empty on every process but rank 0 under torchrun
        print(f"test ({name}): {scores}")
    if results:
        print(f"model directory: {recipe.out_dir}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun (read as distributed.join reads it)
        # DistributedDataParallel keeps gloo's worker threads alive past destroy_process_group (pt_gloo_runloop
        # outlives it, even with the wrapper deleted), and their teardown at interpreter exit now and then aborted
        # a rank (SIGABRT, "terminate called without an active exception"): torchrun then killed rank 0 in its
        # test scoring. Every rank has written and closed what it writes by now: leave without that teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def load_translator(model_dir: str | list[str], overrides: list[str], device: str = "auto", precision: str | None = None, announce: bool = False,
                    workers: int = 1, small_batches: bool = False):
    """The model directory (several: an ensemble) on `device`, with `--set` overrides applied to its recipe (data.*, decode.*,
    evaluate.*) and `precision`, validated the same way; with `announce`, the precision it decodes at goes to stderr.
    `small_batches`: it will decode a few sentences at a time (a service), which "auto" weighs (devices.resolve_precision)."""
    from .api import Translator

    translator = Translator.from_pretrained(model_dir, device=device, workers=workers)
    translator.small_batches = small_batches
    overrides = overrides + ([f"decode.precision={precision}"] if precision else [])
    if overrides:
        recipe = recipe_from_dict(apply_overrides(translator.recipe.to_dict(), overrides))
        if recipe.model != translator.recipe.model or recipe.tokenizer != translator.recipe.tokenizer:
            raise RecipeError("--set can change data.*, decode.* and evaluate.* of a trained model, not its model.* or tokenizer.*")
        trained, asked = (translator.recipe.data.src_lang, translator.recipe.data.tgt_lang), (recipe.data.src_lang, recipe.data.tgt_lang)
        if asked != trained:  # the model would read one language as another, and be scored against the wrong side
            raise RecipeError(f"--set data.src_lang/tgt_lang: this model translates {trained[0]} to {trained[1]}, not {asked[0]} to {asked[1]}")
        translator.recipe = recipe
    if announce:
        print(f"device: {translator.device}; precision: {translator.precision()}", file=sys.stderr)
    return translator


def input_lines(stream, name: str, strict: bool = False) -> Iterator[str]:
    """Lines of a binary stream without their line end (LF or CR LF). A line that is not UTF-8 is
    translated with U+FFFD in place of its bad bytes and a warning naming it: one bad line never
    costs the lines after it (a stream cannot be read twice to check it first). `strict`: it is an
    error naming it instead (a score of other bytes would be another text's)."""
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            if strict:
                from .data import DataError

                raise DataError(f"{name}, line {number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            line = raw.decode("utf-8", errors="replace")
            print(f"translator translate: warning: {name}, line {number}: not valid UTF-8 ({e.reason} at byte {e.start}); "
                  "translated with U+FFFD in place of the bad bytes", file=sys.stderr)
        yield line.removesuffix("\n").removesuffix("\r")


def input_file(flag: str, path: str) -> str:
    """An input file's path, refused now (before the model loads) if it is missing or a folder. Exists, not
    is_file: a pipe (-i <(zcat in.gz), /dev/stdin) is input too."""
    from .data import DataError

    if not Path(path).exists():
        raise DataError(f"{flag} {path}: no such file")
    if Path(path).is_dir():
        raise DataError(f"{flag} {path}: is a folder, expected a file of sentences")
    return path


def output_path(path: str) -> Path:
    """--output's path, refused now (before any work) if its folder does not exist, or it is a folder."""
    target = Path(path)
    if target.is_dir():
        raise RecipeError(f"--output {path}: is a folder, expected a file to write")
    if not target.parent.is_dir():
        raise RecipeError(f"--output {path}: no such folder {target.parent}")
    return target


@contextmanager
def output_file(path: str | None):
    """stdout, or a file that appears only when the command succeeds (written beside it, then renamed)."""
    if path is None:
        yield sys.stdout
        return
    from .checkpoint import staged_text_file

    with staged_text_file(output_path(path)) as f:
        yield f


def translate_options(args: argparse.Namespace) -> dict:
    """translate()'s keyword arguments from the flags; what a flag leaves out comes from the model's recipe."""
    from .search import Sampling

    sampling_flags = [f"--{k.replace('_', '-')}" for k in ("temperature", "top_k", "top_p", "seed") if getattr(args, k) is not None]
    if sampling_flags and not args.sample:
        raise RecipeError(f"{', '.join(sampling_flags)} set how --sample draws tokens; add --sample")
    if args.sample and (args.beam_size is not None or args.alpha is not None or args.beam_stop is not None):
        raise RecipeError("--sample draws tokens instead of searching: --beam-size, --alpha and --beam-stop do not apply")
    sampling = None
    if args.sample:
        settings = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "seed") if getattr(args, k) is not None}
        try:
            sampling = Sampling(**settings)
        except ValueError as e:
            raise RecipeError(str(e).replace("Sampling.", "--").replace("_", "-")) from None
    if args.sample and args.rerank_with:
        raise RecipeError("--rerank-with reranks beam search's hypotheses; it does not apply to --sample")
    return dict(beam_size=args.beam_size, alpha=args.alpha, beam_stop=args.beam_stop, n_best=args.n_best, sampling=sampling,
                rerank_weight=args.rerank_weight)


def reverse_translator(args: argparse.Namespace, translator):
    """--rerank-with's model directory (or None), whose pair it must reverse, on the same device and at the same precision
    and batch budget (decode.max_tokens) as `translator`: a --set of either, or a flag, holds for the whole command."""
    if not args.rerank_with:
        if args.rerank_weight is not None:
            raise RecipeError(f"--rerank-weight {args.rerank_weight}: given without --rerank-with MODEL_DIR, the reverse model it weighs")
        return None
    from .api import check_reverse_pair

    budget = [f"decode.max_tokens={translator.recipe.decode.max_tokens}"]
    reverse = load_translator(args.rerank_with, budget, args.device, translator.recipe.decode.precision, small_batches=translator.small_batches)
    check_reverse_pair(translator, reverse)
    return reverse


def translate_lines(translator, lines: list[str], options: dict, name: str, first_line: int, truncate: bool) -> list:
    """translate() of input lines `first_line`... of `name`, naming by their line numbers the lines longer than
    the model's positions: a warning (they are cut to fit) or, without `truncate`, the error."""
    from .api import SourceTooLong
    from .data import DataError

    try:
        return translator.translate(lines, truncate=False, **options)
    except SourceTooLong as e:  # raised before any decoding: asking again costs only the tokenizing
        first, *others = [first_line + i for i in e.indices]
        more = f" and {len(others)} more ({', '.join(map(str, others[:5]))}{', ...' if len(others) > 5 else ''})" if others else ""
        problem = f"{name}, line {first}{more}: longer than model.max_positions={e.limit} tokens ({e.lengths[0]} with its end-of-sentence token)"
        if not truncate:
            raise DataError(f"{problem}; without --no-truncate it is cut to fit") from None
        print(f"translator translate: warning: {problem}: truncated", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*longer than model.max_positions")  # said above, by line
            return translator.translate(lines, truncate=True, **options)


def cmd_translate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    options = translate_options(args)
    if args.input:
        input_file("--input", args.input)
    if args.output:
        output_path(args.output)
    translator = load_translator(args.model_dir, args.set, args.device, args.precision, announce=not args.quiet, workers=args.workers)
    options["rerank"] = reverse_translator(args, translator)
    beam_size = args.beam_size or translator.recipe.decode.beam_size
    if args.n_best and not args.sample and args.n_best > beam_size:
        raise RecipeError(f"--n-best {args.n_best}: at most the beam size, {beam_size} (--beam-size), or any number with --sample")
    translator.translate([], **options)  # the options checked now, before any input is read (an empty input too)
    source = open(args.input, "rb") if args.input else sys.stdin.buffer
    lines = input_lines(source, args.input or "stdin")
    # Stream: read a chunk of lines, translate it (sorted into batches inside), write it in order, flush.
    # Memory stays bounded and the output flows through a pipe of any length.
    with source, output_file(args.output) as out, tqdm(desc="translating", unit=" lines", disable=args.quiet, file=sys.stderr) as bar:
        start = 0
        while chunk := list(itertools.islice(lines, args.chunk_lines)):
            results = translate_lines(translator, chunk, options, args.input or "stdin", start + 1, truncate=not args.no_truncate)
            if args.n_best is None:
                out.write("".join(text + "\n" for text in results))
            else:  # N lines an input line, best first: its index (from 0), score, text
                out.write("".join(f"{start + i}\t{h.score:.4f}\t{h.text}\n" for i, hyps in enumerate(results) for h in hyps))
            out.flush()
            start += len(chunk)
            bar.update(len(chunk))
    return 0


def paired_lines(sources: Iterator[str], targets: Iterator[str], source_name: str, target_name: str) -> Iterator[tuple[str, str]]:
    """(source, target) lines, in step; files of unequal length are an error naming both files and their line counts."""
    from .data import DataError

    count = 0
    for source, target in itertools.zip_longest(sources, targets):
        if source is None or target is None:
            rest = 1 + sum(1 for _ in (targets if source is None else sources))
            lines = (count, count + rest) if source is None else (count + rest, count)
            raise DataError(f"{source_name} has {lines[0]} lines and {target_name} {lines[1]}: expected a target line a source line")
        count += 1
        yield source, target


def cmd_score(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .api import PairTooLong
    from .data import DataError

    files = {"source": input_file("--source", args.source), "target": input_file("--target", args.target)}
    if args.output:
        output_path(args.output)
    translator = load_translator(args.model_dir, args.set, args.device, args.precision, announce=not args.quiet)
    with open(args.source, "rb") as sources, open(args.target, "rb") as targets, output_file(args.output) as out, \
            tqdm(desc="scoring", unit=" lines", disable=args.quiet, file=sys.stderr) as bar:
        pairs = paired_lines(input_lines(sources, args.source, strict=True), input_lines(targets, args.target, strict=True), args.source, args.target)
        start = 0
        while chunk := list(itertools.islice(pairs, args.chunk_lines)):
            try:
                scores = translator.score([s for s, _ in chunk], [t for _, t in chunk], normalize=args.normalize)
            except PairTooLong as e:
                raise DataError(f"{files[e.side]}, line {start + e.index + 1}: {e.length} tokens with its end-of-sentence token, "
                                f"longer than model.max_positions={e.limit}") from None
            out.write("".join(f"{score:.4f}\n" for score in scores))
            out.flush()
            start += len(chunk)
            bar.update(len(chunk))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    output = output_path(args.output) if args.output else None
    translator = load_translator(args.model_dir, args.set, args.device, args.precision, announce=not args.quiet, workers=args.workers)
    scores = evaluate(translator, args.split, translator.recipe.data, args.beam_size, output, progress=not args.quiet,
                      rerank=reverse_translator(args, translator), rerank_weight=args.rerank_weight)
    print(json.dumps(scores.to_dict()) if args.json else str(scores))
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from .distill import distill

    if Path(args.out).exists():  # refused before the model loads and translates
        raise RecipeError(f"{args.out} already exists; distill writes a new folder")
    translator = load_translator(args.model_dir, args.set, args.device, args.precision, announce=not args.quiet, workers=args.workers)
    translated = distill(translator, args.out, translator.recipe.data, progress=not args.quiet,
                         rerank=reverse_translator(args, translator), rerank_weight=args.rerank_weight)
    print(f"distilled {translated} training sentences into {args.out}: train with --set data.path={args.out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_ctranslate2

    if args.more:
        raise RecipeError(f"export takes one model directory and the folder to write, got {2 + len(args.more)} paths "
                          f"({args.model_dir}, {args.out}, {', '.join(args.more)}): CTranslate2 runs one model, not an ensemble")
    out = export_ctranslate2(args.model_dir, args.out, args.quantization)
    print(f"exported {args.model_dir} to CTranslate2 ({args.quantization or 'float32'} weights): {out}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from .checkpoint import save_averaged

    save_averaged([Path(p) for p in args.checkpoints], Path(args.output))
    print(f"averaged {len(args.checkpoints)} checkpoints into {args.output}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plot import plot_attention, plot_run

    if not args.attention:
        if args.sentence is not None:
            raise RecipeError(f"translator plot RUN takes no sentence (got {args.sentence!r}); for attention maps: translator plot --attention MODEL_DIR SENTENCE")
        print(plot_run(args.run_dir, args.output and output_path(args.output)))
        return 0
    if args.sentence is None or not args.sentence.strip():
        raise RecipeError("translator plot --attention MODEL_DIR SENTENCE: the sentence is missing or blank")
    output = output_path(args.output or "attention.png")
    translator = load_translator(args.run_dir, args.set)
    heads = translator.recipe.model.n_heads
    if args.head != "mean" and not (args.head.isdigit() and 1 <= int(args.head) <= heads):
        raise RecipeError(f"--head {args.head}: expected mean or a head from 1 to {heads}")
    translation = translator.translate(args.sentence, beam_size=args.beam_size, return_attention=True)
    if translation.attention is None:  # all of it is what SentencePiece drops (U+200B, U+FEFF): nothing was decoded
        raise RecipeError(f"translator plot --attention: the sentence {args.sentence!r} has no pieces, so no attention to plot")
    head = None if args.head == "mean" else int(args.head) - 1
    title = f"{args.sentence} -> {translation.text}"
    print(plot_attention(translation.attention, output, head, title))
    return 0


TRANSLATE_EPILOG = """examples:
  translator translate runs/multi30k_de_en < input.de > output.en
  translator translate runs/multi30k_de_en -i input.de -o output.en --beam-size 5 --alpha 0.6 --precision int8
  translator translate runs/multi30k_de_en --n-best 3 --beam-size 5 < input.de     # index<TAB>score<TAB>text
  translator translate runs/multi30k_de_en --sample --top-p 0.9 --seed 1 --n-best 4 < input.de

Output: one line an input line, in order; with --n-best N, N lines an input line, best first:
its index (from 0), <TAB>, its score (log-probability; beam search: over the length penalty), <TAB>, text.
A line that is not UTF-8 is translated with U+FFFD for its bad bytes, with a warning naming it.
Closing the pipe early (| head) ends the command quietly with status 141, as for cat or yes.
"""


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import Limits, Reranking, serve  # FastAPI and uvicorn: only this command imports them
    except ImportError as e:
        raise RuntimeError(f"translator serve needs FastAPI and uvicorn: pip install 'translator[serve]' ({e})") from None
    translator = load_translator(args.model_dir, args.set, args.device, args.precision, announce=True, workers=args.workers, small_batches=True)
    reverse = reverse_translator(args, translator)
    reranking = Reranking(reverse, args.rerank_weight) if reverse else None
    serve(translator, args.host, args.port, Limits(args.max_sentences, args.max_chars, args.max_hypotheses), args.batch_wait_ms, reranking)
    return 0


FLAG_KEYS = ("beam_size", "alpha", "beam_stop")  # decode.* keys that a flag of the same name sets


def as_flag(message: str, args: argparse.Namespace) -> str:
    """An error about a decode.* key named by the flag the user gave it (--beam-size 3000), not by the recipe's key."""
    for key in FLAG_KEYS:
        if message.startswith(f"decode.{key}:") and getattr(args, key, None) is not None:
            return f"--{key.replace('_', '-')}" + message.removeprefix(f"decode.{key}")
    return message


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {text!r}")
    return int(text)


def milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"expected milliseconds from 0 to 10000, got {text!r}")
    return value


ENSEMBLE_HELP = "a model directory, or several sharing one SentencePiece model: an ensemble, decoding with the first one's recipe"
WORKERS = dict(type=positive_int, default=1, help="decoding processes sharing the threads, forked once; CPU only (see docs/deployment.md)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="translator", description="Train and run encoder-decoder Transformer translation models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"translator {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for usage errors (or set TRANSLATOR_DEBUG=1)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{train,translate,score,evaluate,distill,export,average,plot,serve}")
    overrides = dict(action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. data.path=DIR (repeatable)")
    decoding = argparse.ArgumentParser(add_help=False)  # where and how translate, evaluate and serve decode
    decoding.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: the GPU when torch sees one")
    decoding.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16", "int8"), default=None,
                          help="default: the recipe's decode.precision (auto: bf16 where the CPU or GPU runs it natively); int8: CPU only")
    reranking = argparse.ArgumentParser(add_help=False, parents=[decoding])  # translate, evaluate, distill and serve
    reranking.add_argument("--rerank-with", default=None, metavar="MODEL_DIR",
                           help="a model of the reverse pair: the beam re-sorted by score + weight x its log p(source | translation) a source token")
    reranking.add_argument("--rerank-weight", type=float, default=None, help="with --rerank-with: the weight (default: the recipe's decode.rerank_weight)")

    train = verbs.add_parser("train", help="train a model from a YAML recipe",
                             epilog="example: translator train recipes/multi30k_de_en.yaml --set data.path=../shared/data/multi30k")
    train.add_argument("recipe", help="YAML recipe, see recipes/")
    train.add_argument("--set", **overrides)
    resume = train.add_mutually_exclusive_group()
    resume.add_argument("--resume", action="store_true", help="continue the run in out_dir from its newest checkpoint")
    resume.add_argument("--auto-resume", action="store_true", help="continue the run in out_dir if it has a checkpoint, else start it: "
                        "one command for the first start and every restart (torchrun --max-restarts, a scheduler's requeue)")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    _add_translate(verbs, reranking, overrides)
    _add_score(verbs, decoding, overrides)

    evaluate = verbs.add_parser("evaluate", help="BLEU and chrF on a dataset split", parents=[reranking],
                                epilog="example: translator evaluate runs/multi30k_de_en --split test --set data.path=../shared/data/multi30k")
    evaluate.add_argument("model_dir", nargs="+", help=ENSEMBLE_HELP)
    evaluate.add_argument("--split", default=None, help="the split to score (default: the recipe's data.test_split)")
    evaluate.add_argument("--beam-size", type=positive_int, default=None, help="1 for greedy (default: the recipe's decode.beam_size)")
    evaluate.add_argument("--output", default=None, help="write the hypotheses to this file")
    evaluate.add_argument("--set", **overrides)
    evaluate.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar, no device and precision line")
    evaluate.add_argument("--workers", **WORKERS)
    evaluate.set_defaults(run=cmd_evaluate)

    distill = verbs.add_parser("distill", help="a teacher's translations of the training sources, beside the original pairs, "
                               "as a folder for data.path (sequence-level knowledge distillation)", parents=[reranking],
                               epilog="example: translator distill runs/multi30k_en_de runs/multi30k_en_de_distilled_data "
                                      "--set data.path=../shared/data/multi30k")
    distill.add_argument("model_dir", nargs="+", help="the teacher: " + ENSEMBLE_HELP)
    distill.add_argument("out", help="the folder to write (must not exist): {split}.{lang} line-aligned text (train: the original pairs, then the teacher's)")
    distill.add_argument("--set", **overrides)
    distill.add_argument("--quiet", action="store_true", help="no progress bar, no device and precision line")
    distill.add_argument("--workers", **WORKERS)
    distill.set_defaults(run=cmd_distill)

    export = verbs.add_parser("export", help="convert a model directory for another runtime (CTranslate2)",
                              epilog="example: translator export runs/multi30k_de_en --to ctranslate2 ct2_model --quantization int8")
    export.add_argument("model_dir")
    export.add_argument("--to", required=True, choices=("ctranslate2",), help="the runtime (pip install 'translator[ctranslate2]')")
    export.add_argument("out", help="the directory to write (must not exist)")
    export.add_argument("more", nargs="*", help=argparse.SUPPRESS)  # said in words: an ensemble is not one model to export
    export.add_argument("--quantization", default=None, help="CTranslate2's weight type: int8, int8_float32, int16, float16, ... (default: float32)")
    export.set_defaults(run=cmd_export)

    average = verbs.add_parser("average", help="average the weights of checkpoints into a model directory",
                               epilog="example: translator average runs/m/checkpoints/step_* -o runs/m_avg")
    average.add_argument("checkpoints", nargs="+", help="model directories or training checkpoints of one run")
    average.add_argument("-o", "--output", required=True, help="the model directory to write")
    average.set_defaults(run=cmd_average)

    _add_plot_and_serve(verbs, reranking, overrides)
    for verb in verbs.choices.values():  # also after the verb, where a user adds it to the command that failed;
        # SUPPRESS: a verb's own default would otherwise overwrite `translator --debug VERB`
        verb.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    return parser


def _add_translate(verbs, decoding: argparse.ArgumentParser, overrides: dict) -> None:
    translate = verbs.add_parser("translate", help="translate lines (stdin or -i) to lines (stdout or -o)", parents=[decoding],
                                 epilog=TRANSLATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    translate.add_argument("model_dir", nargs="+", help=ENSEMBLE_HELP)
    translate.add_argument("-i", "--input", default=None, help="read this file instead of stdin")
    translate.add_argument("-o", "--output", default=None, help="write this file (only once all is translated) instead of stdout")
    translate.add_argument("--beam-size", type=positive_int, default=None, help="1 for greedy (default: the recipe's decode.beam_size)")
    translate.add_argument("--alpha", type=float, default=None, help="beam search's length penalty ((5 + length) / 6) ** alpha (default: the recipe's)")
    translate.add_argument("--beam-stop", choices=("exact", "first_k"), default=None,
                           help="end a sentence's search once nothing open can win (exact), or at its first K finished "
                                "hypotheses (first_k, fairseq's and CTranslate2's rule) (default: the recipe's)")
    translate.add_argument("--n-best", type=positive_int, default=None, metavar="N",
                           help="N lines an input line: index<TAB>score<TAB>text, best first (N <= beam size, or N samples)")
    translate.add_argument("--sample", action="store_true", help="draw each token from the model's distribution instead of searching")
    translate.add_argument("--temperature", type=float, default=None, help="with --sample: < 1 sharpens, > 1 flattens (default 1)")
    translate.add_argument("--top-k", type=int, default=None, help="with --sample: only among the k likeliest tokens (default: all)")
    translate.add_argument("--top-p", type=float, default=None, help="with --sample: only among the likeliest tokens that add up to p (default 1)")
    translate.add_argument("--seed", type=int, default=None, help="with --sample: the same seed and input give the same samples")
    translate.add_argument("--set", **overrides)
    translate.add_argument("--chunk-lines", type=positive_int, default=2000, help="lines read, translated and written at a time")
    translate.add_argument("--no-truncate", action="store_true", help="fail on a sentence longer than the model's positions instead of truncating it")
    translate.add_argument("--quiet", action="store_true", help="no progress bar, no device and precision line")
    translate.add_argument("--workers", **WORKERS)
    translate.set_defaults(run=cmd_translate)


def _add_score(verbs, decoding: argparse.ArgumentParser, overrides: dict) -> None:
    score = verbs.add_parser("score", help="the model's log-probability of given translations, a line a pair (filtering data, reranking)",
                             parents=[decoding], epilog="example: translator score runs/multi30k_de_en --source corpus.de --target corpus.en "
                                                        "-o scores.txt\n\nOutput: a line a pair, in order: the sum of the log-probabilities of "
                                                        "the target's pieces and its end-of-sentence token (--normalize: their mean).",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    score.add_argument("model_dir", nargs="+", help=ENSEMBLE_HELP)
    score.add_argument("--source", required=True, help="source sentences, a line each")
    score.add_argument("--target", required=True, help="their translations, line for line")
    score.add_argument("-o", "--output", default=None, help="write this file (only once all is scored) instead of stdout")
    score.add_argument("--normalize", action="store_true", help="the mean log-probability a target token, end-of-sentence included, instead of the sum")
    score.add_argument("--set", **overrides)
    score.add_argument("--chunk-lines", type=positive_int, default=2000, help="lines read, scored and written at a time")
    score.add_argument("--quiet", action="store_true", help="no progress bar, no device and precision line")
    score.set_defaults(run=cmd_score)


def _add_plot_and_serve(verbs, reranking: argparse.ArgumentParser, overrides: dict) -> None:
    plot = verbs.add_parser("plot", help="PNG training curves of a run, or (--attention) a translation's attention maps",
                            epilog='examples: translator plot runs/multi30k_de_en\n'
                                   '          translator plot --attention runs/multi30k_de_en "Ein Mann fährt Fahrrad." -o attention.png',
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    plot.add_argument("run_dir", metavar="RUN_OR_MODEL_DIR")
    plot.add_argument("sentence", nargs="?", default=None, help="with --attention: the sentence to translate")
    plot.add_argument("--attention", action="store_true",
                      help="draw the three attention modes (encoder self-, decoder self-, cross-attention) of SENTENCE's translation")
    plot.add_argument("--head", default="mean", help="with --attention: a head (1, 2, ...) or mean (default)")
    plot.add_argument("--beam-size", type=positive_int, default=None, help="with --attention: 1 for greedy (default: the recipe's)")
    plot.add_argument("--set", **overrides)
    plot.add_argument("-o", "--output", default=None, help="the PNG to write (default: RUN_DIR/curves.png, or attention.png)")
    plot.set_defaults(run=cmd_plot)

    serve = verbs.add_parser("serve", help="an HTTP translation service (LibreTranslate's POST /translate) and a page with attention maps", parents=[reranking],
                             epilog="example: translator serve runs/multi30k_de_en --port 8000   (then open http://127.0.0.1:8000/)\n\n"
                                    "--precision auto serves in fp32 on a CPU even where it runs bf16 natively: a service's batches are small,\n"
                                    "and there bf16 measured slower (docs/deployment.md).",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    serve.add_argument("model_dir")
    serve.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1; no authentication: put a reverse proxy in front)")
    serve.add_argument("--port", type=port, default=8000, help="default 8000")
    serve.add_argument("--max-sentences", type=positive_int, default=100, help="sentences per request (default 100)")
    serve.add_argument("--max-chars", type=positive_int, default=10_000, help="characters per request, all sentences together (default 10000)")
    serve.add_argument("--max-hypotheses", type=positive_int, default=16, help="per sentence: the beam size, or alternatives + 1 samples (default 16)")
    serve.add_argument("--batch-wait-ms", type=milliseconds, default=5.0, help="how long a request reaching an idle server waits for others to batch with (default 5)")
    serve.add_argument("--workers", **WORKERS)
    serve.add_argument("--set", **overrides)
    serve.set_defaults(run=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and (not hasattr(args, "more") or any(u.startswith("-") for u in unknown)):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if unknown:  # export's further paths, given after an option (`export A B --to ctranslate2 OUT`): said in words
        args.more += unknown
    from .checkpoint import CheckpointError  # after parsing: `--help` should not wait for torch and `datasets` to import
    from .data import DataError

    if getattr(args, "quiet", False):
        import datasets

        datasets.disable_progress_bars()  # "Generating train split", "tokenizing", ...: --quiet means none
    debug = args.debug or bool(os.environ.get("TRANSLATOR_DEBUG"))
    try:
        with _sigterm_interrupts():
            return args.run(args)
    except (RecipeError, DataError, CheckpointError) as e:  # the user's input: say what to fix
        if debug:
            raise
        print(f"translator {args.verb}: error: {as_flag(str(e), args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or training stopped by either after saving a checkpoint
        signum = getattr(e, "signal", signal.SIGINT)
        print(f"translator {args.verb}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}", file=sys.stderr)
        return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
    except BrokenPipeError:  # the reader went away (| head): what it wanted was written; end as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that exit's own flush cannot fail again
        return 141
    except Exception as e:  # a runtime failure: one line, the traceback with --debug
        if debug:
            raise
        print(f"translator {args.verb}: failed: {type(e).__name__}: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1


@contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's stop, `kill`) raises KeyboardInterrupt as SIGINT does, so the same cleanup
    runs; its `signal` says which it was, as train's `Stopped` does. Commands that handle SIGTERM
    themselves (train's loop, serve) set their own handler inside."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return

    def interrupt(signum, frame):
        stop = KeyboardInterrupt(signal.Signals(signum).name)
        stop.signal = signum
        raise stop

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
