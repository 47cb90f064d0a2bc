"""Embedder: texts in, embeddings out, in input order.

    tokenize (Rust fast tokenizer, no padding, truncation to max_seq_length)
    -> sort by token count, fill batches up to batch_tokens tokens
    -> per batch: pack ids + cu_seqlens, Encoder.forward, pool_normalize (fused
       pooling + L2 norm + output precision), rows written back at their input index
"""
from __future__ import annotations

import itertools
import threading
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from postembed_fast.graphs import GraphCaptureError, GraphRunner, graphs_enabled
from postembed_fast.kernels import pool_normalize, quantize_embeddings
from postembed_fast.kernels.checks import PRECISIONS, check_precision
from postembed_fast.loading import load_tokenizer, read_model_folder, resolve_model
from postembed_fast.model import Encoder, EncoderConfig, ThreadWorkspaces, load_state_dict

OUTPUTS = ("numpy", "torch")
DEVICE_TYPES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Tokens per forward batch. Measured on the 2-core CPU with bench/batch_tokens.py
# (README: throughput is flat from 2k to 16k tokens; smaller batches cost Python
# overhead, larger ones cache misses). GPUs want far larger batches.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 65536}
# Texts tokenized per step; the next step's tokenization overlaps the model's work on this one.
TOKENIZE_CHUNK = 4096
_OUT_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8,
               "uint8": np.uint8, "binary": np.int8, "ubinary": np.uint8}
_DEFAULT_RANGES = Path(__file__).resolve().parent / "data" / "all-MiniLM-L6-v2.ranges.npy"


class DeviceUnavailableError(RuntimeError, ValueError):
    """The requested device exists as a name but not on this machine (e.g. device='cuda' without a GPU)."""


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise ValueError(f"unknown device {device!r}; valid: None, 'cpu', 'cuda', 'cuda:N'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(f"device={device!r} requested but no CUDA GPU is available "
                                         "(torch.cuda.is_available() is False); use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceUnavailableError(f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s)")
        if dev.index is None:  # "cuda" -> "cuda:N": one spelling per device (torch.device("cuda") != "cuda:0")
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return dtype
    raise ValueError(f"unknown dtype {dtype!r}; valid: None, torch.float32, torch.float16, torch.bfloat16 "
                     f"(or {', '.join(map(repr, DTYPES))})")


