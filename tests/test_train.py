"""The post-embedding recipe (postembed_fast.train): data validation, task pairs and triplets, a tiny
random BERT trained for a few steps by sentence-transformers' trainer, the saved folder served by the
engine, the evaluate and train commands. The real recipe's numbers are bench/train_compare.py's."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("sentence_transformers", reason="needs the train extra: pip install 'postembed_fast[train]'")
pytest.importorskip("datasets", reason="needs the train extra: pip install 'postembed_fast[train]'")

from postembed_fast import Embedder, fast_embed  # noqa: E402
from postembed_fast.loading import default_model_folder  # noqa: E402
from postembed_fast.ranges import FOLDER_MEAN_FILE, FOLDER_RANGES_FILE  # noqa: E402
from postembed_fast.train import evaluate as ev  # noqa: E402
from postembed_fast.train.__main__ import main as train_main  # noqa: E402
from postembed_fast.train.data import read_posts, split_of, split_posts, tag_phrase  # noqa: E402
from postembed_fast.train.recipe import Recipe, resolve_train_dtype, train  # noqa: E402
from postembed_fast.train.tasks import (EVAL_TASKS, TRAIN_TASKS, build_triplets, read_triplets,  # noqa: E402
                                        training_pairs, write_triplets)

SAMPLE = Path(__file__).parent / "data" / "train-posts.jsonl.gz"


@pytest.fixture(scope="module")
def posts():
    return read_posts(SAMPLE)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory, posts):
    """A few hundred posts of the sample (whole sources, so siblings stay together)."""
    keep = {p.source for p in posts[:700]}
    path = tmp_path_factory.mktemp("data") / "posts.jsonl"
    with open(path, "w") as f:
        for p in posts:
            if p.source in keep:
                f.write(json.dumps({"id": p.id, "source": p.source, "section": p.section, "title": p.title,
                                    "text": p.text[:400], "tags": list(p.tags)}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer BERT (hidden 64) with the default model's tokenizer: trains in seconds."""
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    cfg = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=128, max_position_embeddings=128)
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder, safe_serialization=True)
    src = default_model_folder()
    for name in ("vocab.txt", "tokenizer.json", "special_tokens_map.json"):
        shutil.copy(src / name, folder / name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    tok_cfg["model_max_length"] = 128
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_data, tiny_bert):
    out = tmp_path_factory.mktemp("model") / "tiny-50"
    recipe = Recipe(dim=16, steps_per_task=5, batch_size=8, max_seq_length=32, freeze_layers=0,
                    learning_rate=1e-3, warmup_steps=2, eval_every=20, device="cpu")
    record = train(recipe, split_posts(read_posts(small_data)), out, base=tiny_bert, progress=False,
                   log=lambda m: None)
    return out, record


# ---- data -----------------------------------------------------------------------------------------
def test_split_is_by_source_and_stable(posts):
    splits = split_posts(posts)
    assert sum(map(len, splits.values())) == len(posts)
    where = {p.source: name for name, ps in splits.items() for p in ps}
    for name, ps in splits.items():
        assert all(where[p.source] == name for p in ps)  # siblings never straddle splits
    assert all(split_of(p.source) == where[p.source] for p in posts)
    assert 0.08 < len(splits["test"]) / len(posts) < 0.25


@pytest.mark.parametrize("tag, phrase", [("implemented-in::perl", "implemented in perl"),
                                         ("field::biology:bioinformatics", "field biology bioinformatics"),
                                         ("works-with::software:source", "works with software source")])
def test_tag_phrase(tag, phrase):
    assert tag_phrase(tag) == phrase


@pytest.mark.parametrize("content, message", [
    ("", "no posts"),
    ('{"id": "a", "source": "s", "section": "x", "title": "t", "text": "u"}\nnot json\n',
     ":2: invalid JSON: Expecting value at character 1"),
    ('{"id": "a", "source": "s", "title": "t", "text": "u"}\n', ":1: missing field(s) section"),
    ('{"id": "a", "source": "s", "section": "x", "title": "t", "text": 5}\n', ":1: field(s) text must be strings"),
    ('[1, 2]\n', ":1: not a JSON object (list)"),
    ('{"id": "a", "source": "s", "section": "x", "title": "t", "text": "u", "tags": "x"}\n', ":1: tags must be a list"),
    ('{"id": "a", "source": "s", "section": "x", "title": "t", "text": "u"}\n' * 2, ":2: id 'a' repeats line 1"),
])
def test_bad_data_names_the_line(tmp_path, content, message):
    path = tmp_path / "posts.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_posts(path)


