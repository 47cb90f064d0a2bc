"""The server's command-line flags and their checked values (no web framework imported here, so
`postembed-fast --help` works without the serve extra)."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from postembed_fast.cli_args import non_negative_float, positive_int
from postembed_fast.options import ModelOptions, add_model_args

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
API_KEY_ENV = "POSTEMBED_API_KEY"
DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"  # the shipped model (--model unset)


def model_name_arg(s: str) -> str:
    """A --served-model-name value: what clients send as `model`, so no blank or padded name."""
    if not s.strip() or s != s.strip():
        raise argparse.ArgumentTypeError(f"a model name must be non-empty without surrounding spaces, got {s!r}")
    return s


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds every server flag to `p` (used by `python -m postembed_fast.serve` and `postembed-fast serve`)."""
    add_model_args(p, batch_tokens=False)  # forward batches are the engine's default; the merge budget below
    g = p.add_argument_group("network")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1; 0.0.0.0 in a container)")
    g.add_argument("--port", type=int, default=8080, help="port to bind (default: 8080)")
    g.add_argument("--api-key", default=None, metavar="KEY",
                   help=f"require 'Authorization: Bearer KEY' on every route but /health and /metrics "
                        f"(default: the {API_KEY_ENV} environment variable; unset: no auth)")
    g.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="log level (default: info)")
    g = p.add_argument_group("model names (OpenAI routes)")
    g.add_argument("--served-model-name", action="append", type=model_name_arg, default=None, metavar="NAME",
                   dest="served_model_names",
                   help="a name clients may send as `model` on /v1/embeddings and that GET /v1/models lists; "
                        "repeat for aliases; a request without `model` gets the first "
                        "(default: the model's name, the --model folder's or all-MiniLM-L6-v2); "
                        "another name gets 404 model_not_found")
    g.add_argument("--accept-any-model", action="store_true",
                   help="accept any `model` on /v1/embeddings and echo it back, served by this model "
                        "(for clients whose model name cannot be configured)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch-tokens", type=positive_int, default=None, metavar="N",
                   help="merge budget: concurrent requests with the same options are merged into one engine "
                        "call while their tokens total at most N; the engine runs that call in forward batches "
                        "of its default size (default N: that size, 4096 tokens on CPU, 65536 on GPU); a larger "
                        "request runs alone")
    g.add_argument("--max-batch-requests", type=positive_int, default=None, metavar="N",
                   help="at most N requests merged into one batch (default: no limit; 1 turns batching off)")
    g.add_argument("--max-wait-ms", type=non_negative_float, default=2.0, metavar="MS",
                   help="how long a batch that is not full waits for more requests (default: 2)")
    g.add_argument("--max-concurrent-requests", type=positive_int, default=512, metavar="N",
                   help="requests admitted at once (queued or running); more get 429 (default: 512)")
    g.add_argument("--max-client-batch-size", type=positive_int, default=512, metavar="N",
                   help="inputs per request; more get 413 (default: 512)")
    g.add_argument("--max-input-chars", type=positive_int, default=32768, metavar="N",
                   help="characters per input; longer gets 413, or is cut where the route takes truncate (/embed, /, "
                        "/tokenize) and the request says so "
                        "(default: 32768; the model reads at most max_seq_length tokens anyway)")
    g.add_argument("--max-payload-bytes", type=positive_int, default=4 * 1024 * 1024, metavar="N",
                   help="request body limit; larger gets 413 (default: 4 MiB)")


@dataclass(frozen=True)
class ServeConfig(ModelOptions):
    """The server's settings: model, device, dtype are ModelOptions' (keyword-only); its batch_tokens (the
    forward batch) stays None, the engine's default: the server's own budget is max_batch_tokens, how many
    tokens of requests are merged into one engine call (None: that default)."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    log_level: str = "info"
    served_model_names: tuple[str, ...] = ()  # (): the model's own name (model_names)
    accept_any_model: bool = False
    max_batch_tokens: int | None = None  # the merge budget; None: the engine's batch_tokens default of the device
    max_batch_requests: int | None = None
    max_wait_ms: float = 2.0
    max_concurrent_requests: int = 512
    max_client_batch_size: int = 512
    max_input_chars: int = 32768
    max_payload_bytes: int = 4 * 1024 * 1024

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServeConfig:
        api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
        names = tuple(dict.fromkeys(args.served_model_names or ()))  # a repeated name counts once
        return super().from_args(args, host=args.host, port=args.port, api_key=api_key, log_level=args.log_level,
                                 served_model_names=names, accept_any_model=args.accept_any_model,
                                 max_batch_tokens=args.max_batch_tokens,
                                 max_batch_requests=args.max_batch_requests, max_wait_ms=args.max_wait_ms,
                                 max_concurrent_requests=args.max_concurrent_requests,
                                 max_client_batch_size=args.max_client_batch_size,
                                 max_input_chars=args.max_input_chars, max_payload_bytes=args.max_payload_bytes)

    @property
    def model_names(self) -> tuple[str, ...]:
        """The names served (GET /v1/models, accepted as `model`): --served-model-name's, else the
        model's own name (the --model folder's name, or the shipped model's)."""
        if self.served_model_names:
            return self.served_model_names
        if self.model is None:
            return (DEFAULT_MODEL_NAME,)
        return (os.path.basename(os.path.normpath(self.model)) or self.model,)

    @property
    def model_name(self) -> str:
        """The default name: what a request without `model` gets, /info and the logs say."""
        return self.model_names[0]
