"""The repository's `kernels/` and `benchmarks/` folders are parts of this package (installed as
`fused_hybrid.kernels` and `fused_hybrid.benchmarks`). Python started in a checkout's root (`python -m pytest`, a
REPL, `python -c`) puts that root first on `sys.path`, where each folder would answer to its bare name and shadow
any distribution that provides a top-level module of the same name (transformers imports Hugging Face's `kernels`).
Each folder's `__init__` calls `hand_over` when it is imported under its bare name: the name then resolves to
whatever the rest of the import path provides, as if the checkout's root were not on it; only when nothing else
provides the name does the folder answer to it."""

from __future__ import annotations

import importlib.util
import os
import sys


def hand_over(name: str, package_file: str) -> None:
    """Replace the module `name` being imported (the package whose `__init__` is `package_file`, imported under its
    bare name) in `sys.modules` by the module the rest of the import path gives that name, if any: the import
    statement in progress then returns that module."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(package_file)))
    search_path = sys.path
    sys.path = [entry for entry in search_path if os.path.abspath(entry or os.curdir) != root]
    try:
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, None) if find_spec is not None else None
            if spec is not None:
                break
        else:
            return  # nothing else answers to the name: the folder does
    finally:
        sys.path = search_path
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        if spec.loader is not None:
            spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
