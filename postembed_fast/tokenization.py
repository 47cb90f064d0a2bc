"""Texts -> token ids as two flat arrays: `ids` (every text's ids, concatenated) and `offsets`
([N+1]; text i is ids[offsets[i]:offsets[i+1]]). No Python object per token or per text.

FlatTokenizer runs nanotoken (optional extra `fast-tokenizer`: a Rust WordPiece tokenizer that
writes flat arrays, releases the GIL and runs on every core) when it gives exactly the ids of the
model's Hugging Face tokenizer, and Hugging Face tokenizers otherwise. Hugging Face tokenizers is the
reference: before nanotoken serves a model, its ids are compared with Hugging Face's on a few hundred
built-in probe texts (hostile Unicode, vocabulary pieces, truncation at max_seq_length); the result is
remembered per tokenizer configuration for the life of the process. Any doubt falls back to Hugging
Face tokenizers, with the reason in `fallback_reason` and a FastTokenizerFallbackWarning:
  - nanotoken is not installed or fails to import;
  - the tokenizer has a component outside the verified set (WordPiece model, BertNormalizer,
    BertPreTokenizer, TemplateProcessing/BertProcessing), padding enabled, or an unusual truncation;
  - nanotoken refuses the tokenizer.json (UnsupportedTokenizerError) or fails to build;
  - a probe text gets different ids (or nanotoken accepts a lone surrogate that Hugging Face refuses);
  - nanotoken fails at run time on a batch of valid texts (that batch and later ones use Hugging Face).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import threading
import warnings
from collections.abc import Callable, Sequence

import numpy as np

NANOTOKEN_REQUIREMENT = "nanotoken==0.1.0"  # the extra `fast-tokenizer`; the only version verified here
BACKENDS = ("auto", "fast", "hf")

# Components whose nanotoken implementation has been checked id for id against Hugging Face tokenizers
# (bench/tokenizer_identity.py: the Debian corpus, hostile texts, every Unicode code point).
_VERIFIED_COMPONENTS = {
    "model": {"WordPiece"},
    "normalizer": {"BertNormalizer"},
    "pre_tokenizer": {"BertPreTokenizer"},
    "post_processor": {"TemplateProcessing", "BertProcessing"},
}
_VERIFIED: dict[tuple, str | None] = {}  # configuration key -> None (identical) or the mismatch found
_VERIFIED_LOCK = threading.Lock()
_STR = {str}


_FALLBACKS: dict[str, None] = {}  # every fallback reason seen in this process, in order (for info())


def _record_fallback(reason: str) -> None:
    with _VERIFIED_LOCK:
        _FALLBACKS.setdefault(reason)


def status() -> dict:
    """For postembed_fast.info(): the fast tokenizer's availability and every fallback so far."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        fast, why = f"nanotoken {version('nanotoken')}", None
    except PackageNotFoundError:
        fast, why = None, f"nanotoken is not installed (pip install '{NANOTOKEN_REQUIREMENT}')"
    with _VERIFIED_LOCK:
        return dict(fast=fast, fast_unavailable=why, fallbacks=list(_FALLBACKS))


class FastTokenizerFallbackWarning(RuntimeWarning):
    """The fast tokenizer is not used for this model; Hugging Face tokenizers runs instead."""


FlatEncoder = Callable[[list], "tuple[np.ndarray, np.ndarray]"]


