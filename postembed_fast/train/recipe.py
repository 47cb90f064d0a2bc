"""The training recipe: a pre-trained encoder + mean pooling + Dense (hidden -> dim) + Normalize,
fine-tuned with in-batch-negative contrastive loss over several tasks at once, by
sentence-transformers' trainer (SentenceTransformerTrainer: round-robin over one dataset per task,
`no_duplicates` batches, MultipleNegativesRankingLoss or another loss of LOSSES). Nothing here is a
hand-written training loop.

The Dense layer starts as the PCA projection of the base model's pooled embeddings of training
posts: step 0 is then "the base model reduced to dim by PCA" (the cheap baseline) rather than a
random projection that training must first undo, which matters with a few hundred CPU steps.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from postembed_fast.ranges import FOLDER_MEAN_FILE, FOLDER_RANGES_FILE
from postembed_fast.train.data import Post
from postembed_fast.train.tasks import TRAIN_TASKS, training_pairs

RECIPE_FILE = "postembed_train.json"
# The contrastive losses of the recipe, all sentence-transformers' own (bench.train_compare's rows):
#   mnrl         MultipleNegativesRankingLoss: in-batch negatives (the default)
#   cached-mnrl  CachedMultipleNegativesRankingLoss (GradCache): the same loss over a batch embedded
#                CACHED_MINI_BATCH pairs at a time, so a larger batch (more negatives) fits the memory
#   gist         GISTEmbedLoss with the base model as guide: an in-batch "negative" the guide scores
#                above the positive is not pushed away (same-section posts that are true positives)
LOSSES = ("mnrl", "cached-mnrl", "gist")
CACHED_MINI_BATCH = 32
# Mined hard negatives (Recipe.hard_negatives): sentence-transformers' mine_hard_negatives with the base
# encoder over each task's pairs, taking the most similar candidate scored below 95% of the positive
# (NV-Retriever's TopK-PercPos: a candidate closer than that is likely an unlabelled positive), then
# dropping those the labels make positives (tasks.labelled_positive). Mining embeds every pair, so it
# runs on the pairs training can reach: HARD_NEGATIVE_POOL x the pairs the task's steps draw.
HARD_NEGATIVE_MARGIN = 0.05
HARD_NEGATIVE_CANDIDATES = 4  # mined per query, best first; the first not labelled a positive is kept
HARD_NEGATIVE_POOL = 2
PCA_SAMPLE = 4000  # training posts the Dense layer's PCA is fitted on
VALIDATION_PAIRS = 128  # pairs per task for the per-task validation loss in the log


@dataclass
class Recipe:
    """Defaults: the CPU recipe (about 20-25 min on 2 cores, see README "Post-embedding model").
    Why these numbers: a step of batch 32 at 128 tokens costs about 3 s here with every layer
    trained; at 96 tokens with the embeddings and the lower 3 of 6 layers frozen it still cost 3 s
    (measured; 7 s with other jobs running), so training truncates posts at 64 tokens (the median
    post is about 70: most of the first paragraph) and takes 4 tasks x 100 steps. `full()` is the
    GPU-size recipe: every layer trained, 256 tokens, 10x the steps, batch 128."""

    tasks: tuple[str, ...] = TRAIN_TASKS
    dim: int | None = 50  # None: no Dense (the encoder's hidden size)
    steps_per_task: int = 100
    batch_size: int = 32
    max_seq_length: int = 64  # while training; the saved folder embeds up to serve_max_seq_length
    serve_max_seq_length: int | None = None  # None: the base model's (256 for the default)
    freeze_layers: int = 3  # the embeddings and this many lower encoder layers do not train
    # 2e-4, not 5e-5: with a few hundred steps the higher rate gets further (bench.train_compare's
    # multi-50-lr2e-4 row: mean 0.8572 vs 0.8544 at 5e-5, same cost); full() keeps 5e-5 for its 6,000 steps
    learning_rate: float = 2e-4
    warmup_steps: int = 30
    seed: int = 0
    device: str | None = None  # None: cuda if available, else cpu
    eval_every: int = 50
    dtype: str = "auto"  # TRAIN_DTYPES: bf16 autocast where the CPU has native bf16 (resolve_train_dtype)
    loss: str = "mnrl"  # LOSSES
    hard_negatives: bool = False  # a mined hard negative per pair (HARD_NEGATIVE_*), one more text per pair
    # MatryoshkaLoss over the full width and its first `dim` dimensions: the Dense keeps the hidden
    # width (hidden -> hidden, PCA-initialized), the folder records truncate_dim = dim, so it serves
    # dim by default and the full width on request (Embedder(folder, truncate_dim=384))
    matryoshka: bool = False
    # steps split over the tasks in these proportions (aligned with tasks) instead of equally: each
    # task's pairs are cut to its steps x batch_size and the trainer's proportional sampler draws
    # every batch once, so a task gets exactly its share (None: round-robin, steps_per_task each)
    task_weights: tuple[float, ...] | None = None

    @property
    def steps(self) -> int:
        return self.steps_per_task * len(self.tasks)

    def task_steps(self) -> dict[str, int]:
        """Optimizer steps per task (they sum to `steps`, up to rounding of weighted shares)."""
        if self.task_weights is None:
            return {t: self.steps_per_task for t in self.tasks}
        total = sum(self.task_weights)
        return {t: max(1, round(self.steps * w / total)) for t, w in zip(self.tasks, self.task_weights)}

    @classmethod
    def full(cls, **kw) -> "Recipe":
        base = dict(steps_per_task=1500, batch_size=128, max_seq_length=256, freeze_layers=0,
                    learning_rate=5e-5, warmup_steps=300, eval_every=500)
        base.update(kw)
        return cls(**base)

    def check(self) -> None:
        bad = [t for t in self.tasks if t not in TRAIN_TASKS]
        if not self.tasks or bad:
            raise ValueError(f"tasks must be a non-empty subset of {', '.join(TRAIN_TASKS)}; got {list(self.tasks)}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat: {list(self.tasks)}")
        for name in ("steps_per_task", "batch_size", "max_seq_length", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: in-batch negatives need another pair in the batch")
        if self.dim is not None and self.dim < 1:
            raise ValueError(f"dim must be >= 1 (or None for no Dense), got {self.dim}")
        if self.dtype not in TRAIN_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.task_weights is not None and (len(self.task_weights) != len(self.tasks)
                                              or not all(w > 0 for w in self.task_weights)):
            raise ValueError(f"task_weights must be one positive weight per task ({', '.join(self.tasks)}), "
                             f"got {self.task_weights}")
        if self.matryoshka and self.dim is None:
            raise ValueError("matryoshka needs dim (the prefix served by default); got dim=None")
        if self.freeze_layers < 0 or self.warmup_steps < 0 or not self.learning_rate > 0:
            raise ValueError("freeze_layers and warmup_steps must be >= 0 and learning_rate > 0")


def _st():
    try:
        import datasets  # noqa: F401
        import sentence_transformers
    except ImportError as exc:
        raise ImportError(f"training needs the train extra ({exc.name} is missing): "
                          "pip install 'postembed_fast[train]'") from None
    return sentence_transformers


def _modules():
    try:  # sentence-transformers >= 6 moved them; the old path still works with a warning
        from sentence_transformers.sentence_transformer import modules
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def resolve_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


TRAIN_DTYPES = ("auto", "float32", "bfloat16")


def resolve_train_dtype(dtype: str, device: str) -> tuple[str, str]:
    """(float32 | bfloat16, why) for Recipe.dtype on `device`. bfloat16 = the trainer's bf16 autocast
    (weights, optimizer state and the loss stay float32). auto on a CPU follows the engine's capability
    table (kernels/cpu_isa.py: POSTEMBED_CPU_DTYPE, else bf16 with AMX-BF16 / AVX512-BF16, where bf16
    GEMMs run several times faster than float32; without them bf16 is emulated and slower); auto on a
    GPU stays float32 (not measured there yet)."""
    if dtype not in TRAIN_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(TRAIN_DTYPES)}, got {dtype!r}")
    if dtype != "auto":
        return dtype, "asked for"
    if device != "cpu":
        return "float32", f"auto on {device}: float32 (bf16 training not measured there)"
    from postembed_fast.kernels import cpu_isa

    d, why = cpu_isa.compute_dtype()
    return str(d).removeprefix("torch."), f"auto on this CPU: {why}"


def encoder_model(base, max_seq_length: int | None, device: str):
    """SentenceTransformer of the base folder's Transformer + mean Pooling only (its Dense and
    Normalize modules, if any, dropped): what the new head is put on."""
    st = _st()
    from postembed_fast.loading import resolve_model

    folder, _ = resolve_model(base)
    m = _modules()
    full = st.SentenceTransformer(str(folder), device=device)
    transformer = full[0]
    if not isinstance(transformer, m.Transformer):
        raise ValueError(f"{folder}: the first module is {type(transformer).__name__}, not a Transformer")
    transformer.base_max_seq_length = transformer.max_seq_length
    if max_seq_length is not None:
        transformer.max_seq_length = max_seq_length
    width = getattr(transformer, "get_embedding_dimension", None) or transformer.get_word_embedding_dimension
    pooling = m.Pooling(width(), pooling_mode="mean")
    return st.SentenceTransformer(modules=[transformer, pooling], device=device)


def _width(model) -> int:
    """A SentenceTransformer's output width (the method was renamed in sentence-transformers 6)."""
    return (getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension)()


