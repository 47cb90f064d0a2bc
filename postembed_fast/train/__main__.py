"""python -m postembed_fast.train --data POSTS.jsonl.gz --out models/post-embed-50 [options]

Fine-tunes the base encoder (default all-MiniLM-L6-v2) with multi-task contrastive learning into a
sentence-transformers folder (Transformer, Pooling, Dense hidden -> dim, Normalize) that
SentenceTransformer(path) and postembed_fast.Embedder(path) both load, with its int8 ranges
(calibrated on validation posts), then prints the triplet-accuracy table of the new model and the
base on the data's test split.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from postembed_fast.cli_args import missing_extra as missing
from postembed_fast.cli_args import positive_int
from postembed_fast.options import ModelOptions, add_model_args
from postembed_fast.train.data import read_posts, split_posts
from postembed_fast.train.tasks import TRAIN_TASKS

PROG = "python -m postembed_fast.train"


def _tasks(s: str) -> tuple[str, ...]:
    tasks = tuple(t.strip() for t in s.split(",") if t.strip())
    bad = [t for t in tasks if t not in TRAIN_TASKS]
    if not tasks or bad:
        raise argparse.ArgumentTypeError(f"unknown task(s) {', '.join(bad) or '(none)'}; "
                                         f"valid: a comma-separated subset of {','.join(TRAIN_TASKS)}")
    return tasks


def _task_weights(s: str) -> dict[str, float]:
    """`--task-weights search=1.5,interest=0.5,...` -> {task: weight} (Recipe.check validates the weights)."""
    out = {}
    for item in (x.strip() for x in s.split(",") if x.strip()):
        task, sep, w = item.partition("=")
        try:
            weight = float(w)
        except ValueError:
            sep = ""
        if not sep or task not in TRAIN_TASKS or task in out:
            raise argparse.ArgumentTypeError(f"bad --task-weights item {item!r}: expected TASK=WEIGHT with TASK "
                                             f"one of {','.join(TRAIN_TASKS)} (once each) and WEIGHT a number")
        out[task] = weight
    if not out:
        raise argparse.ArgumentTypeError("--task-weights is empty")
    return out


def _dim(s: str):
    """`--dim`: a positive integer, or none/full/0 for no Dense layer."""
    if s.lower() in ("none", "full", "0"):
        return None
    try:
        return positive_int(s)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"--dim must be a positive integer or 'none': {exc}") from None


def missing_extra() -> str | None:
    return missing("train", "sentence_transformers", "datasets", "accelerate")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of the train command (also `postembed-fast train`): they import no part of the extra."""
    from postembed_fast.train.recipe import Recipe  # the defaults; sentence-transformers loads in train()

    d = Recipe()
    p.add_argument("--data", required=True,
                   help="posts, JSONL(.gz) or Parquet (fields id, source, section, title, text, tags)")
    p.add_argument("--out", required=True, help="output model folder")
    p.add_argument("--base", default=None, help="base encoder folder (default: all-MiniLM-L6-v2)")
    p.add_argument("--tasks", type=_tasks, default=d.tasks, help=f"comma-separated (default {','.join(d.tasks)})")
    p.add_argument("--dim", type=_dim, default=d.dim, help=f"output dimension, or 'none' for no Dense (default {d.dim})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"total optimizer steps, split evenly over the tasks (default {d.steps_per_task} per task)")
    p.add_argument("--batch-size", type=int, default=None, help=f"pairs per batch (default {d.batch_size})")
    p.add_argument("--max-seq-length", type=int, default=None, help=f"training truncation (default {d.max_seq_length})")
    p.add_argument("--freeze-layers", type=int, default=None, help=f"lower encoder layers not trained (default {d.freeze_layers})")
    p.add_argument("--learning-rate", type=float, default=None, help=f"default {d.learning_rate}")
    add_model_args(p, only=("device",))  # the base model is --base; --dtype below is the training's
    p.add_argument("--dtype", dest="train_dtype", choices=("auto", "float32", "bfloat16"), default=d.dtype,
                   help="training precision: bfloat16 = bf16 autocast (float32 weights and optimizer); auto "
                        "(default): bfloat16 on a CPU with AMX-BF16 or AVX512-BF16 (POSTEMBED_CPU_DTYPE "
                        "overrides), float32 elsewhere")
    p.add_argument("--loss", choices=("mnrl", "cached-mnrl", "gist"), default=d.loss,
                   help="contrastive loss: mnrl = MultipleNegativesRankingLoss (default), cached-mnrl = its "
                        "GradCache form (large batches at small memory), gist = GISTEmbedLoss guided by the base")
    p.add_argument("--hard-negatives", action="store_true",
                   help="add a hard negative per pair, mined by the base model (sentence-transformers' "
                        "mine_hard_negatives: the closest candidate under 95%% of the positive's score that the "
                        "labels do not make a positive)")
    p.add_argument("--matryoshka", action="store_true",
                   help="MatryoshkaLoss over the full width and its first --dim dimensions: one folder serves "
                        "--dim by default and the full width on request")
    p.add_argument("--task-weights", type=_task_weights, default=None,
                   help="split the steps over the tasks in these proportions, e.g. search=1.5,storyline=0.75,"
                        "interest=0.5,hashtag=1.25 (every task of --tasks; default: equal steps)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--full", action="store_true",
                   help="the GPU-size recipe: all layers, 256 tokens, batch 128, 1,500 steps per task")
    p.add_argument("--no-eval", action="store_true", help="skip the triplet evaluation at the end")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --out")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p


def _exit_usage(prog: str, message: str):
    """A bad option, bad data, a missing extra: `prog: error: message`, exit 2 (as argparse's own errors)."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def recipe_from_args(a):
    """The Recipe of the parsed flags; ValueError for a bad combination."""
    from postembed_fast.train.recipe import Recipe

    kw = {"tasks": a.tasks, "dim": a.dim, "device": ModelOptions.from_args(a).device, "seed": a.seed,
          "dtype": a.train_dtype, "loss": a.loss, "hard_negatives": a.hard_negatives, "matryoshka": a.matryoshka}
    for name in ("batch_size", "max_seq_length", "freeze_layers", "learning_rate"):
        if getattr(a, name) is not None:
            kw[name] = getattr(a, name)
    if a.task_weights is not None:
        if set(a.task_weights) != set(a.tasks):
            raise ValueError(f"--task-weights must give every task of --tasks ({','.join(a.tasks)}) a weight; "
                             f"got {','.join(a.task_weights)}")
        kw["task_weights"] = tuple(a.task_weights[t] for t in a.tasks)
    r = Recipe.full(**kw) if a.full else Recipe(**kw)
    if a.steps is not None:
        if a.steps < len(r.tasks):
            raise ValueError(f"--steps must be >= the number of tasks ({len(r.tasks)}), got {a.steps}")
        r.steps_per_task = -(-a.steps // len(r.tasks))
    r.eval_every = min(r.eval_every, r.steps)
    r.warmup_steps = min(r.warmup_steps, r.steps // 10)
    r.check()
    return r


def run_from_args(a, prog: str = PROG) -> int:
    """Train from parsed add_arguments() flags (this module's main and `postembed-fast train`). A bad
    option, bad data or a missing extra: `prog: error: ...` and SystemExit(2)."""
    problem = missing_extra()
    if problem:
        _exit_usage(prog, problem)
    try:
        recipe = recipe_from_args(a)
    except ValueError as exc:
        _exit_usage(prog, str(exc))
    out = Path(a.out)
    if (out / "modules.json").exists() and not a.overwrite:
        _exit_usage(prog, f"{out} already holds a model; pass --overwrite to replace it")
    try:
        posts = read_posts(a.data)
        from postembed_fast.train import recipe as rc  # needs the train extra

        splits = split_posts(posts)
        print(f"{len(posts)} posts: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()) + " (split by source)",
              file=sys.stderr)
        record = rc.train(recipe, splits, out, base=a.base, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, ImportError) as exc:
        _exit_usage(prog, str(exc))
    print(f"saved {out} ({record['train_seconds']} s, {record['seconds_per_step']} s/step in "
          f"{record['train_dtype']}); validation loss per task:",
          file=sys.stderr)
    for task, v in record["validation_loss"].items():
        print(f"  {task:10s} {v['before']:.4f} -> {v['after']:.4f}", file=sys.stderr)
    if not a.no_eval:
        from postembed_fast.train import evaluate as ev

        triplets = ev.load_triplets(posts, seed=a.seed)
        by_id = {p.id: p for p in posts}
        summaries = []
        for name, path in (("base", a.base or "all-MiniLM-L6-v2"), (out.name, str(out))):
            info, correct = ev.score_model(path, triplets, by_id, device=recipe.device)
            summaries.append(ev.summarize(name, info, correct))
        table = ev.format_table(summaries)
        print(table)
        record["evaluation"] = summaries
        (out / rc.RECIPE_FILE).write_text(json.dumps(record, indent=1))
    return 0


def main(argv=None, prog: str = PROG) -> int:
    return run_from_args(build_parser(prog).parse_args(argv), prog)


if __name__ == "__main__":
    sys.exit(main())
