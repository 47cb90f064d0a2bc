"""`python -m postembed_fast.serve ...`: runs the server on uvicorn until SIGINT/SIGTERM.

SIGTERM: a drain (serve/http.py's Server): /health turns 503 and new requests get 503 `draining`
while the listening socket stays open; once the requests in flight are answered the socket closes,
the model threads stop, exit 0. A model that fails to load exits 1."""
from __future__ import annotations

import argparse
import logging
import sys

from postembed_fast.serve.options import ServeConfig, add_arguments

PROG = "python -m postembed_fast.serve"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve embeddings over HTTP (OpenAI- and TEI-compatible).")
    add_arguments(p)
    return p


def missing_extra() -> str | None:
    from postembed_fast.cli_args import missing_extra as missing

    return missing("serve", "orjson", "prometheus_client", "starlette", "uvicorn")


def serve(cfg: ServeConfig) -> int:
    from postembed_fast.serve.app import create_app
    from postembed_fast.serve.http import Server

    level = cfg.log_level.upper() if cfg.log_level != "trace" else "DEBUG"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("postembed_fast.serve").setLevel(level)
    failed: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:  # the model thread (started by the lifespan): loading failed
        failed.append(exc)
        server.should_exit = True

    app = create_app(cfg, on_fatal=on_fatal)
    server = Server(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, lifespan="on")
    started = server.run_until_signal()  # SIGTERM: drain (503s, listener open), lifespan shutdown, then here
    return 1 if failed or not started else 0  # not started: could not bind (uvicorn logged why)


def main(argv=None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    problem = missing_extra()
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    return serve(ServeConfig.from_args(args))


if __name__ == "__main__":
    sys.exit(main())
