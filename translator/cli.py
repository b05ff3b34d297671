"""Command line: `translator train | translate | evaluate`.

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
from contextlib import contextmanager
from pathlib import Path

from . import __version__
from .checkpoint import CheckpointError
from .config import RecipeError, apply_overrides, load_recipe, recipe_from_dict

EXAMPLES = """examples:
  translator train recipes/multi30k_de_en.yaml --set data.path=../shared/data/multi30k
  translator translate runs/multi30k_de_en --set decode.precision=bf16 < input.de > output.en
  translator evaluate runs/multi30k_de_en --split test --beam-size 5 --output hyps.en
  translator serve runs/multi30k_de_en --port 8000

exit status: 0 ok, 1 runtime failure, 2 usage error (recipe, override, dataset or model directory)
"""


def cmd_train(args: argparse.Namespace) -> int:
    from .train import train  # the trainer is imported only by the command that trains

    recipe = load_recipe(args.recipe, args.set)
    results = train(recipe, progress=not args.quiet, resume=args.resume)
    for name, scores in results.items():  # empty on every process but rank 0 under torchrun
        print(f"test ({name}): {scores}")
    if results:
        print(f"model directory: {recipe.out_dir}")
    return 0


def load_translator(args: argparse.Namespace):
    """The model directory, with `--set` overrides applied to its recipe (data.*, decode.*), validated the same way."""
    from .api import Translator

    translator = Translator.from_pretrained(args.model_dir)
    if args.set:
        recipe = recipe_from_dict(apply_overrides(translator.recipe.to_dict(), args.set))
        if recipe.model != translator.recipe.model or recipe.tokenizer != translator.recipe.tokenizer:
            raise RecipeError("--set can change data.* and decode.* of a trained model, not its model.* or tokenizer.*")
        translator.recipe = recipe
    return translator


def cmd_translate(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    translator = load_translator(args)
    # Stream: read a chunk of lines, translate it (sorted into batches inside), write it in order, flush.
    # Memory stays bounded and the output flows through a pipe of any length.
    with tqdm(desc="translating", unit=" lines", disable=args.quiet, file=sys.stderr) as bar:
        while chunk := [line.rstrip("\r\n") for line in itertools.islice(sys.stdin, args.chunk_lines)]:
            for text in translator.translate(chunk, beam_size=args.beam_size, truncate=not args.no_truncate):
                sys.stdout.write(text + "\n")
            sys.stdout.flush()
            bar.update(len(chunk))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    translator = load_translator(args)
    scores = evaluate(translator, args.split, translator.recipe.data, args.beam_size, args.output, progress=not args.quiet)
    print(json.dumps(scores.to_dict()) if args.json else str(scores))
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
        print(plot_run(args.run_dir, args.output))
        return 0
    if args.sentence is None or not args.sentence.strip():
        raise RecipeError("translator plot --attention MODEL_DIR SENTENCE: the sentence is missing or blank")
    translator = load_translator(argparse.Namespace(model_dir=args.run_dir, set=args.set))
    heads = translator.recipe.model.n_heads
    if args.head != "mean" and not (args.head.isdigit() and 1 <= int(args.head) <= heads):
        raise RecipeError(f"--head {args.head}: expected mean or a head from 1 to {heads}")
    translation = translator.translate(args.sentence, beam_size=args.beam_size, return_attention=True)
    head = None if args.head == "mean" else int(args.head) - 1
    title = f"{args.sentence} -> {translation.text}"
    print(plot_attention(translation.attention, args.output or "attention.png", head, title))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import Limits, serve  # FastAPI and uvicorn: only this command imports them
    except ImportError as e:
        raise RuntimeError(f"translator serve needs FastAPI and uvicorn: pip install 'translator[serve]' ({e})") from None
    serve(load_translator(args), args.host, args.port, Limits(args.max_sentences, args.max_chars), args.batch_wait_ms)
    return 0


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"expected milliseconds from 0 to 10000, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="translator", description="Train and run encoder-decoder Transformer translation models.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"translator {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for usage errors (or set TRANSLATOR_DEBUG=1)")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="{train,translate,evaluate,average,plot,serve}")
    overrides = dict(action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. data.path=DIR (repeatable)")

    train = verbs.add_parser("train", help="train a model from a YAML recipe",
                             epilog="example: translator train recipes/multi30k_de_en.yaml --set data.path=../shared/data/multi30k")
    train.add_argument("recipe", help="YAML recipe, see recipes/")
    train.add_argument("--set", **overrides)
    train.add_argument("--resume", action="store_true", help="continue the run in out_dir from its newest checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    translate = verbs.add_parser("translate", help="translate stdin to stdout, one sentence a line",
                                 epilog="example: translator translate runs/multi30k_de_en < input.de > output.en")
    translate.add_argument("model_dir")
    translate.add_argument("--beam-size", type=int, default=None, help="1 for greedy (default: the recipe's decode.beam_size)")
    translate.add_argument("--set", **overrides)
    translate.add_argument("--chunk-lines", type=int, default=2000, help="lines read, translated and written at a time")
    translate.add_argument("--no-truncate", action="store_true", help="fail on a sentence longer than the model's positions instead of truncating it")
    translate.add_argument("--quiet", action="store_true", help="no progress bar")
    translate.set_defaults(run=cmd_translate)

    evaluate = verbs.add_parser("evaluate", help="BLEU and chrF on a dataset split",
                                epilog="example: translator evaluate runs/multi30k_de_en --split test --set data.path=../shared/data/multi30k")
    evaluate.add_argument("model_dir")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--beam-size", type=int, default=None, help="1 for greedy (default: the recipe's decode.beam_size)")
    evaluate.add_argument("--output", default=None, help="write the hypotheses to this file")
    evaluate.add_argument("--set", **overrides)
    evaluate.add_argument("--json", action="store_true", help="print the scores as one JSON object")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate.set_defaults(run=cmd_evaluate)
    average = verbs.add_parser("average", help="average the weights of checkpoints into a model directory",
                               epilog="example: translator average runs/m/checkpoints/step_* -o runs/m_avg")
    average.add_argument("checkpoints", nargs="+", help="model directories or training checkpoints of one run")
    average.add_argument("-o", "--output", required=True, help="the model directory to write")
    average.set_defaults(run=cmd_average)

    plot = verbs.add_parser("plot", help="PNG training curves of a run, or (--attention) a translation's attention maps",
                            epilog='examples: translator plot runs/multi30k_de_en\n'
                                   '          translator plot --attention runs/multi30k_de_en "Ein Mann fährt Fahrrad." -o attention.png',
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    plot.add_argument("run_dir", metavar="RUN_OR_MODEL_DIR")
    plot.add_argument("sentence", nargs="?", default=None, help="with --attention: the sentence to translate")
    plot.add_argument("--attention", action="store_true",
                      help="draw the three attention modes (encoder self-, decoder self-, cross-attention) of SENTENCE's translation")
    plot.add_argument("--head", default="mean", help="with --attention: a head (1, 2, ...) or mean (default)")
    plot.add_argument("--beam-size", type=int, default=None, help="with --attention: 1 for greedy (default: the recipe's)")
    plot.add_argument("--set", **overrides)
    plot.add_argument("-o", "--output", default=None, help="the PNG to write (default: RUN_DIR/curves.png, or attention.png)")
    plot.set_defaults(run=cmd_plot)

    serve = verbs.add_parser("serve", help="an HTTP translation service (LibreTranslate's POST /translate) and a page with attention maps",
                             epilog="example: translator serve runs/multi30k_de_en --port 8000   (then open http://127.0.0.1:8000/)")
    serve.add_argument("model_dir")
    serve.add_argument("--host", default="127.0.0.1", help="the address to bind (default 127.0.0.1; no authentication: put a reverse proxy in front)")
    serve.add_argument("--port", type=int, choices=range(1, 65536), default=8000, metavar="PORT", help="default 8000")
    serve.add_argument("--max-sentences", type=positive_int, default=100, help="sentences per request (default 100)")
    serve.add_argument("--max-chars", type=positive_int, default=10_000, help="characters per request, all sentences together (default 10000)")
    serve.add_argument("--batch-wait-ms", type=milliseconds, default=5.0, help="how long a request reaching an idle server waits for others to batch with (default 5)")
    serve.add_argument("--set", **overrides)
    serve.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError  # after parsing: `--help` should not wait for `datasets` to import

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
        print(f"translator {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, or training stopped by either after saving a checkpoint
        signum = getattr(e, "signal", signal.SIGINT)
        print(f"translator {args.verb}: {'terminated' if signum == signal.SIGTERM else 'interrupted'}", file=sys.stderr)
        return 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
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
