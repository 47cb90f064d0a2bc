"""The host side of embed(): everything but the encoder forward (tokenization, length sort,
batch planning, packing, transfers, pooling, readback, order restore), in tokens/s.

Measured as the real embed() path with Embedder.encoder swapped for NullEncoder, a stand-in
with the same forward() signature and output (shape, dtype, device) that does no work: this
benchmark hook is the only place it is used. Next to it, in the same run: the tokenizers
alone (Hugging Face `encode_batch`, as it is and with the id lists the old path built; nanotoken's
flat `encode_batch` on its own, when installed; and the package's flat tokenizer, which runs the
compiled ASCII WordPiece with nanotoken for the non-ASCII texts).

Every timed round uses posts that no tokenizer in this process has seen (a warm tokenizer cache
once made a candidate look 3x faster than it is): the texts are cut into disjoint slices, one per
(system, round), and the median round is reported.

    python -m bench.host_pipeline [--corpus PATH] [--device cpu] [--rounds 3] [--posts-per-round 1500]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time


class NullEncoder:
    """Benchmark hook standing in for Embedder.encoder: same forward() contract, no work."""

    def __init__(self, encoder):
        self.config, self.word = encoder.config, encoder.word
        self._out = None

    def forward(self, input_ids, positions, cu_seqlens, max_seqlen, backend=None, workspace=None):
        import torch

        T = input_ids.shape[0]
        if self._out is None or self._out.shape[0] < T:
            self._out = torch.ones(max(T, 1 << 16), self.config.hidden, dtype=self.word.dtype, device=self.word.device)
        return self._out[:T]


def _median_rate(fn, slices, tokens_of) -> dict:
    rates, secs = [], []
    for texts in slices:
        t0 = time.perf_counter()
        fn(texts)
        dt = time.perf_counter() - t0
        secs.append(dt)
        rates.append(tokens_of(texts) / dt)
    return dict(tokens_per_s=statistics.median(rates), rounds=[round(r) for r in rates], seconds=secs)


def _nanotoken_alone(hf, max_length):
    """nanotoken's flat encode_batch on this tokenizer (None if not installed): the candidate
    measured side by side with the package's own tokenizer."""
    try:
        import nanotoken
    except ImportError:
        return None
    nt = nanotoken.Tokenizer.from_json(hf.to_str())
    return lambda texts: nt.encode_batch(texts, add_special_tokens=True, max_length=max_length, truncation_side="right")


def measure(texts: list[str], device="cpu", rounds: int = 3, posts_per_round: int = 1500) -> dict:
    import torch

    from postembed_fast import Embedder

    e = Embedder(device=device)
    hf = e.tokenizer.hf_tokenizer
    nanotoken = _nanotoken_alone(hf, e.tokenizer.max_length)
    systems = ("hf_encode_batch", "hf_encode_batch_lists") + (("nanotoken",) if nanotoken else ()) + (
        "flat_tokenizer", "embed_host_side")
    need = len(systems) * rounds * posts_per_round + posts_per_round
    if len(texts) < need:
        raise SystemExit(f"need {need} distinct posts for {rounds} fresh rounds of {posts_per_round}, have {len(texts)}; "
                         "lower --posts-per-round or pass a bigger --corpus")
    cuts = iter(range(0, need, posts_per_round))
    fresh = {s: [texts[i: i + posts_per_round] for i in (next(cuts) for _ in range(rounds))] for s in systems}
    warm = texts[next(cuts):][:posts_per_round]

    counts = {}  # token counts, computed outside the timed calls by Hugging Face (which has no cache)

    def tokens_of(batch):
        key = id(batch)
        if key not in counts:
            counts[key] = sum(len(x.ids) for x in hf.encode_batch(batch))
        return counts[key]

    for s in systems:
        for batch in fresh[s]:
            tokens_of(batch)
    e.encoder = NullEncoder(e.encoder)
    e._graphs = None  # CUDA graphs replay the real encoder
    e.embed(warm)  # warm-up: threads, pinned buffers, kernels
    out = dict(device=str(e.device), posts_per_round=posts_per_round, rounds=rounds, tokenizer_backend=e.tokenizer.backend,
               tokenizer_fallback_reason=e.tokenizer.fallback_reason, threads=torch.get_num_threads())
    out["hf_encode_batch"] = _median_rate(lambda b: hf.encode_batch(b), fresh["hf_encode_batch"], tokens_of)
    out["hf_encode_batch_lists"] = _median_rate(lambda b: [x.ids for x in hf.encode_batch(b)],
                                                fresh["hf_encode_batch_lists"], tokens_of)
    if nanotoken:
        out["nanotoken"] = _median_rate(nanotoken, fresh["nanotoken"], tokens_of)
    out["flat_tokenizer"] = _median_rate(e.tokenizer.encode, fresh["flat_tokenizer"], tokens_of)
    out["embed_host_side"] = _median_rate(e.embed, fresh["embed_host_side"], tokens_of)
    return out


def report(r: dict) -> str:
    base = r["hf_encode_batch_lists"]["tokens_per_s"]
    lines = [f"host side of embed() on {r['device']} ({r['rounds']} fresh rounds of {r['posts_per_round']} posts, "
             f"median; tokenizer backend: {r['tokenizer_backend']}):"]
    for k, label in (("hf_encode_batch", "tokenizers encode_batch"),
                     ("hf_encode_batch_lists", "tokenizers encode_batch + id lists (the old path's tokenizer)"),
                     ("nanotoken", "nanotoken encode_batch alone (ids + offsets)"),
                     ("flat_tokenizer", "flat tokenizer (ids + offsets)"),
                     ("embed_host_side", "embed() with a no-op encoder")):
        if k not in r:
            continue
        v = r[k]["tokens_per_s"]
        lines.append(f"  {label:62s} {v / 1e6:6.2f} M tokens/s  ({v / base:4.1f}x)")
    return "\n".join(lines)


def main(argv=None):
    from bench.corpus import load_posts

    ap = argparse.ArgumentParser(prog="python -m bench.host_pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--posts-per-round", type=int, default=1500)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write the numbers here")
    a = ap.parse_args(argv)
    r = measure([p["text"] for p in load_posts(a.corpus)], a.device, a.rounds, a.posts_per_round)
    import json
    import os

    r["command"] = "python -m bench.host_pipeline " + " ".join(argv if argv is not None else sys.argv[1:])
    r["env"] = {k: v for k, v in os.environ.items() if k.startswith(("NANOTOKEN_", "OMP_", "RAYON_"))}
    print(report(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