class FlatTokenizer:
    """A model's tokenizer with flat output: encode(texts) -> (ids int32 [T], offsets int64 [N+1]).

    tokenizer: the `tokenizers.Tokenizer` of the model (loading.load_tokenizer: truncation at
        max_seq_length, no padding). Its truncation and padding settings are read once, here.
    lowercase: lowercase texts in Python (str.lower) before tokenizing, as sentence-transformers
        does for do_lower_case models.
    backend: "auto" (the fast encoder if it is verified, else Hugging Face), "fast" (the fast
        encoder or ValueError saying why not), "hf" (Hugging Face tokenizers only).
    fast_encoder: a callable texts -> (ids, offsets) to verify and use instead of nanotoken; it
        must apply special tokens and truncation itself. None: nanotoken.

    Thread-safe: encode may run on several threads at once (no state is written per call).
    """

    def __init__(self, tokenizer, *, lowercase: bool = False, backend: str = "auto",
                 fast_encoder: FlatEncoder | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
        import tokenizers

        self._hf = tokenizer
        self._lower = bool(lowercase)
        trunc = tokenizer.truncation
        self.max_length = None if trunc is None else int(trunc["max_length"])
        self._hf_encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self._hf_name = f"tokenizers {tokenizers.__version__}"
        self._fast = None
        self._fast_name = None
        self.fallback_reason: str | None = None
        if backend == "hf":
            self.fallback_reason = "backend='hf' requested"
        else:
            reason = self._setup_fast(fast_encoder)
            if reason is not None:
                self._fast = None
                self.fallback_reason = reason
                _record_fallback(reason)
                if backend == "fast":
                    raise ValueError(f"the fast tokenizer cannot serve this model: {reason}")
                warnings.warn(f"tokenizing with Hugging Face tokenizers, not the fast tokenizer: {reason}",
                              FastTokenizerFallbackWarning, stacklevel=2)

    @classmethod
    def from_folder(cls, folder, max_seq_length: int, *, lowercase: bool = False, **kwargs) -> FlatTokenizer:
        """Load the folder's fast tokenizer (truncation at max_seq_length, no padding) and wrap it."""
        from postembed_fast.loading import load_tokenizer

        return cls(load_tokenizer(folder, max_seq_length), lowercase=lowercase, **kwargs)

    @property
    def backend(self) -> str:
        """What runs: e.g. 'nanotoken 0.1.0' or 'tokenizers 0.23.3'."""
        return self._fast_name if self._fast is not None else self._hf_name

    @property
    def hf_tokenizer(self):
        return self._hf

    def __repr__(self) -> str:
        why = "" if self.fallback_reason is None else f", fallback_reason={self.fallback_reason!r}"
        return f"FlatTokenizer(backend={self.backend!r}, max_length={self.max_length}{why})"

    # ---- encoding ------------------------------------------------------------------------------
    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts -> (ids int32 [T], offsets int64 [N+1]), ids identical to the Hugging Face
        tokenizer's (special tokens added, truncated at max_length). A text that is not valid
        Unicode (a lone surrogate) raises ValueError naming its index; a non-str, TypeError."""
        if not isinstance(texts, list):
            texts = list(texts)
        if not texts:
            return np.empty(0, dtype=np.int32), np.zeros(1, dtype=np.int64)
        if not set(map(type, texts)) <= _STR:  # one C-level pass; str subclasses take the slow check
            _check_types(texts)
        src = [t.lower() for t in texts] if self._lower else texts
        fast = self._fast
        if fast is not None:
            try:
                return fast(src)
            except (KeyboardInterrupt, SystemExit, MemoryError):
                raise
            except BaseException as exc:  # noqa: BLE001  (pyo3 panics derive from BaseException)
                _raise_if_invalid(texts, exc)
                self._runtime_fallback(exc)
        try:
            return self._hf_flat(src)
        except Exception as exc:
            _raise_if_invalid(texts, exc)
            raise

    def _hf_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Hugging Face encode_batch -> flat arrays (one list of ids per text, then two numpy passes)."""
        seqs = [e.ids for e in self._hf_encode_batch(texts, add_special_tokens=True)]
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs)), out=offsets[1:])
        ids = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int32, count=int(offsets[-1]))
        return ids, offsets

    def _runtime_fallback(self, exc: BaseException) -> None:
        if self._fast is None:
            return
        reason = f"{self._fast_name} failed on valid texts ({type(exc).__name__}: {exc})"
        self._fast = None  # one atomic store: concurrent calls see either backend, both correct
        self.fallback_reason = reason
        _record_fallback(reason)
        warnings.warn(f"tokenizing with Hugging Face tokenizers from now on: {reason}",
                      FastTokenizerFallbackWarning, stacklevel=3)

    # ---- choosing and verifying the fast encoder -----------------------------------------------
    def _setup_fast(self, fast_encoder: FlatEncoder | None) -> str | None:
        """Install the fast encoder if it is verified; else return why not."""
        if self._hf.padding is not None:
            return "padding is enabled on the tokenizer (flat output is unpadded)"
        if fast_encoder is not None:
            name = f"custom ({getattr(fast_encoder, '__qualname__', type(fast_encoder).__name__)})"
            key = None  # an injected encoder is verified every time
            encoder = _checked_output(fast_encoder)
        else:
            reason = self._config_unsupported()
            if reason is not None:
                return reason
            try:
                import nanotoken
                from importlib.metadata import version

                nt_version = version("nanotoken")
            except ImportError as exc:
                return (f"nanotoken is not installed ({exc}); pip install '{NANOTOKEN_REQUIREMENT}' "
                        "or the extra postembed_fast[fast-tokenizer]")
            except Exception as exc:  # noqa: BLE001  (a broken install: metadata, shared library...)
                return f"nanotoken failed to import ({type(exc).__name__}: {exc})"
            name = f"nanotoken {nt_version}"
            try:
                nt = nanotoken.Tokenizer.from_json(self._hf.to_str())
            except Exception as exc:  # noqa: BLE001  (UnsupportedTokenizerError and anything else)
                return f"nanotoken cannot load this tokenizer ({type(exc).__name__}: {exc})"
            encoder = _nanotoken_encoder(nt, self.max_length, self._hf.truncation)
            key = (hashlib.sha256(self._hf.to_str().encode()).hexdigest(), self.max_length,
                   None if self._hf.truncation is None else self._hf.truncation.get("direction"),
                   self._lower, name, self._hf_name)
        self._fast, self._fast_name = encoder, name
        if key is not None:
            with _VERIFIED_LOCK:
                if key in _VERIFIED:
                    return _VERIFIED[key]
        reason = self._verify()
        if key is not None:
            with _VERIFIED_LOCK:
                _VERIFIED[key] = reason
        return reason

    def _config_unsupported(self) -> str | None:
        cfg = json.loads(self._hf.to_str())
        for part, allowed in _VERIFIED_COMPONENTS.items():
            kind = (cfg.get(part) or {}).get("type")
            if kind not in allowed:
                return (f"tokenizer {part} is {kind!r}; the fast tokenizer is verified for "
                        f"{' / '.join(sorted(allowed))} only")
        trunc = self._hf.truncation
        if trunc is not None:
            if trunc.get("strategy") not in ("longest_first", "only_first"):
                return f"truncation strategy {trunc.get('strategy')!r} is not supported by the fast tokenizer"
            if trunc.get("direction") not in ("right", "left"):
                return f"truncation direction {trunc.get('direction')!r} is not supported by the fast tokenizer"
            if self.max_length < self._hf.num_special_tokens_to_add(False) + 1:
                return f"max_length={self.max_length} leaves no room for text after the special tokens"
        return None

    def _verify(self) -> str | None:
        """Compare the fast encoder with Hugging Face on the probe texts: None if identical."""
        probes = probe_texts(self._hf, self.max_length)
        src = [t.lower() for t in probes] if self._lower else probes
        try:
            ids, offsets = self._fast(src)
        except Exception as exc:  # noqa: BLE001
            return f"{self._fast_name} failed on the probe texts ({type(exc).__name__}: {exc})"
        ref_ids, ref_offsets = self._hf_flat(src)
        if not (np.array_equal(offsets, ref_offsets) and np.array_equal(ids, ref_ids)):
            i = _first_difference(ids, offsets, ref_ids, ref_offsets)
            return (f"{self._fast_name} gives different token ids from Hugging Face tokenizers on probe text "
                    f"{i} ({probes[i][:60]!r}{'...' if len(probes[i]) > 60 else ''})")
        try:
            self._fast(["valid", "lone surrogate \ud800"])
        except Exception:  # noqa: BLE001  (refused, as Hugging Face refuses it)
            return None
        return f"{self._fast_name} accepts a lone surrogate that Hugging Face tokenizers refuses"


