"""Argument types shared by every command line (postembed-fast, python -m postembed_fast.serve, python -m
postembed_fast.nearline, ...) and the one 'extra not installed' message: one definition, one wording.
The model flags are postembed_fast.options' (add_model_args, ModelOptions)."""
from __future__ import annotations

import argparse

_MOVED_TO_OPTIONS = ("add_model_args", "DTYPE_CHOICES")


def non_negative_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_int(s: str) -> int:
    v = non_negative_int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {v}")
    return v


def non_negative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number: {s!r}") from None
    if not v >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def missing_extra(extra: str, *modules: str) -> str | None:
    """None when every module imports, else one line naming the first missing one and the pip extra
    that installs it (each optional part of the package says the same thing the same way)."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            return f"{exc.name or name} is not installed; install with: pip install 'postembed_fast[{extra}]'"
    return None


def __getattr__(name):
    """add_model_args and DTYPE_CHOICES moved to postembed_fast.options (with ModelOptions): the old path
    still works, with a DeprecationWarning (a lazy import: options imports this module's argument types)."""
    if name in _MOVED_TO_OPTIONS:
        from postembed_fast import _deprecated, options

        _deprecated.moved(f"{__name__}.{name}", f"postembed_fast.options.{name}")
        return getattr(options, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