def test_missing_data_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_posts(tmp_path / "nope.jsonl")


# ---- tasks ----------------------------------------------------------------------------------------
def test_training_pairs_follow_their_task(posts):
    train_posts = split_posts(posts)["train"]
    by_text = {}
    for p in train_posts:
        by_text.setdefault(p.text, []).append(p)
    titles = {}
    for p in train_posts:
        titles.setdefault(p.title, set()).add(p.text)
    search = training_pairs("search", train_posts)
    assert len(search) == sum(1 for p in train_posts if p.title.strip())
    assert all(t in titles[q] for q, t in search[:200])
    for a, b in training_pairs("storyline", train_posts)[:200]:
        assert {p.source for p in by_text[a]} & {p.source for p in by_text[b]}
    for a, b in training_pairs("interest", train_posts)[:200]:
        assert any(set(p.topical_tags) & set(q.topical_tags) for p in by_text[a] for q in by_text[b])
    phrases = {tag_phrase(t) for p in train_posts for t in p.hashtag_tags}
    assert all(t in phrases for _, t in training_pairs("hashtag", train_posts)[:200])
    assert training_pairs("search", train_posts, seed=0) == training_pairs("search", train_posts, seed=0)
    with pytest.raises(ValueError, match="unknown training task"):
        training_pairs("section", train_posts)


def test_triplets_deterministic_and_test_only(posts, tmp_path):
    splits = split_posts(posts)
    trip = build_triplets(splits["test"], seed=0)
    assert trip == build_triplets(splits["test"], seed=0)
    assert trip != build_triplets(splits["test"], seed=1)
    assert {t["task"] for t in trip} == set(EVAL_TASKS)
    test_ids = {p.id for p in splits["test"]}
    by_id = {p.id: p for p in posts}
    for t in trip:
        for ref in (t["anchor"], t["positive"], t["negative_ref"]):
            kind, _, key = ref.partition(":")
            if kind != "tag":
                assert key in test_ids, ref  # never a train or validation post
        if t["task"] == "section":
            a, p, n = (by_id[r.partition(":")[2]] for r in (t["anchor"], t["positive"], t["negative_ref"]))
            assert a.section == p.section != n.section
        if t["task"] == "search" and t["negative"] == "hard":
            a, n = by_id[t["anchor"].partition(":")[2]], by_id[t["negative_ref"].partition(":")[2]]
            assert a.section == n.section and a.source != n.source
    # the file round-trips byte for byte
    write_triplets(trip, tmp_path / "a.jsonl.gz")
    write_triplets(read_triplets(tmp_path / "a.jsonl.gz"), tmp_path / "b.jsonl")
    assert gzip.open(tmp_path / "a.jsonl.gz").read() == (tmp_path / "b.jsonl").read_bytes()


def test_bootstrap_interval_brackets_the_mean():
    x = np.random.default_rng(0).random(2000) < 0.8
    lo, hi = ev.bootstrap_ci(x)
    assert lo < x.mean() < hi and hi - lo < 0.05
    d = ev.paired_difference(x, x)
    assert d["difference"] == d["ci_low"] == d["ci_high"] == 0


# ---- training -------------------------------------------------------------------------------------
def test_training_lowers_the_loss(trained):
    _, record = trained
    before = sum(v["before"] for v in record["validation_loss"].values())
    after = sum(v["after"] for v in record["validation_loss"].values())
    assert set(record["validation_loss"]) == set(TRAIN_TASKS)
    assert after < before, record["validation_loss"]


