"""Near-line: embed every new post from a Redis stream within seconds, and keep a searchable index of them.

    python -m postembed_fast.nearline embed --redis redis://127.0.0.1:6379/0 --stream posts --group embedders
    python -m postembed_fast.nearline index --redis redis://127.0.0.1:6379/0 --snapshot DIR --port 8081

- `worker.py`: the consumer-group worker (stream in -> one embed() call per micro-batch -> the store
  and the output stream in one transaction, at least once).
- `index_updater.py`: the output stream -> an EmbeddingIndex, snapshots and resume, GET /search.
- `store.py`: the Redis layout (keys, vector bytes, ranges, tombstones, the conditional store), the
  one place every writer and reader takes it from.
A system part: it uses the engine's public API only. Heavy imports (redis, the model) happen inside
the functions that need them.
"""
from __future__ import annotations

import argparse
import sys

from postembed_fast.nearline.index_updater import add_index_arguments
from postembed_fast.nearline.worker import PROG, add_embed_arguments, run_from_args


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Near-line embedding from a Redis stream.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    e = sub.add_parser("embed", help="embed new posts of a Redis stream into Redis (a consumer-group worker)")
    add_embed_arguments(e)
    i = sub.add_parser("index", help="keep a searchable EmbeddingIndex of the output stream; GET /search "
                                     "(snapshots to disk, resumes from them)")
    add_index_arguments(i)
    return p


def main(argv=None, prog: str = PROG) -> int:
    args = build_parser(prog).parse_args(argv)
    if args.command == "index":
        from postembed_fast.nearline.index_updater import (
            run_from_args as run_index_from_args,
        )

        return run_index_from_args(args, f"{prog} index")
    return run_from_args(args, prog)


def __getattr__(name):
    """The names of the former flat module postembed_fast.nearline (now worker.py and store.py)."""
    from postembed_fast import _deprecated
    from postembed_fast.nearline import store, worker

    old_store = {"_RANGES_INFIX": "RANGES_INFIX", "_TOMBSTONE_INFIX": "TOMBSTONE_INFIX", "_STORE_LUA": "STORE_LUA"}
    if name in old_store:
        _deprecated.moved(f"postembed_fast.nearline.{name}", f"postembed_fast.nearline.store.{old_store[name]}")
        return getattr(store, old_store[name])
    if not name.startswith("__") and hasattr(worker, name):
        _deprecated.moved(f"postembed_fast.nearline.{name}", f"postembed_fast.nearline.worker.{name}")
        return getattr(worker, name)
    raise AttributeError(f"module 'postembed_fast.nearline' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