def _nanotoken_encoder(nt, max_length: int | None, truncation: dict | None) -> FlatEncoder:
    side = "right" if truncation is None else truncation.get("direction", "right")

    def encode(texts: list) -> tuple[np.ndarray, np.ndarray]:
        r = nt.encode_batch(texts, add_special_tokens=True, max_length=max_length, truncation_side=side)
        ids = r.ids
        return (ids.view(np.int32) if ids.dtype == np.uint32 else ids.astype(np.int32)), r.offsets

    return encode


def _checked_output(encoder: FlatEncoder) -> FlatEncoder:
    """An injected encoder's output as the flat contract: int32 ids, int64 offsets."""

    def encode(texts: list) -> tuple[np.ndarray, np.ndarray]:
        ids, offsets = encoder(texts)
        return np.asarray(ids).astype(np.int32, copy=False), np.asarray(offsets).astype(np.int64, copy=False)

    return encode


def _first_difference(ids, offsets, ref_ids, ref_offsets) -> int:
    n = min(len(offsets), len(ref_offsets)) - 1
    for i in range(n):
        a = ids[offsets[i] : offsets[i + 1]] if offsets[i + 1] <= len(ids) else None
        if a is None or not np.array_equal(a, ref_ids[ref_offsets[i] : ref_offsets[i + 1]]):
            return i
    return n


def _check_types(texts: list) -> None:
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")


def _raise_if_invalid(texts: list, exc: BaseException) -> None:
    """After a backend failed: raise the ValueError naming the first text that is not valid
    Unicode, if there is one (the scan runs only on this failure path, never per call)."""
    for i, t in enumerate(texts):
        try:
            t.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"texts[{i}] is not valid Unicode (lone surrogate at position {err.start}); "
                "repair it first, e.g. text.encode('utf-8', 'replace').decode('utf-8')"
            ) from None


