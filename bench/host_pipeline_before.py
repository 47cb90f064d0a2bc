"""Host side of embed() at commit 08d92d4 (before the flat tokenizer and numpy packing), by
bench/host_pipeline.py's method: encoder swapped for a no-op, fresh posts per round. The number
README's host-pipeline table quotes for "before". That commit's package is loaded from an unpacked
wheel, with -S so that an editable install of the current checkout is not in the way:

    git worktree add /tmp/oldsrc 08d92d4 && (cd /tmp/oldsrc && POSTEMBED_CUDA=0 pip wheel . --no-deps -w /tmp/oldwheel)
    mkdir /tmp/oldpkg && (cd /tmp/oldpkg && unzip -q /tmp/oldwheel/*.whl)
    python -S bench/host_pipeline_before.py /tmp/oldpkg "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" CORPUS
"""
import gzip
import json
import statistics
import sys
import time

OLD_PACKAGE, SITE_PACKAGES, CORPUS = sys.argv[1:4]
sys.path[:0] = [OLD_PACKAGE, SITE_PACKAGES]
import torch  # noqa: E402

import postembed_fast  # noqa: E402

assert postembed_fast.__file__.startswith(OLD_PACKAGE), postembed_fast.__file__
from postembed_fast import Embedder  # noqa: E402

class NullEncoder:
    def __init__(self, enc): self.config, self.word, self._out = enc.config, enc.word, None
    def forward(self, input_ids, positions, cu_seqlens, max_seqlen, backend=None, workspace=None):
        T = input_ids.shape[0]
        if self._out is None or self._out.shape[0] < T:
            self._out = torch.ones(max(T, 1 << 16), self.config.hidden, dtype=self.word.dtype)
        return self._out[:T]

texts = []
seen = set()
with gzip.open(CORPUS, "rt") as f:
    for line in f:
        t = json.loads(line).get("text") or ""
        if t and t not in seen:
            seen.add(t); texts.append(t)
e = Embedder(device="cpu")
hf = e.tokenizer
e.encoder = NullEncoder(e.encoder)
e.embed(texts[:1500])
rates = []
for r in range(5):
    b = texts[1500 * (r + 1): 1500 * (r + 2)]
    n = sum(len(x.ids) for x in hf.encode_batch(b))
    t = time.perf_counter(); e.embed(b); rates.append(n / (time.perf_counter() - t))
print("old (08d92d4) embed() host side, no-op encoder: median %.3f M tokens/s, rounds %s" % (
    statistics.median(rates) / 1e6, [round(x / 1e6, 3) for x in rates]))
