"""`python -m postembed_fast.serve ...`: runs the server on uvicorn until SIGINT/SIGTERM.

SIGTERM: /health turns 503, the listening socket closes, requests in flight are finished, the
model threads stop, exit 0. A model that fails to load exits 1."""
from __future__ import annotations

import argparse
import logging
import signal
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
    import uvicorn

    from postembed_fast.serve.app import create_app

    level = cfg.log_level.upper() if cfg.log_level != "trace" else "DEBUG"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("postembed_fast.serve").setLevel(level)
    exit_code = [0]
    server_box: list = []

    def on_fatal(exc: BaseException) -> None:  # the model thread: loading failed
        exit_code[0] = 1
        if server_box:
            server_box[0].should_exit = True

    app = create_app(cfg, on_fatal=on_fatal)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):  # stop advertising health before the socket closes
            app.state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            access_log=cfg.log_level in ("debug", "trace"), lifespan="on",
                            timeout_graceful_shutdown=None, server_header=False)
    server = Server(config)
    server_box.append(server)
    # uvicorn re-raises the signal it caught once it has shut down; with Python's default SIGTERM
    # disposition that would kill the process (exit 143) after a clean drain. A no-op handler makes
    # the drained shutdown exit 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    server.run()
    if exit_code[0] == 0 and not server.started:
        return 1  # could not bind, or startup failed (uvicorn logged why)
    return exit_code[0]


def main(argv=None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    problem = missing_extra()
    if problem:
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    return serve(ServeConfig.from_args(args))


if __name__ == "__main__":
    sys.exit(main())
