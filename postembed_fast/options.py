"""The model options every command and config shares: which model, on which device, in which compute
dtype, how many tokens per forward batch. One dataclass (`ModelOptions`), one set of flags
(`add_model_args`), one wording; each command's config is a ModelOptions plus its own fields.

    @dataclass(frozen=True)
    class ServeConfig(ModelOptions):
        port: int = 8080

        @classmethod
        def from_args(cls, args):
            return super().from_args(args, port=args.port)   # the four model fields come from the flags
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

from postembed_fast.cli_args import positive_int

DTYPE_CHOICES = ("float32", "float16", "bfloat16")
MODEL_FLAGS = ("model", "device", "dtype", "batch_tokens")  # the fields of ModelOptions, one flag each


@dataclass(frozen=True, kw_only=True)
class ModelOptions:
    """kw_only: a config adds its fields (required ones too) before these in its constructor."""

    model: str | None = None  # None: all-MiniLM-L6-v2 (shipped); or a local model folder
    device: str | None = None  # None: cuda if a GPU is visible, else cpu
    dtype: str | None = None  # None: the CPU capability table's (kernels/cpu_isa.py), float16 on GPU
    batch_tokens: int | None = None  # None: the engine's default for the device

    @classmethod
    def from_args(cls, args: argparse.Namespace, **fields):
        """This class (or a config subclassing it, given its own `fields`) from parsed flags. A model
        flag the command did not add (`add_model_args(only=...)`) takes its default, None."""
        return cls(**{name: getattr(args, name, None) for name in MODEL_FLAGS}, **fields)


def add_model_args(p: argparse.ArgumentParser, *, batch_tokens: bool = True,
                   only: tuple[str, ...] = MODEL_FLAGS) -> None:
    """--model, --device, --dtype and --batch-tokens in a 'model' group. `batch_tokens=False` or `only`
    leaves flags out for a command that has its own (serve's token budget, train's --base)."""
    unknown = set(only) - set(MODEL_FLAGS)
    if unknown:
        raise ValueError(f"unknown model flags {sorted(unknown)}; valid: {', '.join(MODEL_FLAGS)}")
    g = p.add_argument_group("model")
    if "model" in only:
        g.add_argument("--model", default=None, metavar="NAME_OR_DIR",
                       help="'all-MiniLM-L6-v2' (default, shipped with the install) or a local Hugging Face / "
                            "sentence-transformers folder; nothing is downloaded")
    if "device" in only:
        g.add_argument("--device", default=None, metavar="DEVICE",
                       help="cpu, cuda or cuda:N (default: cuda if a GPU is available, else cpu)")
    if "dtype" in only:
        g.add_argument("--dtype", default=None, choices=DTYPE_CHOICES,
                       help="compute dtype (default on CPU: bfloat16 where it has AMX-BF16 or AVX512-BF16, "
                            "else float32 (POSTEMBED_CPU_DTYPE overrides); float16 on GPU)")
    if batch_tokens and "batch_tokens" in only:
        g.add_argument("--batch-tokens", type=positive_int, default=None, metavar="N",
                       help="tokens per forward batch (default: 4096 on CPU, 65536 on GPU)")
