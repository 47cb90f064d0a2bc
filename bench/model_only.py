"""Model-only throughput of postembed_fast: Encoder.forward over batches that are already
tokenized, packed and on the device (no tokenization, no host copies, no pooling), in the
default batch_tokens plan. What the GPU kernels alone sustain: the issue's GPU target is
>= 10M tokens/s on an H100."""
from __future__ import annotations

import statistics

from bench.measure import timed


def measure(e, texts, device, repeats=3) -> dict:
    import torch

    from postembed_fast.embedder import DEFAULT_BATCH_TOKENS
    from postembed_fast.model import Workspace
    from postembed_fast.packing import packed_batches

    ids, offsets = e.tokenizer.encode(texts)
    bt = DEFAULT_BATCH_TOKENS[e.device.type]
    batches = [(*(torch.from_numpy(a).to(e.device) for a in (b.input_ids, b.positions, b.cu_seqlens)), b.max_seqlen)
               for b in packed_batches(ids, offsets, bt)]
    ws = Workspace()

    def run():
        for b in batches:
            e.encoder.forward(*b, workspace=ws)

    run()  # warm-up: kernels compiled, workspace sized
    secs = statistics.median(timed(run, device)[0] for _ in range(repeats))
    tokens = int(offsets[-1])
    return dict(dtype=str(e.dtype).replace("torch.", ""), tokens=tokens, batches=len(batches), batch_tokens=bt,
                seconds=secs, tokens_per_s=tokens / secs)
