"""Imports flow one way (docs/design.md, Layout): leaf modules never import the layers above them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "translator"

# module -> modules it must never import (directly)
FORBIDDEN = {
    "attention": {"model", "search", "data", "train", "api", "checkpoint", "evaluate", "cli", "config"},
    "model": {"data", "search", "train", "api", "checkpoint", "evaluate", "cli"},
    "search": {"data", "train", "api", "checkpoint", "evaluate", "cli"},
    "config": {"model", "data", "train", "api", "checkpoint", "evaluate", "cli", "tokenizer"},
    "tokenizer": {"model", "data", "train", "api", "checkpoint", "evaluate", "cli"},
    "checkpoint": {"data", "train", "api", "evaluate", "cli", "search"},
    "attention_maps": {"search", "data", "train", "api", "checkpoint", "evaluate", "cli"},
    "quantize": {"data", "search", "train", "api", "checkpoint", "evaluate", "cli"},
    "ensemble": {"data", "search", "train", "api", "checkpoint", "evaluate", "cli", "quantize"},  # a model, like model.py
    "workers": {"data", "search", "train", "api", "checkpoint", "evaluate", "cli", "serve"},  # given a Translator, never importing it
    "export": {"data", "search", "train", "evaluate", "cli", "api", "serve"},
    "datafiles": {"config", "tokenizer", "data", "model", "train", "api", "checkpoint", "evaluate", "cli"},  # below data: plain file checks
    "data": {"trainset", "tokenizer", "model", "train", "api", "checkpoint", "evaluate", "cli"},  # loading knows nothing of subwords
    "trainset": {"model", "search", "train", "api", "checkpoint", "evaluate", "cli"},
    "api": {"train", "evaluate", "cli", "data", "trainset", "serve", "plot", "export"},
    "serve": {"train", "evaluate", "cli", "data", "plot"},  # the service needs only the Translator
    "evaluate": {"train", "cli"},
    "distill": {"train", "evaluate", "cli", "serve"},  # a Translator and the data, as evaluate has
    "train": {"cli"},
}


def local_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("translator."):
            found.add(node.module.split(".")[1])
    return found


def test_imports_flow_one_way():
    for module, forbidden in FORBIDDEN.items():
        bad = local_imports(module) & forbidden
        assert not bad, f"translator/{module}.py imports {sorted(bad)}"


def test_no_import_cycles():
    modules = [p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__")]
    graph = {m: local_imports(m) & set(modules) for m in modules}
    visiting, done = set(), set()

    def visit(m, path):
        assert m not in visiting, f"import cycle: {' -> '.join(path + [m])}"
        if m in done:
            return
        visiting.add(m)
        for n in graph[m]:
            visit(n, path + [m])
        visiting.discard(m)
        done.add(m)

    for m in modules:
        visit(m, [])


def test_import_and_help_wait_for_neither_torch_nor_datasets():
    """`import translator` and `translator --help` stay well under half a second: the heavy imports come with use."""
    import subprocess
    import sys

    check = ("import sys, contextlib, io, translator, translator.cli as cli\n"
             "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): cli.main(['translate', '--help'])\n"
             "print(sorted(m for m in ('torch', 'datasets', 'translator.train', 'sacrebleu') if m in sys.modules))\n"
             "print(translator.Translator.__module__, translator.train.__module__, translator.evaluate.__module__)")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded, names = result.stdout.splitlines()
    assert loaded == "[]"
    assert names == "translator.api translator.train translator.evaluate"  # the public names still resolve, to the functions
