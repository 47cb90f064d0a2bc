"""Token-id identity of FlatTokenizer with Hugging Face tokenizers' encode_batch, for every backend it
can run (the compiled ASCII WordPiece with nanotoken, the same with Hugging Face for non-ASCII texts,
nanotoken alone, Hugging Face alone), on a whole corpus plus the hostile texts of tests/data/hostile_texts.py.

    python bench/tokenizer_identity.py ../shared/data/debian-posts.jsonl.gz [--model FOLDER]
        [--chunk 4096] [--no-code-points] [--lowercase] [--fields text,title]

The reference is what sentence-transformers feeds the model: the model folder's tokenizer, special
tokens added, no padding, truncation at the model's max_seq_length (256 for the default model), and
str.lower() first for do_lower_case models. Texts are encoded in chunks of --chunk texts (the
Embedder's TOKENIZE_CHUNK), so a backend's caches are warm across chunks as they are in use.
Prints every mismatch (index, text, both id lists); exit status 1 if there is any.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def load_hostile():
    spec = importlib.util.spec_from_file_location("hostile_texts", ROOT / "tests" / "data" / "hostile_texts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_corpus(path: Path, fields: list[str]) -> list[str]:
    """Every field of every JSONL record (or every line of a text file), empty ones included."""
    opener = gzip.open if path.suffix == ".gz" else open
    out = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if ".jsonl" in path.suffixes or ".json" in path.suffixes:
                if line.strip():
                    rec = json.loads(line)
                    out += [rec.get(k) or "" for k in fields]
            else:
                out.append(line.rstrip("\n"))
    return out


def compare(name: str, tok, hf, texts: list[str], lower: bool, chunk: int, show: int = 10) -> int:
    """Mismatching texts of one set; prints each (up to `show`) and a summary line."""
    t_ref = t_tok = 0.0
    bad = 0
    for start in range(0, len(texts), chunk):
        part = texts[start : start + chunk]
        t0 = time.perf_counter()
        ids, offsets = tok.encode(part)
        t1 = time.perf_counter()
        ref = [e.ids for e in hf.encode_batch([t.lower() for t in part] if lower else part, add_special_tokens=True)]
        t2 = time.perf_counter()
        t_tok, t_ref = t_tok + t1 - t0, t_ref + t2 - t1
        lens = np.fromiter(map(len, ref), dtype=np.int64, count=len(ref))
        flat = np.fromiter((t for r in ref for t in r), dtype=np.int64, count=int(lens.sum()))
        if ids.dtype == np.int32 and np.array_equal(np.diff(offsets), lens) and np.array_equal(ids, flat):
            continue
        for i, r in enumerate(ref):
            got = ids[offsets[i] : offsets[i + 1]].tolist() if i + 1 < len(offsets) else None
            if got != r:
                bad += 1
                if bad <= show:
                    print(f"  MISMATCH {name}[{start + i}] {part[i][:100]!r}\n    got {got}\n    ref {r}")
    print(f"{_label(tok):>34} {name:<26} {len(texts):>9,} texts  {bad:>6} mismatches   "
          f"({t_tok:6.2f} s vs Hugging Face {t_ref:6.2f} s)", flush=True)
    return bad


def _label(tok) -> str:
    return getattr(tok, "label", tok.backend)


def check_refusals(tok, invalid) -> int:
    bad = 0
    for text, pos in invalid:
        try:
            tok.encode(["ok", text])
        except ValueError as exc:
            if f"texts[1] is not valid Unicode (lone surrogate at position {pos})" in str(exc):
                continue
            print(f"  WRONG ERROR {text[:40]!r}: {exc}")
        except Exception as exc:  # noqa: BLE001
            print(f"  WRONG ERROR {text[:40]!r}: {type(exc).__name__}: {exc}")
        else:
            print(f"  ACCEPTED {text[:40]!r} (Hugging Face refuses it)")
        bad += 1
    print(f"{_label(tok):>34} {'lone surrogates refused':<26} {len(invalid):>9,} texts  {bad:>6} mismatches")
    return bad


def _backend(name: str, hf, lower: bool, max_length: int):
    """A FlatTokenizer running one backend (verified on the probes by FlatTokenizer itself)."""
    from postembed_fast import tokenization
    from postembed_fast.tokenization import FlatTokenizer

    if name in ("fast", "hf"):
        return FlatTokenizer(hf, lowercase=lower, backend=name)
    if name == "nanotoken":
        import nanotoken

        enc = tokenization._nanotoken_encoder(nanotoken.Tokenizer.from_json(hf.to_str()), max_length, hf.truncation)
    else:
        wp, why = tokenization._ascii_wordpiece(json.loads(hf.to_str()), max_length, hf.truncation)
        if wp is None:
            raise ValueError(why)
        enc = tokenization._ascii_first(wp, FlatTokenizer(hf, backend="hf")._hf_flat)
    tok = FlatTokenizer(hf, lowercase=lower, fast_encoder=enc, backend="fast")
    tok.label = {"nanotoken": "nanotoken alone", "ascii+hf": f"ascii-wordpiece + {tok._hf_name}"}[name]
    return tok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path, help="JSONL(.gz) with text fields, or plain text (one per line)")
    ap.add_argument("--model", default=None, help="model folder (default: all-MiniLM-L6-v2)")
    ap.add_argument("--chunk", type=int, default=4096, help="texts per encode call")
    ap.add_argument("--fields", default="text,title", help="JSONL fields to check (comma-separated)")
    ap.add_argument("--no-code-points", action="store_true", help="skip the 1.17 M every-code-point texts")
    ap.add_argument("--lowercase", action="store_true", help="lowercase first even if the model does not (tests that path)")
    args = ap.parse_args(argv)

    from postembed_fast.loading import load_tokenizer, read_model_folder, resolve_model
    from postembed_fast.tokenization import FlatTokenizer

    folder, _ = resolve_model(args.model)
    spec = read_model_folder(folder)
    hf = load_tokenizer(spec.encoder_folder, spec.max_seq_length)
    lower = spec.do_lower_case or args.lowercase
    print(f"model {folder} max_seq_length={spec.max_seq_length} lowercase={lower} "
          f"NANOTOKEN_CACHE_ENTRIES={os.environ.get('NANOTOKEN_CACHE_ENTRIES', 'default')}")
    hostile = load_hostile()
    sets = [("corpus", read_corpus(args.corpus, args.fields.split(","))), ("hostile", hostile.hostile_texts())]
    if not args.no_code_points:
        sets.append(("every code point", hostile.code_point_texts()))
    toks = []
    for backend in ("fast", "ascii+hf", "nanotoken", "hf"):
        try:
            toks.append(_backend(backend, hf, lower, spec.max_seq_length))
        except (ValueError, ImportError) as exc:
            print(f"backend={backend!r} unavailable: {exc}")
    total = 0
    for tok in toks:
        for name, texts in sets:
            total += compare(name, tok, hf, texts, lower, args.chunk)
        total += check_refusals(tok, hostile.INVALID_TEXTS)
    print("IDENTICAL" if total == 0 else f"{total} MISMATCHES")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