def pca_projection(pooled: np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [dim, hidden], b [dim]) with W x + b = the top-dim principal components of x - mean."""
    x = torch.as_tensor(pooled, dtype=torch.float64)
    if dim > min(x.shape):
        raise ValueError(f"dim={dim} exceeds what {x.shape[0]} posts of width {x.shape[1]} can give by PCA")
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    w = vh[:dim]
    return w.float(), (-(w @ mean)).float()


def with_head(encoder, dim: int | None, pooled_sample: np.ndarray | None):
    """encoder (Transformer + Pooling) + [Dense(hidden -> dim, identity, PCA-initialized)] + Normalize.
    (A Matryoshka recipe passes dim = hidden: a full PCA rotation, whose first k outputs are PCA-k.)"""
    st = _st()
    m = _modules()
    mods = [encoder[0], encoder[1]]
    if dim is not None:
        w, b = pca_projection(pooled_sample, dim)
        mods.append(m.Dense(w.shape[1], dim, bias=True, activation_function=torch.nn.Identity(),
                            init_weight=w, init_bias=b))
    mods.append(m.Normalize())
    return st.SentenceTransformer(modules=mods, device=str(encoder.device))


def pooled_embeddings(encoder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    return encoder.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False,
                          show_progress_bar=False)


def freeze_lower_layers(model, n: int) -> None:
    """The word/position embeddings and the first n encoder layers stop training (fewer backward FLOPs)."""
    if n == 0:
        return
    hf = model[0].auto_model
    layers = hf.encoder.layer
    if n > len(layers):
        raise ValueError(f"freeze_layers={n} but the encoder has {len(layers)} layers")
    for mod in [hf.embeddings, *layers[:n]]:
        for p in mod.parameters():
            p.requires_grad_(False)


def _pair_datasets(posts: list[Post], tasks, seed: int, limit: int | None = None):
    from datasets import Dataset

    out = {}
    for task in tasks:
        pairs = training_pairs(task, posts, seed)
        if limit is not None:
            pairs = pairs[:limit]
        if len(pairs) < 2:
            raise ValueError(f"task {task!r}: only {len(pairs)} training pair(s) in this data; "
                             "it needs posts with " + {"search": "titles", "storyline": "siblings (same source)",
                                                       "interest": "shared topical tags",
                                                       "hashtag": "tags"}[task])
        out[task] = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
    return out


def build_pca_model(base, train_posts: list[Post], dim: int, out, *, max_seq_length: int | None = None,
                    device: str | None = None, seed: int = 0):
    """The cheap baseline: the base encoder with a PCA projection to dim, no training."""
    device = resolve_device(device)
    encoder = encoder_model(base, max_seq_length, device)
    sample = _pca_sample(train_posts, seed)
    model = with_head(encoder, dim, pooled_embeddings(encoder, sample))
    model.save(str(out))
    return model


def _pca_sample(posts: list[Post], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(posts))[:PCA_SAMPLE]
    return [posts[i].text for i in sorted(idx)]


def train(recipe: Recipe, splits: dict[str, list[Post]], out, *, base=None, progress: bool = True,
          log=print) -> dict:
    """Train one model into folder `out` (a sentence-transformers folder). Returns the run record
    (recipe, timings, per-task validation losses), also written to out/postembed_train.json."""
    recipe.check()
    st = _st()
    device = resolve_device(recipe.device)
    train_dtype, dtype_why = resolve_train_dtype(recipe.dtype, device)
    torch.manual_seed(recipe.seed)
    out = Path(out)
    t0 = time.perf_counter()

    encoder = encoder_model(base, recipe.max_seq_length, device)
    pooled = pooled_embeddings(encoder, _pca_sample(splits["train"], recipe.seed)) if recipe.dim else None
    head_dim = _width(encoder) if recipe.matryoshka else recipe.dim
    model = with_head(encoder, head_dim, pooled)
    freeze_lower_layers(model, recipe.freeze_layers)
    train_sets = _pair_datasets(splits["train"], recipe.tasks, recipe.seed)
    task_steps = recipe.task_steps()
    if recipe.task_weights is not None:  # each task's share of the steps, one pass of the proportional sampler
        for t, n in task_steps.items():
            if len(train_sets[t]) < n * recipe.batch_size:
                raise ValueError(f"task {t!r}: {n} steps of batch {recipe.batch_size} need "
                                 f"{n * recipe.batch_size} pairs; the data has {len(train_sets[t])}")
            train_sets[t] = train_sets[t].select(range(n * recipe.batch_size))
    mining = None
    if recipe.hard_negatives:  # mined by the base encoder, before any training
        t_mine = time.perf_counter()
        train_sets, mining = mine_negatives(train_sets, encoder, splits["train"], recipe)
        mining["seconds"] = round(time.perf_counter() - t_mine, 1)
        log(f"mined hard negatives in {mining['seconds']} s: " + ", ".join(
            f"{t} {m['kept']}/{m['pairs']}" for t, m in mining["tasks"].items()))
    eval_sets = _pair_datasets(splits["validation"], recipe.tasks, recipe.seed, limit=VALIDATION_PAIRS)
    log("pairs per task: " + ", ".join(f"{k} {len(v)}" for k, v in train_sets.items())
        + f"; {recipe.steps} steps ({', '.join(f'{t} {n}' for t, n in task_steps.items())}) of batch {recipe.batch_size}"
        + f" at <= {recipe.max_seq_length} tokens on {device} in {train_dtype} ({dtype_why})")

    try:
        from sentence_transformers.sentence_transformer import losses
    except ImportError:
        from sentence_transformers import losses
    import tempfile

    with tempfile.TemporaryDirectory(prefix="postembed-train-") as scratch:
        args = st.SentenceTransformerTrainingArguments(
            output_dir=scratch, max_steps=recipe.steps, per_device_train_batch_size=recipe.batch_size,
            per_device_eval_batch_size=recipe.batch_size, learning_rate=recipe.learning_rate,
            warmup_steps=recipe.warmup_steps, seed=recipe.seed, data_seed=recipe.seed,
            batch_sampler="no_duplicates",  # a repeated text in a batch would be a false negative
            # equal steps per task, or each task's weighted share (the datasets were cut to it)
            multi_dataset_batch_sampler="round_robin" if recipe.task_weights is None else "proportional",
            eval_strategy="steps", eval_steps=recipe.eval_every, logging_steps=max(1, recipe.eval_every // 2),
            save_strategy="no", report_to="none", use_cpu=(device == "cpu"), disable_tqdm=not progress,
            dataloader_num_workers=0, fp16=False, bf16=train_dtype == "bfloat16")
        trainer = st.SentenceTransformerTrainer(model=model, args=args, train_dataset=train_sets,
                                                eval_dataset=eval_sets,
                                                loss=make_loss(recipe, model, losses, base, device))
        before = trainer.evaluate()
        trainer.train()
        history = [dict(h) for h in trainer.state.log_history]
    train_s = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    # Trained at max_seq_length for speed, served at the base's length (all-MiniLM-L6-v2 itself was
    # trained at 128 tokens and is served at 256): truncating posts at serving time would lose text.
    model.max_seq_length = recipe.serve_max_seq_length or encoder[0].base_max_seq_length
    if recipe.matryoshka:
        model.truncate_dim = recipe.dim  # config_sentence_transformers.json: served at dim by default
    model.save(str(out))
    val_loss = {t: {"before": before.get(f"eval_{t}_loss"),
                    "after": next((h[f"eval_{t}_loss"] for h in reversed(history) if f"eval_{t}_loss" in h), None)}
                for t in recipe.tasks}
    ranges = write_ranges(out, [p.text for p in splits["validation"]], device)
    record = {"recipe": {**asdict(recipe), "device": device}, "base": str(base or "all-MiniLM-L6-v2"),
              "train_dtype": train_dtype, "train_dtype_reason": dtype_why,
              "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / recipe.steps, 3),
              "validation_loss": val_loss, "log_history": history, "ranges_shape": list(ranges.shape),
              "hard_negatives": mining}
    (out / RECIPE_FILE).write_text(json.dumps(record, indent=1))
    return record


def make_loss(recipe: Recipe, model, losses, base, device: str):
    """The recipe's loss (LOSSES) over `model`, wrapped in MatryoshkaLoss (the full width and the
    first recipe.dim dimensions, equal weights) for a Matryoshka recipe; gist's guide is a frozen copy
    of the base encoder (mean pooled, no Dense: its similarities only decide which in-batch negatives
    to mask)."""
    if recipe.loss == "cached-mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=min(CACHED_MINI_BATCH,
                                                                                    recipe.batch_size))
    elif recipe.loss == "gist":
        guide = encoder_model(base, recipe.max_seq_length, device)
        guide.requires_grad_(False)
        loss = losses.GISTEmbedLoss(model, guide=guide)
    else:
        loss = losses.MultipleNegativesRankingLoss(model)
    if recipe.matryoshka:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=[_width(model), recipe.dim])
    return loss


def mine_negatives(train_sets: dict, encoder, posts: list[Post], recipe: Recipe) -> tuple[dict, dict]:
    """Each task's (anchor, positive) dataset -> (anchor, positive, negative), mined by `encoder` with
    sentence-transformers' mine_hard_negatives (HARD_NEGATIVE_* above). Returns (datasets, report)."""
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    from postembed_fast.train.tasks import labelled_positive

    out, report = {}, {"margin": HARD_NEGATIVE_MARGIN, "pool": HARD_NEGATIVE_POOL, "tasks": {}}
    task_steps = recipe.task_steps()
    for task, ds in train_sets.items():
        reach = HARD_NEGATIVE_POOL * task_steps[task] * recipe.batch_size
        ds = ds.select(range(min(len(ds), reach)))  # training_pairs are shuffled: a random subset
        # "triplet" keeps each (query, positive) with the candidates found, best first, one row each
        # ("n-tuple" would drop a query with fewer than HARD_NEGATIVE_CANDIDATES under the margin)
        mined = mine_hard_negatives(ds, encoder, anchor_column_name="anchor", positive_column_name="positive",
                                    relative_margin=HARD_NEGATIVE_MARGIN, num_negatives=HARD_NEGATIVE_CANDIDATES,
                                    sampling_strategy="top", output_format="triplet", batch_size=64,
                                    verbose=False)
        is_positive = labelled_positive(task, posts)
        rows, done = {"anchor": [], "positive": [], "negative": []}, set()
        labelled = 0
        for r in mined:
            key = (r["anchor"], r["positive"])
            if key in done:
                continue
            if is_positive(r["anchor"], r["negative"]):
                labelled += 1
                continue
            done.add(key)
            for k in rows:
                rows[k].append(r[k])
        if len(rows["anchor"]) < 2:
            raise ValueError(f"task {task!r}: mining left {len(rows['anchor'])} pair(s) with a hard negative")
        out[task] = Dataset.from_dict(rows)
        report["tasks"][task] = {"pairs": len(ds), "kept": len(rows["anchor"]), "labelled_positive_skipped": labelled}
    return out, report


def write_ranges(folder, texts: list[str], device: str) -> np.ndarray:
    """int8 ranges and the mean embedding of the model in `folder`, calibrated by the engine on
    held-out posts (validation), saved where Embedder finds them (postembed_fast.ranges)."""
    from postembed_fast import Embedder

    emb = Embedder(str(folder), device=device if device != "cuda" else None, dtype="float32")
    ranges = emb.calibrate(texts)
    for name, array in ((FOLDER_RANGES_FILE, ranges), (FOLDER_MEAN_FILE, emb.embedding_mean)):
        tmp = Path(folder) / (name + ".tmp.npy")
        np.save(tmp, array)
        os.replace(tmp, Path(folder) / name)
    return ranges
