"""`lazy_import`: a module object whose import runs on first attribute access (importlib.util.LazyLoader).

Command modules are imported to build the argument parser; importing torch there would cost 2 s idle and
15-45 s on a loaded machine before `--help` or a config error could answer. With `torch = lazy_import("torch")`
the module reads like a plain `import torch`, and torch loads when the command first uses it.
"""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    spec.loader = importlib.util.LazyLoader(spec.loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # later `import name` statements get this same object
    spec.loader.exec_module(module)
    return module