# ---- probe texts ------------------------------------------------------------------------------
_PROBE_LITERALS = [
    "", " ", "\t\n\r ", "\u00a0\u3000\u2028\u2029\x85", "\x00", "a\x00b", "\x01\x1f\x7f\x80\x9f",
    "\u200b", "zero\u200bwidth\u200c\u200djoin", "\ufeffBOM", "soft\u00adhyphen", "\u2060\u180e\u2061",
    "\ufffd\ufffe\uffff", "\ue000\U000f0000\U0010ffff", "cafe\u0301 caf\u00e9", "\u0301\u0302",
    "Z\u0351\u0363a\u0352l\u0357g\u0350o", "\u0130stanbul \u0131", "\u039f\u0394\u039f\u03a3 \u03a3",
    "stra\u00dfe \u1e9e \u01c5", "\ufb00\ufb01\ufb03 \u0132", "\uff21\uff22\uff23\uff11\uff12 \uff48\uff49",
    "\U0001d407\U0001d41e\u210c \u24d0 \u338f x\u00b2 \u00bd \u216b", "\u4e2d\u6587\u5b57 \u65e5\u672c\u8a9e\u306e",
    "\ud55c\uad6d\uc5b4 \U00020000\U0002f800 \u3400\u4dbf\uf900", "\u0e2a\u0e27\u0e31\u0e2a\u0e14\u0e35",
    "\u0928\u092e\u0938\u094d\u0924\u0947", "\u0645\u0631\u062d\u0628\u0627 \u05e9\u05dc\u05d5\u05dd",
    "\u202eevil\u202c \u200fRLM \u2066iso\u2069", "\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "\U0001f3f3\ufe0f\u200d\U0001f308 \U0001f44d\U0001f3fd \U0001f1e9\U0001f1ea 1\ufe0f\u20e3",
    "[CLS]", "[SEP] [PAD] [MASK] [UNK]", "a[MASK]b [cls] [ SEP ]", "##ing ## #tag",
    "<s></s><pad><unk>", "hello, world!", "don't y'all U.S.A.", "3.14159 1,000,000 -42 1e-10",
    "https://example.com/a?q=1&x=2#f user@example.org", "\u201cq\u201d \u2018s\u2019 \u00abg\u00bb \u2014\u2026",
    "def f(x):\n    return x**2", "<b>&amp;</b>", "!!!???...", "$1 \u20ac2 \u00a33 \u00a54 \u20bf5",
    "The quick brown fox jumps over the lazy dog.", "Excited to share our new paper!",
    "This package provides the development files for the library.",
]


def probe_texts(tokenizer=None, max_length: int | None = None) -> list[str]:
    """A few hundred texts that exercise a WordPiece tokenizer: hostile literals, runs of code
    points across every plane, words around the 100-character WordPiece limit, random vocabulary
    pieces (when a tokenizer is given) and texts at, just over and far over max_length tokens."""
    out = list(_PROBE_LITERALS)
    ranges = [(0x00, 0x250), (0x250, 0x370), (0x370, 0x530), (0x2000, 0x2070), (0x3000, 0x3100),
              (0xFE00, 0xFE10), (0xFE20, 0xFE30), (0xFF00, 0xFFF0)]
    for lo, hi in ranges:
        for i in range(lo, hi, 48):
            run = [chr(c) for c in range(i, min(i + 48, hi))]
            out += ["".join(run), " ".join(run)]
    rng = random.Random(12345)
    sample = [c for c in rng.sample(range(0x110000), 4000) if not 0xD800 <= c < 0xE000]
    out += ["a" + "".join(map(chr, sample[i : i + 40])) + " b" for i in range(0, len(sample), 40)]
    for base in ("a", "\u00e9", "\u4e2d", "\U0001f600", "x\u0301"):
        out += [(base * n)[:n] for n in (99, 100, 101)]
    out.append("pre " + "y" * 101 + " post")
    if tokenizer is not None:
        vocab = sorted(tokenizer.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
        tokens = [t for t, _ in vocab]
        for _ in range(40):
            picked = rng.sample(tokens, 16)
            out.append(" ".join(picked))
            out.append("".join(picked))
    if max_length is not None:
        body = max(max_length - 2, 1)
        out += [" ".join(["word"] * n) for n in (body - 1, body, body + 1, body + 2, 4 * body)]
        out += ["\u4e2d" * (body + 3), ("caf\u00e9 " * body) + "end", "x" * 20 * body]
    else:
        out += [" ".join(["word"] * 600), "\u4e2d" * 600]
    return out
