"""Argument types and the model flags shared by every command line (postembed-fast, python -m
postembed_fast.serve, python -m postembed_fast.nearline): one definition, one wording."""
from __future__ import annotations

import argparse

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


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


def add_model_args(p: argparse.ArgumentParser, *, batch_tokens: bool = True) -> None:
    """--model, --device, --dtype (and --batch-tokens) in a 'model' group."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                   help="'all-MiniLM-L6-v2' (default, shipped with the install) or a local Hugging Face / "
                        "sentence-transformers folder; nothing is downloaded")
    g.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu, cuda or cuda:N (default: cuda if a GPU is available, else cpu)")
    g.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                   help="compute dtype (default: float32 on CPU, float16 on GPU)")
    if batch_tokens:
        g.add_argument("--batch-tokens", type=positive_int, default=None, metavar="N",
                       help="tokens per forward batch (default: 4096 on CPU, 65536 on GPU)")


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
