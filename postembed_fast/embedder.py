"""Embedder: texts in, embeddings out, in input order. The public API only; the work is done by

    tokenization.py  texts -> TokenizedTexts: flat token ids + offsets (fast tokenizer, verified
                     against Hugging Face), tagged with the model
    pipeline.py      TokenizedTexts chunks -> length-sorted token-budget batches (packing.py) -> device
                     -> readback
    model.py         the padding-free encoder          head.py   pooling, Dense, norm, precision
    ranges.py        quantization ranges               graphs.py CUDA graphs for 1-8 post requests
"""
from __future__ import annotations

import functools
import itertools
import threading
import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from postembed_fast import pipeline
from postembed_fast.graphs import GraphCaptureError, GraphRunner, graphs_enabled
from postembed_fast.head import HeadOptions, PoolingHead
from postembed_fast.kernels import _ext, cpu_isa
from postembed_fast.kernels.checks import QuantRanges
from postembed_fast.kernels.precision import precision_spec
from postembed_fast.loading import Dense, model_tag, read_model_folder, resolve_model
from postembed_fast.model import Encoder, EncoderConfig, ThreadWorkspaces, load_state_dict
from postembed_fast.packing import PackedBatch
from postembed_fast.ranges import ranges_for_call, ranges_of, shipped_mean, shipped_ranges
from postembed_fast.tokenization import FlatTokenizer, TokenizedTexts

OUTPUTS = ("numpy", "torch")
DEVICE_TYPES = ("cpu", "cuda")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Tokens per forward batch: the one default of the package (the server merges requests up to it
# too). Measured on the 2-core CPU with bench/batch_tokens.py (README: throughput is flat from 2k
# to 16k tokens; smaller batches cost Python overhead, larger ones cache misses). GPUs want far
# larger batches.
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "cuda": 65536}


class DeviceUnavailableError(RuntimeError, ValueError):
    """The requested device exists as a name but not on this machine (e.g. device='cuda' without a GPU)."""


def resolve_device(device) -> torch.device:
    if device is None:  # then the same path as an explicit device: one spelling per device ("cuda:N")
        device = "cuda" if torch.cuda.is_available() else "cpu"
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
    if dtype is None:  # CUDA: float16; CPU: the capability table (bf16 where the CPU has native bf16)
        return torch.float16 if device.type == "cuda" else cpu_isa.compute_dtype()[0]
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
    if not set(map(type, out)) <= {str}:  # one C-level pass; the loop only on the way to an error
        for i, t in enumerate(out):  # (or for str subclasses, which pass)
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
    return out


