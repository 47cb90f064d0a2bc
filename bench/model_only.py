"""Model-only throughput of postembed_fast: Encoder.forward over batches that are already
tokenized, packed and on the device (no tokenization, no host copies, no pooling), in the
default batch_tokens plan. What the GPU kernels alone sustain: the issue's GPU target is
>= 10M tokens/s on an H100."""
from __future__ import annotations

import statistics

import numpy as np

from bench.measure import timed


def measure(e, texts, device, repeats=3) -> dict:
    from postembed_fast.embedder import DEFAULT_BATCH_TOKENS, pack, plan_batches
    from postembed_fast.model import Workspace

    seqs = e.tokenize(texts)
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    bt = DEFAULT_BATCH_TOKENS[e.device.type]
    batches = [pack([seqs[i] for i in idx], e.device) for idx in plan_batches(lens, bt)]
    ws = Workspace()

    def run():
        for b in batches:
            e.encoder.forward(*b, workspace=ws)

    run()  # warm-up: kernels compiled, workspace sized
    secs = statistics.median(timed(run, device)[0] for _ in range(repeats))
    tokens = int(lens.sum())
    return dict(dtype=str(e.dtype).replace("torch.", ""), tokens=tokens, batches=len(batches), batch_tokens=bt,
                seconds=secs, tokens_per_s=tokens / secs)