@pytest.mark.parametrize("env, want", [(None, None), ("float32", "float32"), ("bfloat16", "bfloat16")])
def test_training_dtype_auto_follows_the_cpu_capability_table(env, want, monkeypatch):
    """auto: POSTEMBED_CPU_DTYPE, else the engine's table (bf16 with AMX-BF16 / AVX512-BF16); an explicit
    dtype wins; a GPU's auto stays float32; anything else is refused by name."""
    from postembed_fast.kernels import cpu_isa

    if env is None:
        monkeypatch.delenv(cpu_isa.DTYPE_ENV, raising=False)
        want = str(cpu_isa.compute_dtype()[0]).removeprefix("torch.")
    else:
        monkeypatch.setenv(cpu_isa.DTYPE_ENV, env)
    got, why = resolve_train_dtype("auto", "cpu")
    assert got == want and why.startswith("auto on this CPU")
    assert resolve_train_dtype("float32", "cpu")[0] == "float32"
    assert resolve_train_dtype("bfloat16", "cpu")[0] == "bfloat16"
    assert resolve_train_dtype("auto", "cuda")[0] == "float32"
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, got 'float16'"):
        resolve_train_dtype("float16", "cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        Recipe(dtype="fp8").check()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_training_in_each_dtype_lowers_the_loss_and_saves_float32_weights(dtype, small_data, tiny_bert, tmp_path):
    """bf16 autocast trains (the loss falls) and, like float32, leaves float32 weights in the folder."""
    from safetensors import safe_open

    recipe = Recipe(dim=16, steps_per_task=5, batch_size=8, max_seq_length=32, freeze_layers=0,
                    learning_rate=1e-3, warmup_steps=2, eval_every=20, device="cpu", dtype=dtype)
    out = tmp_path / dtype
    record = train(recipe, split_posts(read_posts(small_data)), out, base=tiny_bert, progress=False,
                   log=lambda m: None)
    assert record["train_dtype"] == dtype and record["recipe"]["dtype"] == dtype
    before = sum(v["before"] for v in record["validation_loss"].values())
    after = sum(v["after"] for v in record["validation_loss"].values())
    assert after < before, record["validation_loss"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    import torch

    assert dtypes == {torch.float32}, dtypes


@pytest.mark.parametrize("loss", ["cached-mnrl", "gist"])
def test_training_with_each_loss_lowers_its_loss(loss, small_data, tiny_bert, tmp_path):
    """The recipe's other losses (sentence-transformers' CachedMNRL and GISTEmbedLoss guided by the
    base) train: their own validation loss falls, and the folder serves at the recipe's dim."""
    recipe = Recipe(dim=16, steps_per_task=5, batch_size=8, max_seq_length=32, freeze_layers=0,
                    learning_rate=1e-3, warmup_steps=2, eval_every=20, device="cpu", dtype="float32", loss=loss)
    out = tmp_path / loss
    record = train(recipe, split_posts(read_posts(small_data)), out, base=tiny_bert, progress=False,
                   log=lambda m: None)
    assert record["recipe"]["loss"] == loss
    before = sum(v["before"] for v in record["validation_loss"].values())
    after = sum(v["after"] for v in record["validation_loss"].values())
    assert after < before, record["validation_loss"]
    assert Embedder(out, device="cpu").embed(["a post about rust"]).shape == (1, 16)


def test_labelled_positive_names_what_the_labels_make_positive(posts):
    """A mined negative the labels make a positive (same source; a shared topical tag for interest; one
    of the post's own tags for hashtag) is caught; a post of another source with no shared tag is not."""
    from postembed_fast.train.tasks import labelled_positive

    a = next(p for p in posts if p.topical_tags and p.title.strip())
    sibling = next((p for p in posts if p.source == a.source and p.id != a.id), None)
    shares = next(p for p in posts if p.source != a.source and set(p.topical_tags) & set(a.topical_tags))
    unrelated = next(p for p in posts if p.source != a.source and not set(p.tags) & set(a.tags))
    for task in ("search", "storyline", "interest"):
        is_pos = labelled_positive(task, posts)
        query = a.title if task == "search" else a.text
        assert not is_pos(query, unrelated.text), task
        assert is_pos(query, shares.text) == (task == "interest"), task
        if sibling is not None:
            assert is_pos(query, sibling.text), task
    is_pos = labelled_positive("hashtag", posts)
    assert is_pos(a.text, tag_phrase(a.hashtag_tags[0]))
    other = next(t for p in posts for t in p.hashtag_tags if t not in a.tags)
    assert not is_pos(a.text, tag_phrase(other))
    with pytest.raises(ValueError, match="unknown training task 'section'"):
        labelled_positive("section", posts)


def test_mined_hard_negatives_train(small_data, tiny_bert, tmp_path):
    """hard_negatives: every kept pair gets a mined negative that is neither its positive nor a labelled
    positive, scored by the base below (1 - margin) of the positive; training on the triplets lowers
    the validation loss."""
    import torch
    from postembed_fast.train.recipe import HARD_NEGATIVE_MARGIN, encoder_model, mine_negatives, _pair_datasets
    from postembed_fast.train.tasks import labelled_positive

    splits = split_posts(read_posts(small_data))
    # the real base model: a random tiny BERT scores every pair alike, so the margin would leave nothing
    recipe = Recipe(dim=16, steps_per_task=3, batch_size=8, max_seq_length=32, freeze_layers=5,
                    learning_rate=1e-3, warmup_steps=1, eval_every=20, device="cpu", dtype="float32",
                    hard_negatives=True)
    encoder = encoder_model(None, recipe.max_seq_length, "cpu")
    mined, report = mine_negatives(_pair_datasets(splits["train"], recipe.tasks, 0), encoder, splits["train"], recipe)
    assert set(mined) == set(TRAIN_TASKS)
    for task, ds in mined.items():
        assert ds.column_names == ["anchor", "positive", "negative"]
        assert 2 <= len(ds) <= report["tasks"][task]["pairs"] <= 2 * 3 * 8
        is_pos = labelled_positive(task, splits["train"])
        rows = ds[:]
        assert not any(n == p or is_pos(a, n) for a, p, n in zip(rows["anchor"], rows["positive"], rows["negative"]))
        e = [torch.nn.functional.normalize(torch.as_tensor(encoder.encode(rows[c][:20])), dim=1)
             for c in ("anchor", "positive", "negative")]
        pos, neg = (e[0] * e[1]).sum(1), (e[0] * e[2]).sum(1)
        assert bool((neg <= pos * (1 - HARD_NEGATIVE_MARGIN) + 1e-4).all()), task
    record = train(recipe, splits, tmp_path / "hn", progress=False, log=lambda m: None)
    assert record["hard_negatives"]["tasks"].keys() == set(TRAIN_TASKS)
    before = sum(v["before"] for v in record["validation_loss"].values())
    after = sum(v["after"] for v in record["validation_loss"].values())
    assert after < before, record["validation_loss"]


def test_matryoshka_folder_serves_dim_by_default_and_full_width_on_request(small_data, tiny_bert, tmp_path, posts):
    """matryoshka: the folder keeps the hidden width (64 for the tiny BERT) and records truncate_dim=16;
    Embedder(folder) serves 16-d (= sentence-transformers' own truncated output, re-normalized) with
    the folder's ranges, Embedder(folder, truncate_dim=64) the full width, which starts with the
    same 16 directions."""
    from sentence_transformers import SentenceTransformer

    recipe = Recipe(dim=16, steps_per_task=5, batch_size=8, max_seq_length=32, freeze_layers=0,
                    learning_rate=1e-3, warmup_steps=2, eval_every=20, device="cpu", dtype="float32",
                    matryoshka=True)
    out = tmp_path / "mrl"
    record = train(recipe, split_posts(read_posts(small_data)), out, base=tiny_bert, progress=False,
                   log=lambda m: None)
    before = sum(v["before"] for v in record["validation_loss"].values())
    after = sum(v["after"] for v in record["validation_loss"].values())
    assert after < before, record["validation_loss"]
    texts = [p.text for p in posts[:30]] + ["", "x " * 200]
    served = Embedder(out, device="cpu", dtype="float32")
    assert (served.dim, served.full_dim) == (16, 64)
    ours = served.embed(texts)
    assert ours.shape == (len(texts), 16)
    st = SentenceTransformer(str(out), device="cpu")
    assert st.truncate_dim == 16
    ref = st.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    assert served.quantization_ranges[0].shape == (16,)  # the folder's ranges, at its default width
    full = Embedder(out, device="cpu", dtype="float32", truncate_dim=64)
    wide = full.embed(texts)
    assert wide.shape == (len(texts), 64) and full.quantization_ranges is None
    prefix = wide[:, :16] / np.linalg.norm(wide[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(prefix, ours, atol=2e-5)
    for bad in (0, 65, 16.0, True):
        with pytest.raises(ValueError, match=r"truncate_dim must be None or an int in \[1, 64\]"):
            Embedder(out, device="cpu", truncate_dim=bad)
    with pytest.raises(ValueError, match="matryoshka needs dim"):
        Recipe(dim=None, matryoshka=True).check()


def test_task_weights_split_the_steps_and_train(small_data, tiny_bert, tmp_path, capsys):
    """task_weights: each task's share of the steps (summing to the total), each dataset cut to its
    share so one proportional pass draws it; a share the data cannot fill is refused by name."""
    recipe = Recipe(dim=16, steps_per_task=4, batch_size=4, max_seq_length=32, freeze_layers=0,
                    learning_rate=1e-3, warmup_steps=1, eval_every=20, device="cpu", dtype="float32",
                    task_weights=(2, 1, 0.5, 0.5))
    assert recipe.task_steps() == {"search": 8, "storyline": 4, "interest": 2, "hashtag": 2}
    record = train(recipe, split_posts(read_posts(small_data)), tmp_path / "mix", base=tiny_bert, progress=False,
                   log=lambda m: None)
    assert record["recipe"]["task_weights"] == (2, 1, 0.5, 0.5)
    before = sum(v["before"] for v in record["validation_loss"].values())
    after = sum(v["after"] for v in record["validation_loss"].values())
    assert after < before, record["validation_loss"]
    greedy = Recipe(dim=16, steps_per_task=500, batch_size=8, freeze_layers=0, device="cpu", task_weights=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="task 'search': 500 steps of batch 8 need 4000 pairs; the data has"):
        train(greedy, split_posts(read_posts(small_data)), tmp_path / "x", base=tiny_bert, progress=False,
              log=lambda m: None)
    with pytest.raises(ValueError, match="task_weights must be one positive weight per task"):
        Recipe(task_weights=(1, 0, 1, 1)).check()
    for bad, message in (("search=2,interest=1", "must give every task of --tasks"),
                         ("search=x", "bad --task-weights item 'search=x'")):
        with pytest.raises(SystemExit):
            train_main(["--data", str(small_data), "--out", str(tmp_path / "m"), "--task-weights", bad])
        assert message in capsys.readouterr().err


def test_unknown_loss_is_refused(small_data, tmp_path, capsys):
    with pytest.raises(ValueError, match="loss must be one of mnrl, cached-mnrl, gist, got 'triplet'"):
        Recipe(loss="triplet").check()
    with pytest.raises(SystemExit):
        train_main(["--data", str(small_data), "--out", str(tmp_path / "m"), "--loss", "triplet"])
    assert "invalid choice: 'triplet'" in capsys.readouterr().err


def test_trained_folder_loads_in_both_libraries(trained, posts):
    from sentence_transformers import SentenceTransformer

    folder, _ = trained
    texts = [p.text for p in posts[:40]] + ["", "short", "x " * 300]
    st = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    emb = Embedder(str(folder), device="cpu", dtype="float32")
    ours = emb.embed(texts)
    assert ours.shape == st.shape == (len(texts), 16)
    cos = (ours * st).sum(1) / np.linalg.norm(st, axis=1)
    assert cos.min() >= 0.99999, cos.min()


def test_folder_ranges_serve_int8_without_calibrate(trained, posts):
    folder, _ = trained
    ranges = np.load(folder / FOLDER_RANGES_FILE)
    emb = Embedder(str(folder), device="cpu", dtype="float32")
    np.testing.assert_array_equal(emb.quantization_ranges, ranges)
    texts = [p.text for p in posts[:30]]
    codes = fast_embed(texts, model=str(folder), device="cpu", dtype="float32", precision="int8")
    assert codes.dtype == np.int8 and codes.shape == (30, 16)
    np.testing.assert_array_equal(codes, emb.embed(texts, precision="int8", ranges=ranges))


def test_bad_folder_ranges_are_refused(trained, tmp_path):
    folder, _ = trained
    copy = tmp_path / "bad"
    shutil.copytree(folder, copy)
    np.save(copy / FOLDER_RANGES_FILE, np.zeros((2, 7), np.float32))
    with pytest.raises(ValueError, match=r"quantization_ranges.npy: expected finite float32 \[2, 16\]"):
        Embedder(str(copy), device="cpu")
    np.save(copy / FOLDER_RANGES_FILE, np.load(folder / FOLDER_RANGES_FILE))
    np.save(copy / FOLDER_MEAN_FILE, np.full(16, np.nan, np.float32))
    with pytest.raises(ValueError, match=r"embedding_mean.npy: expected a finite float32 \[16\] mean embedding"):
        Embedder(str(copy), device="cpu")


def test_folder_mean_is_the_calibration_posts_mean(trained, small_data):
    """The recipe writes the mean embedding of the posts it calibrates the ranges on (validation), and
    calibrate() sets it the same way."""
    folder, _ = trained
    emb = Embedder(str(folder), device="cpu", dtype="float32")
    shipped = emb.embedding_mean
    val = [p.text for p in split_posts(read_posts(small_data))["validation"]]
    np.testing.assert_allclose(shipped, emb.embed(val).astype(np.float64).mean(0), rtol=0, atol=1e-6)
    emb.calibrate(val[:40])
    np.testing.assert_allclose(emb.embedding_mean, emb.embed(val[:40]).astype(np.float64).mean(0), rtol=0, atol=1e-6)


def test_evaluate_command(trained, small_data, tmp_path, capsys):
    folder, _ = trained
    out = tmp_path / "eval.json"
    assert ev.main(["--data", str(small_data), "--model", f"tiny={folder}", "--device", "cpu",
                    "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| tiny | 16 |" in table
    rep = json.loads(out.read_text())
    rows = rep["models"][0]["results"]
    assert {r["task"] for r in rows} <= set(EVAL_TASKS) and len(rows) >= 4
    for r in rows:
        assert 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1 and r["n"] > 0
    assert ev.main(["--data", str(small_data), "--model", str(folder), "--device", "cpu",
                    "--precision", "binary"]) == 0


def test_train_command_end_to_end(small_data, tiny_bert, tmp_path, capsys):
    out = tmp_path / "m"
    assert train_main(["--data", str(small_data), "--out", str(out), "--base", str(tiny_bert), "--steps", "4",
                       "--batch-size", "8", "--max-seq-length", "32", "--dim", "8", "--device", "cpu", "--freeze-layers", "0",
                       "--tasks", "search,hashtag"]) == 0
    assert "| m | 8 |" in capsys.readouterr().out
    rec = json.loads((out / "postembed_train.json").read_text())
    assert rec["recipe"]["tasks"] == ["search", "hashtag"] and rec["recipe"]["steps_per_task"] == 2
    assert Embedder(str(out), device="cpu").dim == 8
    with pytest.raises(SystemExit):  # an existing model is not overwritten silently
        train_main(["--data", str(small_data), "--out", str(out), "--base", str(tiny_bert)])


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "search,bogus"], "unknown task(s) bogus"),
    (["--dim", "-3"], "--dim must be a positive integer"),
    (["--batch-size", "1"], "batch_size must be >= 2"),
    (["--steps", "2"], "--steps must be >= the number of tasks"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
])
def test_train_command_bad_options(argv, message, small_data, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train_main(["--data", str(small_data), "--out", str(tmp_path / "m"), *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_train_command_bad_data(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\n')
    with pytest.raises(SystemExit) as exc:
        train_main(["--data", str(bad), "--out", str(tmp_path / "m")])
    assert exc.value.code == 2
    assert "bad.jsonl:1: missing field(s) source, section, title, text" in capsys.readouterr().err