def as_text_list(texts) -> list[str]:
    """A str or a sequence of str -> list[str]; anything else is a TypeError naming what is wrong."""
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, (Sequence, np.ndarray)):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}"
                        + (" (use Embedder.embed_iter for iterators)" if isinstance(texts, Iterable) else ""))
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
    return out


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices sorted by token count (longest first), cut into batches of <= batch_tokens
    tokens (a longer single sequence gets a batch of its own). One cut per batch, not per text."""
    order = np.argsort(-lengths, kind="stable")
    csum = np.cumsum(lengths[order])
    batches, start, done = [], 0, 0
    while start < len(order):
        end = int(np.searchsorted(csum, done + batch_tokens, side="right"))
        end = max(end, start + 1)
        batches.append(order[start:end])
        done = int(csum[end - 1])
        start = end
    return batches


def pack(seqs: list[list[int]], device: torch.device):
    """Token id lists -> (input_ids int64 [T], positions int64 [T], cu_seqlens int32 [B+1], max_seqlen)."""
    lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    total = int(lens.sum())
    ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=total)
    cu = np.zeros(len(seqs) + 1, dtype=np.int32)
    np.cumsum(lens, out=cu[1:])
    positions = np.arange(total, dtype=np.int64) - np.repeat(cu[:-1].astype(np.int64), lens)
    host = [torch.from_numpy(a) for a in (ids, positions, cu)]
    if device.type == "cuda":  # pinned staging so the copies are truly asynchronous
        host = [t.pin_memory().to(device, non_blocking=True) for t in host]
    return (*host, int(lens.max()))


class Embedder:
    """A loaded model on one device in one dtype. Safe to call from several threads at once:
    a call keeps its state local (activation buffers are per thread, reused from call to
    call: ~63 MB per calling thread at the CPU default of 4,096 tokens per batch), and the
    weights are never written after loading."""

    def __init__(self, model=None, *, device=None, dtype=None):
        folder, is_default = resolve_model(model)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_folder = folder
        spec = read_model_folder(folder)
        self.pooling = spec.pooling
        self.dense = [type(d)(d.weight.to(self.device), None if d.bias is None else d.bias.to(self.device),
                              d.activation) for d in spec.dense]
        self.max_seq_length = spec.max_seq_length
        self._lower = spec.do_lower_case
        self.tokenizer = load_tokenizer(spec.encoder_folder, spec.max_seq_length)
        config = EncoderConfig.from_json(spec.encoder_folder / "config.json")
        self.encoder = Encoder(config, load_state_dict(spec.encoder_folder), self.device, self.dtype,
                               spec.encoder_folder)
        self.dim = self.dense[-1].weight.shape[0] if self.dense else config.hidden
        self._ranges = np.load(_DEFAULT_RANGES) if is_default and _DEFAULT_RANGES.is_file() else None
        self._calibration = None  # normalized float32 embeddings from calibrate(), for truncated ranges
        self._lock = threading.Lock()
        self._workspaces = ThreadWorkspaces()  # activation buffers, one set per calling thread
        # small requests on a GPU replay captured CUDA graphs (postembed_fast/graphs.py)
        self._graphs = (GraphRunner(self.encoder, self.device, self.max_seq_length)
                        if graphs_enabled(self.device) else None)

    # ---- quantization ranges -------------------------------------------------------------
    @property
    def quantization_ranges(self) -> np.ndarray | None:
        """float32 [2, dim]: per-dimension min (row 0) and max (row 1) of normalized embeddings."""
        return None if self._ranges is None else self._ranges.copy()

    def calibrate(self, texts, *, batch_tokens=None, show_progress=False) -> np.ndarray:
        """Set quantization_ranges from the embeddings of a corpus (real posts, ideally > 1,000)."""
        emb = self.embed(texts, batch_tokens=batch_tokens, show_progress=show_progress)
        if len(emb) < 2:
            raise ValueError("calibrate() needs at least 2 texts")
        with self._lock:
            self._calibration = emb
            self._ranges = ranges_of(emb)
        return self._ranges.copy()

    def _resolve_ranges(self, precision, normalize, dimensions, ranges):
        if precision not in ("int8", "uint8"):
            return None
        width = dimensions or self.dim
        if ranges is not None:
            r = np.asarray(ranges, dtype=np.float32)
            if r.shape != (2, width):
                raise ValueError(f"ranges must have shape (2, {width}), got {r.shape}")
            return r
        if self._ranges is None:
            raise ValueError(f"precision={precision!r} needs quantization ranges for this model: call "
                             "Embedder.calibrate(texts) on real posts, or pass ranges= ([2, D]: min row, max row)")
        if not normalize:
            raise ValueError("the calibrated ranges describe normalized embeddings; with normalize=False pass ranges=")
        if width == self.dim:
            return self._ranges
        if self._calibration is None:
            raise ValueError(f"precision={precision!r} with dimensions={dimensions} needs ranges for the truncated "
                             "embeddings: call calibrate(texts) first, or pass ranges= of shape (2, dimensions)")
        return ranges_of(self._calibration[:, :width])

    # ---- embedding -----------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> list[list[int]]:
        if self._lower:
            texts = [t.lower() for t in texts]
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=True)]

    def embed(self, texts, *, precision="float32", normalize=True, dimensions=None, batch_tokens=None,
              output="numpy", show_progress=False, ranges=None):
        """texts: a str or a sequence of str -> [N, D] (numpy or torch), row i = texts[i]."""
        texts = as_text_list(texts)
        opts = self._options(precision, normalize, dimensions, batch_tokens, output, ranges)
        out = self._embed_list(texts, opts, show_progress)
        return torch.from_numpy(out) if output == "torch" else out

    def embed_iter(self, texts: Iterable[str], *, chunk_size=1024, precision="float32", normalize=True,
                   dimensions=None, batch_tokens=None, output="numpy", show_progress=False, ranges=None):
        """Yield embeddings chunk by chunk (chunk_size texts each, in input order); memory stays flat
        however long the input. Concatenating the chunks equals embed() of the whole input."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Iterable):
            raise TypeError(f"texts must be an iterable of str, got {type(texts).__name__}")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        opts = self._options(precision, normalize, dimensions, batch_tokens, output, ranges)
        bar = _progress(None, show_progress)
        it, seen = iter(texts), 0
        while chunk := list(itertools.islice(it, chunk_size)):
            for i, t in enumerate(chunk):
                if not isinstance(t, str):
                    raise TypeError(f"texts[{seen + i}] must be str, got {type(t).__name__}")
            out = self._embed_list(chunk, opts, False)
            seen += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
            yield torch.from_numpy(out) if output == "torch" else out
        if bar is not None:
            bar.close()

    def _options(self, precision, normalize, dimensions, batch_tokens, output, ranges) -> dict:
        check_precision(precision)
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; valid: {', '.join(OUTPUTS)}")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or not 1 <= dimensions <= self.dim):
            raise ValueError(f"dimensions must be None or an int in [1, {self.dim}], got {dimensions!r}")
        if dimensions == self.dim:
            dimensions = None
        if batch_tokens is None:
            batch_tokens = DEFAULT_BATCH_TOKENS[self.device.type]
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        return dict(precision=precision, normalize=bool(normalize), dimensions=dimensions,
                    batch_tokens=batch_tokens,
                    ranges=self._resolve_ranges(precision, bool(normalize), dimensions, ranges))

    def _embed_list(self, texts: list[str], opts: dict, show_progress: bool) -> np.ndarray:
        """Rows in input order; batches are planned (sorted by length) within each tokenized chunk."""
        precision, width = opts["precision"], opts["dimensions"] or self.dim
        cols = (width + 7) // 8 if precision in ("binary", "ubinary") else width
        out = np.empty((len(texts), cols), dtype=_OUT_DTYPES[precision])
        if not texts:
            return out
        bar = _progress(len(texts), show_progress)
        readback = _Readback(out, self.device)
        for start, seqs in self._tokenized_chunks(texts):
            lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
            for idx in plan_batches(lengths, opts["batch_tokens"]):
                readback.put(start + idx, self._embed_batch([seqs[i] for i in idx], opts))
                if bar is not None:
                    bar.update(len(idx))
        readback.flush()
        if bar is not None:
            bar.close()
        return out

    def _tokenized_chunks(self, texts: list[str]):
        """Yield (start, token id lists) per TOKENIZE_CHUNK texts; the next chunk is tokenized on a
        background thread while the caller runs the model on this one."""
        if len(texts) <= TOKENIZE_CHUNK:  # small requests: no thread hop on the latency path
            yield 0, self.tokenize(texts)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="postembed-tokenize") as pool:
            pending = pool.submit(self.tokenize, texts[:TOKENIZE_CHUNK])
            for start in range(0, len(texts), TOKENIZE_CHUNK):
                seqs = pending.result()
                nxt = start + TOKENIZE_CHUNK
                if nxt < len(texts):
                    pending = pool.submit(self.tokenize, texts[nxt : nxt + TOKENIZE_CHUNK])
                yield start, seqs

    def _embed_batch(self, seqs: list[list[int]], opts: dict, backend=None) -> torch.Tensor:
        graphs = self._graphs
        if backend is None and graphs is not None and graphs.takes(seqs):
            try:
                return graphs.run(seqs, lambda hidden, cu: self._finish(hidden, cu, opts))
            except GraphCaptureError as exc:
                warnings.warn(f"{exc}; small requests run eagerly from now on", RuntimeWarning, stacklevel=2)
                self._graphs = None
        ids, positions, cu, max_len = pack(seqs, self.device)
        hidden = self.encoder.forward(ids, positions, cu, max_len, backend=backend,
                                      workspace=self._workspaces.workspace)
        return self._finish(hidden, cu, opts, backend)

    def _finish(self, hidden, cu, opts: dict, backend=None) -> torch.Tensor:
        """Hidden states -> the requested embeddings: pooling, Dense, truncation, norm, precision."""
        with torch.inference_mode():
            if not self.dense and opts["dimensions"] is None:
                # The fused epilogue: pooling, L2 norm and output precision in one kernel.
                return pool_normalize(hidden, cu, self.pooling, opts["normalize"], opts["precision"],
                                      opts["ranges"], backend=backend)
            x = pool_normalize(hidden, cu, self.pooling, False, "float32", backend=backend)
            for dense in self.dense:
                x = dense(x)
            if opts["dimensions"] is not None:  # Matryoshka-style: keep the first k, re-normalize
                x = x[:, : opts["dimensions"]]
            if opts["normalize"]:
                x = torch.nn.functional.normalize(x, dim=1)
            return quantize_embeddings(x.contiguous(), opts["precision"], opts["ranges"], backend=backend)


