"""Imports run one way: entry -> stages -> modules -> scoring -> callbacks -> generation -> models -> data_modules ->
core and world (../shared/DESIGN.md, "Where the house is going"). Every import of the project's own modules, at the
top of a file or inside a function, is read from the source (ast) and checked against that order; imports inside
functions are kept for optional or heavy third-party packages only."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("llama2_lit", "data_modules", "callbacks")
# (layer, module name prefixes); a module may import its own layer and the layers after it
LAYERS = [
    ("entry", ("llama2_lit.__main__", "llama2_lit.run", "llama2_lit.options", "llama2_lit.config", "llama2_lit.plan",
               "llama2_lit.gold_compare", "llama2_lit.summarize", "llama2_lit.overopt", "llama2_lit.tools",
               "llama2_lit.chat")),
    ("stages", ("llama2_lit.stages", "llama2_lit.run_lock")),  # run_lock: the entry and the pipeline lock directories
    ("modules", ("llama2_lit.modules",)),
    ("scoring", ("llama2_lit.scoring",)),
    ("callbacks", ("callbacks",)),
    ("generation", ("llama2_lit.generation",)),
    ("models", ("llama2_lit.models",)),
    ("data_modules", ("data_modules",)),
    ("core and world", ("llama2_lit.core", "llama2_lit.world", "llama2_lit.errors", "llama2_lit")),
]
# third-party packages that may be imported inside a function: optional extras or heavy imports a command may not need
LAZY_OK = {"peft", "matplotlib", "gguf", "accelerate", "sentencepiece", "google", "psutil", "pyarrow", "datasets",
           "safetensors", "runpy", "resource", "signal", "socket", "fcntl", "ctypes", "torch", "lightning", "hydra",
           "omegaconf", "transformers", "tokenizers", "numpy", "tensorboard", "torchmetrics", "yaml"}


def layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, module
    return rank


def _modules():
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            yield ".".join(parts), path


def _imports(name: str, path: Path):
    """``(imported module, line, inside a function)`` for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    funcs = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        inner = id(node) in funcs
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, inner
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            for a in node.names:  # `from pkg import mod` imports pkg.mod when it is a module
                full = f"{base}.{a.name}"
                yield (full if (ROOT / Path(*full.split("."))).with_suffix(".py").exists()
                       or (ROOT / Path(*full.split("."))).is_dir() else base), node.lineno, inner


def _project(module: str) -> bool:
    return module.split(".")[0] in PACKAGES


def test_imports_point_one_way():
    bad = []
    for name, path in _modules():
        for target, line, _ in _imports(name, path):
            if _project(target) and layer(target) < layer(name):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {LAYERS[layer(name)][0]} {name} imports "
                           f"{LAYERS[layer(target)][0]} {target}")
    assert not bad, "imports against the direction entry -> stages -> ... -> core:\n" + "\n".join(bad)


def test_imports_inside_functions_only_for_optional_or_heavy_packages():
    bad = []
    for name, path in _modules():
        for target, line, inner in _imports(name, path):
            if inner and (_project(target) or target.split(".")[0] not in LAZY_OK):
                bad.append(f"{path.relative_to(ROOT)}:{line}: {target}")
    assert not bad, f"{len(bad)} imports inside functions (move them to the top of the file):\n" + "\n".join(bad)


@pytest.mark.parametrize("module,expected", [("llama2_lit.run", "entry"), ("llama2_lit.tools.gold_compare", "entry"),
                                             ("llama2_lit.stages.rs", "stages"), ("llama2_lit.scoring", "scoring"),
                                             ("llama2_lit.core.rl", "core and world"), ("callbacks.gold_eval", "callbacks"),
                                             ("llama2_lit", "core and world"), ("data_modules.pairwise", "data_modules")])
def test_layer_of_a_module(module, expected):
    assert LAYERS[layer(module)][0] == expected