class Embedder:
    """A loaded model on one device in one dtype. Safe to call from several threads at once:
    a call keeps its state local (activation buffers are per thread, reused from call to
    call: ~63 MB per calling thread at the CPU default of 4,096 tokens per batch), and the
    weights are never written after loading."""

    def __init__(self, model=None, *, device=None, dtype=None, truncate_dim=None):
        """truncate_dim (as sentence-transformers'): serve the first k dimensions, re-normalized; None
        = the folder's own (config_sentence_transformers.json, e.g. 50 for a Matryoshka folder) or
        else the full width. The folder's int8 ranges and mean embedding belong to its default width:
        at another width they are not loaded (calibrate() makes them)."""
        folder, is_default = resolve_model(model)
        self._is_default = is_default
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model_folder = folder
        spec = read_model_folder(folder)
        dense = [type(d)(d.weight.to(self.device), None if d.bias is None else d.bias.to(self.device), d.activation)
                 for d in spec.dense]
        self.max_seq_length = spec.max_seq_length
        self.tokenizer = FlatTokenizer.from_folder(spec.encoder_folder, spec.max_seq_length, lowercase=spec.do_lower_case)
        config = EncoderConfig.from_json(spec.encoder_folder / "config.json")
        self.encoder = Encoder(config, load_state_dict(spec.encoder_folder), self.device, self.dtype,
                               spec.encoder_folder)
        self.full_dim = dense[-1].weight.shape[0] if dense else config.hidden
        folder_dim = spec.truncate_dim or self.full_dim
        if spec.truncate_dim is not None and not spec.truncate_dim <= self.full_dim:
            raise ValueError(f"{folder}: truncate_dim {spec.truncate_dim} exceeds the model's {self.full_dim} dimensions")
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                         or not 1 <= truncate_dim <= self.full_dim):
            raise ValueError(f"truncate_dim must be None or an int in [1, {self.full_dim}], got {truncate_dim!r}")
        self.dim = truncate_dim or folder_dim
        if self.dim < self.full_dim:  # the first dim outputs of the last linear map (activations are per element)
            if dense:
                last = dense[-1]
                dense[-1] = Dense(last.weight[: self.dim].contiguous(),
                                  None if last.bias is None else last.bias[: self.dim].contiguous(), last.activation)
            else:
                dense.append(Dense(torch.eye(self.dim, self.full_dim, device=self.device), None, None))
        self.head = PoolingHead(spec.pooling, dense)
        shipped = self.dim == folder_dim
        self._ranges = shipped_ranges(is_default, folder, self.dim) if shipped else None
        self._mean = shipped_mean(is_default, folder, self.dim) if shipped else None
        self._calibration = None  # normalized float32 embeddings from calibrate(), for truncated ranges
        self._lock = threading.Lock()
        self._workspaces = ThreadWorkspaces()  # activation buffers, one set per calling thread
        self._host = pipeline.HostBuffers()  # pinned staging and readback slots, per calling thread
        # small requests on a GPU replay captured CUDA graphs (postembed_fast/graphs.py)
        self._graphs = (GraphRunner(self.encoder, self.device, self.max_seq_length)
                        if graphs_enabled(self.device) else None)
        if _ext.UNAVAILABLE_REASON is not None:
            warnings.warn(f"{_ext.UNAVAILABLE_REASON}: the compiled C++/CUDA kernels are unavailable, "
                          "so slower backends run instead (see postembed_fast.info())", RuntimeWarning, stacklevel=2)

    @property
    def pooling(self) -> str:
        return self.head.pooling

    @functools.cached_property
    def model_tag(self) -> str:
        """Which model made an embedding: the folder's name (the alias for the default model) plus the
        first 12 hex digits of a SHA-256 over its weight files. Stores and indexes record it, so codes of
        different models are never compared; TokenizedTexts carry it, so ids of another model's
        tokenizer are never embedded. Computed once (0.1 s for the default model's 90 MB)."""
        return model_tag(self.model_folder, self._is_default)

    @property
    def default_batch_tokens(self) -> int:
        """Tokens per forward batch when a call passes batch_tokens=None (per device type)."""
        return DEFAULT_BATCH_TOKENS[self.device.type]

    # ---- quantization ranges -------------------------------------------------------------
    @property
    def quantization_ranges(self) -> np.ndarray | None:
        """float32 [2, dim]: per-dimension min (row 0) and max (row 1) of normalized embeddings."""
        return None if self._ranges is None else self._ranges.copy()

    @property
    def embedding_mean(self) -> np.ndarray | None:
        """float32 [dim]: the mean normalized embedding of the calibration posts (shipped with the
        default model and trained folders, or set by calibrate()); None if unknown."""
        return None if self._mean is None else self._mean.copy()

    def calibrate(self, texts, *, batch_tokens=None, show_progress=False) -> np.ndarray:
        """Set quantization_ranges (and embedding_mean) from the embeddings of a corpus (real posts,
        ideally > 1,000)."""
        emb = self.embed(texts, batch_tokens=batch_tokens, show_progress=show_progress)
        if len(emb) < 2:
            raise ValueError("calibrate() needs at least 2 texts")
        with self._lock:
            self._calibration = emb
            self._ranges = ranges_of(emb)
            self._mean = emb.astype(np.float64).mean(axis=0).astype(np.float32)
        return self._ranges.copy()

    # ---- tokenizing ----------------------------------------------------------------------
    def tokenize_flat(self, texts) -> TokenizedTexts:
        """texts (a str or a sequence of str) -> TokenizedTexts: the ids the encoder sees (special
        tokens, truncation to max_seq_length) as flat arrays tagged with this model. embed() and
        embed_iter() take it instead of the texts and give the same rows; tokenizing once lets a
        caller count tokens, batch and embed without tokenizing again."""
        return self._tokenize(as_text_list(texts))

    def tokenize(self, texts) -> list[list[int]]:
        """Token ids per text as Python lists (tokenize_flat(texts).tolist())."""
        return self.tokenize_flat(texts).tolist()

    def _tokenize(self, texts: list[str], first: int = 0) -> TokenizedTexts:
        """Checked texts -> TokenizedTexts; a text the tokenizer refuses is named by its index + `first`."""
        try:
            ids, offsets = self.tokenizer.encode(texts)
        except ValueError as exc:
            raise (_shift_index(exc, first) if first else exc) from None
        return TokenizedTexts._unchecked(ids, offsets, self.model_tag)

    def _own(self, tokens: TokenizedTexts) -> TokenizedTexts:
        if tokens.model_tag != self.model_tag:
            raise ValueError(f"these TokenizedTexts were made by the tokenizer of model {tokens.model_tag!r}, "
                             f"not of this Embedder's model {self.model_tag!r}: tokenize with this "
                             "Embedder's tokenize_flat()")
        return tokens

    # ---- embedding -----------------------------------------------------------------------
    def embed(self, texts, *, precision="float32", normalize=True, dimensions=None, batch_tokens=None,
              output="numpy", show_progress=False, ranges=None):
        """texts: a str, a sequence of str, or TokenizedTexts of this model -> [N, D] (numpy or torch),
        row i = text i."""
        texts = self._own(texts) if isinstance(texts, TokenizedTexts) else as_text_list(texts)
        opts, batch_tokens = self._options(precision, normalize, dimensions, batch_tokens, output, ranges)
        out = self._embed(texts, opts, batch_tokens, show_progress)
        return torch.from_numpy(out) if output == "torch" else out

    def embed_iter(self, texts, *, chunk_size=1024, precision="float32", normalize=True,
                   dimensions=None, batch_tokens=None, output="numpy", show_progress=False, ranges=None):
        """Yield embeddings chunk by chunk (chunk_size texts each, in input order); memory stays flat
        however long the input. texts: an iterable of str, or TokenizedTexts of this model.
        Concatenating the chunks equals embed() of the whole input."""
        if isinstance(texts, str):
            texts = [texts]
        if isinstance(texts, TokenizedTexts):
            self._own(texts)
        elif not isinstance(texts, Iterable):
            raise TypeError(f"texts must be an iterable of str or TokenizedTexts, got {type(texts).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        opts, batch_tokens = self._options(precision, normalize, dimensions, batch_tokens, output, ranges)
        bar = _progress(len(texts) if isinstance(texts, TokenizedTexts) else None, show_progress)
        chunks = _slices(texts, chunk_size) if isinstance(texts, TokenizedTexts) else _checked_chunks(texts, chunk_size)
        for chunk, seen in chunks:
            try:
                out = self._embed(chunk, opts, batch_tokens, False)
            except ValueError as exc:  # a text the tokenizer refuses: name its index in the whole input
                raise _shift_index(exc, seen) from None
            if bar is not None:
                bar.update(len(chunk))
            yield torch.from_numpy(out) if output == "torch" else out
        if bar is not None:
            bar.close()

    def _options(self, precision, normalize, dimensions, batch_tokens, output, ranges) -> tuple[HeadOptions, int]:
        """Every argument of an embed call checked here, once; the layers below trust them."""
        spec = precision_spec(precision)
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}; valid: {', '.join(OUTPUTS)}")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or not 1 <= dimensions <= self.dim):
            raise ValueError(f"dimensions must be None or an int in [1, {self.dim}], got {dimensions!r}")
        if dimensions == self.dim:
            dimensions = None
        if batch_tokens is None:
            batch_tokens = self.default_batch_tokens
        if isinstance(batch_tokens, bool) or not isinstance(batch_tokens, int) or batch_tokens < 1:
            raise ValueError(f"batch_tokens must be a positive int, got {batch_tokens!r}")
        normalize = bool(normalize)
        checked = None
        if spec.needs_ranges:
            width = dimensions or self.dim
            r = ranges_for_call(precision, ranges, normalize=normalize, width=width, model_dim=self.dim,
                                calibrated=self._ranges, calibration=self._calibration)
            checked = QuantRanges(r, width, self.device)
        return HeadOptions(precision, normalize, dimensions, checked), batch_tokens

    def _embed(self, texts: list[str] | TokenizedTexts, opts: HeadOptions, batch_tokens: int,
               show_progress: bool) -> np.ndarray:
        """Rows in input order. The one path of texts and TokenizedTexts: chunks of TOKENIZE_CHUNK texts
        as TokenizedTexts (texts are tokenized chunk by chunk, on the producer thread when it runs
        ahead; TokenizedTexts are sliced), batches planned (sorted by length) within each chunk."""
        spec = precision_spec(opts.precision)
        n = len(texts)
        out = np.empty((n, spec.columns(opts.dimensions or self.dim)), dtype=spec.numpy_dtype)
        if not n:
            return out
        bar = _progress(n, show_progress)
        to_device = self._host.device_inputs(self.device)
        readback = pipeline.Readback(out, self.device, self._host.readback_slots)
        if isinstance(texts, TokenizedTexts):
            chunks = (part for part, _ in _slices(texts, pipeline.TOKENIZE_CHUNK))
        else:
            chunks = (self._tokenize(part, first) for part, first in _slices(texts, pipeline.TOKENIZE_CHUNK))
        stream = pipeline.batches(chunks, batch_tokens)
        if n > pipeline.TOKENIZE_CHUNK:  # tokenize and pack ahead, on another thread
            stream = pipeline.run_ahead(stream)
        for batch in stream:
            readback.put(batch.rows, self._embed_batch(batch, opts, to_device))
            if bar is not None:
                bar.update(batch.size)
        readback.flush()
        if bar is not None:
            bar.close()
        return out

    def _embed_batch(self, batch: PackedBatch, opts: HeadOptions, to_device, backend=None) -> torch.Tensor:
        graphs = self._graphs
        if backend is None and graphs is not None and graphs.takes(batch):
            try:
                return graphs.run(batch, lambda hidden, cu: self.head(hidden, cu, opts))
            except GraphCaptureError as exc:
                warnings.warn(f"{exc}; small requests run eagerly from now on", RuntimeWarning, stacklevel=2)
                self._graphs = None
        ids, positions, cu = to_device(batch)
        hidden = self.encoder.forward(ids, positions, cu, batch.max_seqlen, backend=backend,
                                      workspace=self._workspaces.workspace)
        return self.head(hidden, cu, opts, backend)


def _slices(texts: list[str] | TokenizedTexts, size: int):
    """(texts[start:start + size], start) over checked texts or TokenizedTexts."""
    for start in range(0, len(texts), size):
        yield texts[start : start + size], start


def _checked_chunks(texts: Iterable, size: int):
    """(list of `size` texts, index of its first) over any iterable, each text's type checked here:
    a non-str is named by its index in the whole input."""
    it, seen = iter(texts), 0
    while chunk := list(itertools.islice(it, size)):
        if not set(map(type, chunk)) <= {str}:
            for i, t in enumerate(chunk):
                if not isinstance(t, str):
                    raise TypeError(f"texts[{seen + i}] must be str, got {type(t).__name__}")
        yield chunk, seen
        seen += len(chunk)


def _shift_index(exc: ValueError, offset: int) -> ValueError:
    """A tokenizer error names texts[i] within a chunk; embed_iter reports the index in the whole input."""
    import re

    msg = re.sub(r"texts\[(\d+)\]", lambda m: f"texts[{int(m.group(1)) + offset}]", str(exc), count=1)
    return ValueError(msg)


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