class _Readback:
    """Writes each batch's rows at their input positions. On a GPU the copy to (pinned) host
    memory is asynchronous and a batch is collected only after the next one is launched, so
    the device never waits for Python; on CPU it writes at once."""

    def __init__(self, out: np.ndarray, device: torch.device):
        self.out, self.cuda, self.pending = out, device.type == "cuda", None

    def put(self, rows: np.ndarray, result: torch.Tensor) -> None:
        if not self.cuda:
            self.out[rows] = result.numpy()
            return
        host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
        host.copy_(result, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.flush()
        self.pending = (rows, host, done)

    def flush(self) -> None:
        if self.pending is not None:
            rows, host, done = self.pending
            done.synchronize()
            self.out[rows] = host.numpy()
            self.pending = None


def ranges_of(emb: np.ndarray) -> np.ndarray:
    """Per-dimension (min, max) of normalized embeddings, made strictly increasing."""
    x = np.asarray(emb, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    r = np.stack([x.min(0), x.max(0)]).astype(np.float32)
    flat = r[1] <= r[0]
    r[0, flat] -= 1e-6
    r[1, flat] += 1e-6
    return r


def _progress(total, show):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="post", desc="embedding")


_CACHE: dict = {}
_CACHE_LOCK = threading.Lock()


def get_embedder(model=None, device=None, dtype=None) -> Embedder:
    """One cached Embedder per (model folder, device, dtype)."""
    folder, _ = resolve_model(model)
    dev = resolve_device(device)
    key = (str(folder), str(dev), resolve_dtype(dtype, dev))
    with _CACHE_LOCK:
        if key not in _CACHE:
            _CACHE[key] = Embedder(folder, device=dev, dtype=key[2])
        return _CACHE[key]


def fast_embed(texts, *, model=None, device=None, dtype=None, precision="float32", normalize=True,
               dimensions=None, batch_tokens=None, output="numpy", show_progress=False, ranges=None):
    """Embed a str or a sequence of str -> [N, D] array in input order (L2-normalized by default).

    >>> fast_embed(["Excited to share our new paper!", "We are hiring"]).shape
    (2, 384)
    """
    texts = as_text_list(texts)  # bad input fails before any model loads
    return get_embedder(model, device, dtype).embed(
        texts, precision=precision, normalize=normalize, dimensions=dimensions, batch_tokens=batch_tokens,
        output=output, show_progress=show_progress, ranges=ranges)
