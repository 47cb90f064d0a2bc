"""Texts -> token ids as two flat arrays: `ids` (every text's ids, concatenated) and `offsets`
([N+1]; text i is ids[offsets[i]:offsets[i+1]]). No Python object per token or per text.
TokenizedTexts is that pair with the tag of the model whose tokenizer made it: what
Embedder.tokenize_flat returns and Embedder.embed / embed_iter take instead of texts.

FlatTokenizer runs, best first, whichever fast encoder gives exactly the ids of the model's Hugging
Face tokenizer:
  1. "ascii-wordpiece + nanotoken": pure-ASCII texts through the compiled BERT WordPiece of
     csrc/wordpiece_cpu.cpp (OpenMP over texts, GIL released, no cache), every other text through
     nanotoken (optional extra `fast-tokenizer`: a Rust WordPiece that writes flat arrays) or, when
     nanotoken is not installed, through Hugging Face tokenizers;
  2. nanotoken alone;
  3. Hugging Face tokenizers, the reference and the fallback.
Before a fast encoder serves a model, its ids are compared with Hugging Face's on a few hundred
built-in probe texts (hostile Unicode, every ASCII character, vocabulary pieces, truncation at
max_seq_length); the result is remembered per tokenizer configuration for the life of the process.
Any doubt falls back to the next candidate, with the reason in `fallback_reason` / info() and a
FastTokenizerFallbackWarning:
  - the compiled module or nanotoken is missing or fails to import;
  - the tokenizer has a component outside the verified set (WordPiece model, BertNormalizer,
    BertPreTokenizer, TemplateProcessing/BertProcessing), padding enabled, or an unusual truncation;
  - a backend refuses the tokenizer.json (nanotoken's UnsupportedTokenizerError, or a setting the
    ASCII WordPiece does not implement) or fails to build;
  - a probe text gets different ids (or a lone surrogate is accepted where Hugging Face refuses it);
  - the fast encoder fails at run time on a batch of valid texts (that batch and later ones use
    Hugging Face).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import random
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    from postembed_fast.kernels import _ext

    ascii_why = None if _ext._C is not None and hasattr(_ext._C, "AsciiWordPiece") else (
        _ext.UNAVAILABLE_REASON or "postembed_fast._C has no AsciiWordPiece (rebuild the package)")
    with _VERIFIED_LOCK:
        return dict(fast=fast, fast_unavailable=why, ascii_wordpiece=ascii_why is None,
                    ascii_wordpiece_unavailable=ascii_why, fallbacks=list(_FALLBACKS))


@dataclass(frozen=True, eq=False)
class TokenizedTexts:
    """Texts as one model's tokenizer encodes them (special tokens added, truncated at the model's
    max_seq_length), flat: text i is ids[offsets[i]:offsets[i+1]]. Nothing per token or per text
    in Python: slicing ([a:b]) and concat() work on the arrays, so a server can merge requests'
    encodings without tokenizing again. len() is the number of texts.

    model_tag names the model whose tokenizer made it (Embedder.model_tag); Embedder.embed refuses
    one of another model. Made by Embedder.tokenize_flat; the constructor checks the layout.
    """

    ids: np.ndarray  # int32 [T]: every text's token ids, concatenated
    offsets: np.ndarray  # int64 [N+1]: offsets[0] == 0, non-decreasing, offsets[-1] == T
    model_tag: str

    def __post_init__(self):
        ids, offsets = np.asarray(self.ids), np.asarray(self.offsets)
        for name, a in (("ids", ids), ("offsets", offsets)):
            if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
                raise TypeError(f"TokenizedTexts.{name} must be a 1-d integer array, got {a.dtype} of shape {a.shape}")
        if not isinstance(self.model_tag, str) or not self.model_tag:
            raise TypeError(f"TokenizedTexts.model_tag must be a non-empty str, got {self.model_tag!r}")
        if offsets.size == 0 or offsets[0] != 0 or offsets[-1] != ids.size or (np.diff(offsets) < 0).any():
            raise ValueError(f"TokenizedTexts.offsets must start at 0, never decrease and end at len(ids) = "
                             f"{ids.size} (text i is ids[offsets[i]:offsets[i+1]])")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= 1 << 31):
            raise ValueError("TokenizedTexts.ids must be token ids in [0, 2**31)")
        object.__setattr__(self, "ids", ids.astype(np.int32, copy=False))
        object.__setattr__(self, "offsets", offsets.astype(np.int64, copy=False))

    @classmethod
    def _unchecked(cls, ids: np.ndarray, offsets: np.ndarray, model_tag: str) -> TokenizedTexts:
        """From arrays that hold the layout by construction (FlatTokenizer.encode's contract, a slice,
        a concatenation): the constructor's checks ran where they came from, not again per batch."""
        self = object.__new__(cls)
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "offsets", offsets)
        object.__setattr__(self, "model_tag", model_tag)
        return self

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int64 [N]: tokens per text."""
        return np.diff(self.offsets)

    @property
    def tokens(self) -> int:
        """Tokens of all texts together."""
        return int(self.offsets[-1])

    def __getitem__(self, key: slice) -> TokenizedTexts:
        """texts a:b (a view of the ids), as embed_iter and the server cut them."""
        if not isinstance(key, slice):
            raise TypeError(f"TokenizedTexts takes a slice [a:b], got {type(key).__name__}")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError("TokenizedTexts slices take no step")
        stop = max(start, stop)
        a, b = self.offsets[start], self.offsets[stop]
        return TokenizedTexts._unchecked(self.ids[a:b], self.offsets[start : stop + 1] - a, self.model_tag)

    @classmethod
    def concat(cls, parts: Sequence[TokenizedTexts]) -> TokenizedTexts:
        """The texts of every part, in order, as one TokenizedTexts (all of one model)."""
        if not parts:
            raise ValueError("TokenizedTexts.concat needs at least one part")
        tag = parts[0].model_tag
        for i, p in enumerate(parts):
            if not isinstance(p, TokenizedTexts):
                raise TypeError(f"parts[{i}] must be TokenizedTexts, got {type(p).__name__}")
            if p.model_tag != tag:
                raise ValueError(f"parts[{i}] was tokenized for model {p.model_tag!r}, parts[0] for {tag!r}")
        if len(parts) == 1:
            return parts[0]
        lengths = np.concatenate([p.lengths for p in parts])
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls._unchecked(np.concatenate([p.ids for p in parts]), offsets, tag)

    def tolist(self) -> list[list[int]]:
        """Token ids per text, as Python lists (for JSON; the flat arrays are what embedding uses)."""
        ids = self.ids.tolist()
        return [ids[a:b] for a, b in itertools.pairwise(self.offsets.tolist())]

    def __repr__(self) -> str:
        return f"TokenizedTexts({len(self)} texts, {self.tokens} tokens, model_tag={self.model_tag!r})"


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
        """Install the first verified fast encoder; else return why none is.

        Candidates, best first: the ASCII WordPiece of csrc/ for pure-ASCII texts with nanotoken (or,
        without it, Hugging Face) for the others; then nanotoken alone. Each is compared with Hugging
        Face on the probe texts once per tokenizer configuration and process."""
        if self._hf.padding is not None:
            return "padding is enabled on the tokenizer (flat output is unpadded)"
        if fast_encoder is not None:
            name = f"custom ({getattr(fast_encoder, '__qualname__', type(fast_encoder).__name__)})"
            return self._try(name, _checked_output(fast_encoder), key=None)  # verified every time
        reason = self._config_unsupported()
        if reason is not None:
            return reason
        config = self._hf.to_str()
        nanotoken_enc, nanotoken_name, nanotoken_why = self._nanotoken(config)
        ascii_wp, ascii_why = _ascii_wordpiece(json.loads(config), self.max_length, self._hf.truncation)
        candidates = []
        if ascii_wp is not None:
            general, general_name = (nanotoken_enc, nanotoken_name) if nanotoken_enc else (self._hf_flat, self._hf_name)
            candidates.append((f"{ASCII_WORDPIECE} + {general_name}", _ascii_first(ascii_wp, general)))
        else:
            _record_fallback(f"{ASCII_WORDPIECE} not used: {ascii_why}")
        if nanotoken_enc is not None:
            candidates.append((nanotoken_name, nanotoken_enc))
        else:  # the ASCII path may still serve, with Hugging Face for the other texts: info() says so
            _record_fallback(nanotoken_why)
        reasons = []
        config_hash = hashlib.sha256(config.encode()).hexdigest()
        for name, encoder in candidates:
            key = (config_hash, self.max_length, None if self._hf.truncation is None else self._hf.truncation.get("direction"),
                   self._lower, name, self._hf_name)
            reason = self._try(name, encoder, key)
            if reason is None:
                if reasons:  # a better candidate failed: say so, the one installed is still verified
                    _record_fallback(reasons[0])
                    warnings.warn(f"using {name}: {reasons[0]}", FastTokenizerFallbackWarning, stacklevel=3)
                return None
            reasons.append(reason)
        if nanotoken_enc is None:
            reasons.append(nanotoken_why)
        return "; ".join(reasons)

    def _try(self, name: str, encoder: FlatEncoder, key) -> str | None:
        """Verify `encoder` (or reuse this process's verdict for `key`); install it if identical."""
        reason = None
        cached = False
        if key is not None:
            with _VERIFIED_LOCK:
                cached = key in _VERIFIED
                reason = _VERIFIED.get(key)
        if not cached:
            reason = self._verify(name, encoder)
            if key is not None:
                with _VERIFIED_LOCK:
                    _VERIFIED[key] = reason
        if reason is None:
            self._fast, self._fast_name = encoder, name
        return reason

    def _nanotoken(self, config: str):
        """(encoder, name, None) or (None, None, why nanotoken cannot serve this tokenizer)."""
        try:
            import nanotoken
            from importlib.metadata import version

            name = f"nanotoken {version('nanotoken')}"
        except ImportError as exc:
            return None, None, (f"nanotoken is not installed ({exc}); pip install '{NANOTOKEN_REQUIREMENT}' "
                                "or the extra postembed_fast[fast-tokenizer]")
        except Exception as exc:  # noqa: BLE001  (a broken install: metadata, shared library...)
            return None, None, f"nanotoken failed to import ({type(exc).__name__}: {exc})"
        try:
            nt = nanotoken.Tokenizer.from_json(config)
        except Exception as exc:  # noqa: BLE001  (UnsupportedTokenizerError and anything else)
            return None, None, f"nanotoken cannot load this tokenizer ({type(exc).__name__}: {exc})"
        return _nanotoken_encoder(nt, self.max_length, self._hf.truncation), name, None

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

    def _verify(self, name: str, encoder: FlatEncoder) -> str | None:
        """Compare an encoder with Hugging Face on the probe texts: None if identical."""
        probes = probe_texts(self._hf, self.max_length)
        src = [t.lower() for t in probes] if self._lower else probes
        try:
            ids, offsets = encoder(src)
        except Exception as exc:  # noqa: BLE001
            return f"{name} failed on the probe texts ({type(exc).__name__}: {exc})"
        ref_ids, ref_offsets = self._hf_flat(src)
        if not (np.array_equal(offsets, ref_offsets) and np.array_equal(ids, ref_ids)):
            i = _first_difference(ids, offsets, ref_ids, ref_offsets)
            return (f"{name} gives different token ids from Hugging Face tokenizers on probe text "
                    f"{i} ({probes[i][:60]!r}{'...' if len(probes[i]) > 60 else ''})")
        try:
            encoder(["valid", "lone surrogate \ud800"])
        except Exception:  # noqa: BLE001  (refused, as Hugging Face refuses it)
            return None
        return f"{name} accepts a lone surrogate that Hugging Face tokenizers refuses"


ASCII_WORDPIECE = "ascii-wordpiece"  # csrc/wordpiece_cpu.cpp: pure-ASCII texts only


def _ascii_wordpiece(cfg: dict, max_length: int | None, truncation: dict | None):
    """The compiled ASCII WordPiece for this tokenizer.json, or (None, why not). Components are
    already known to be BertNormalizer / BertPreTokenizer / WordPiece / a fixed-specials
    post-processor (_config_unsupported); this reads their settings."""
    from postembed_fast.kernels import _ext

    if _ext._C is None or not hasattr(_ext._C, "AsciiWordPiece"):
        return None, _ext.UNAVAILABLE_REASON or "postembed_fast._C has no AsciiWordPiece (rebuild the package)"
    norm, model, post = cfg["normalizer"], cfg["model"], cfg["post_processor"]
    if not norm.get("clean_text", True):
        return None, "BertNormalizer clean_text=false (control characters kept) is not implemented"
    if (truncation or {}).get("stride", 0):
        return None, "truncation with a stride is not implemented"
    vocab = model.get("vocab") or {}
    unk = vocab.get(model.get("unk_token"))
    if unk is None:
        return None, f"the unk_token {model.get('unk_token')!r} is not in the vocabulary"
    if any(not isinstance(i, int) or not 0 <= i < 1 << 24 for i in vocab.values()):
        return None, "vocabulary ids outside 0..2^24"
    tokens = [""] * (max(vocab.values()) + 1)
    for tok, i in vocab.items():  # an id held by two tokens keeps the first (no sort: 0.13 s of a start)
        tokens[i] = tok if tokens[i] == "" else tokens[i]
    special = _specials_around_text(post)
    if special is None:
        return None, f"post_processor {post.get('type')!r} does not put fixed special tokens around one text"
    added = cfg.get("added_tokens") or []
    if any(a.get("normalized") and a.get("content", "").isascii() for a in added):
        # Hugging Face matches these on the normalized (cleaned, lowercased) text; this code only
        # looks for added tokens in the raw text.
        return None, "an ASCII added token is matched on normalized text (normalized=true)"
    wp = _ext._C.AsciiWordPiece(
        vocab=tokens, unk_id=int(unk), continuing_prefix=model.get("continuing_subword_prefix") or "",
        max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
        lowercase=bool(norm.get("lowercase", True)), prefix_ids=special[0], suffix_ids=special[1],
        max_length=int(max_length or 0),
        truncate_left=(truncation or {}).get("direction", "right") == "left",
        added_tokens=[a["content"] for a in added if a.get("content", "").isascii()],
    )
    return wp, None


def _specials_around_text(post: dict):
    """([ids before the text], [ids after]) of a BertProcessing / single-sequence TemplateProcessing."""
    kind = post.get("type")
    if kind == "BertProcessing":
        return [int(post["cls"][1])], [int(post["sep"][1])]
    if kind != "TemplateProcessing":
        return None
    before, after, seen = [], [], False
    for item in post.get("single", []):
        if "Sequence" in item:
            if seen or item["Sequence"].get("id") != "A":
                return None
            seen = True
        elif "SpecialToken" in item:
            ids = post.get("special_tokens", {}).get(item["SpecialToken"]["id"], {}).get("ids")
            if not ids:
                return None
            (after if seen else before).extend(int(i) for i in ids)
        else:
            return None
    return (before, after) if seen else None


def _ascii_first(wp, general: FlatEncoder) -> FlatEncoder:
    """Pure-ASCII texts through the compiled WordPiece, the rest (and any text containing an added
    token) through `general`; the two outputs merged back in text order with two numpy passes."""

    def encode(texts: list) -> tuple[np.ndarray, np.ndarray]:
        lens, ids = wp.encode(texts)
        rest = np.flatnonzero(lens < 0)
        if rest.size:
            rest_ids, rest_offsets = general([texts[i] for i in rest])
            lens[rest] = np.diff(rest_offsets)
        offsets = np.zeros(len(texts) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        if not rest.size:
            return ids, offsets
        if rest.size == len(texts):
            return rest_ids, offsets
        from_rest = np.zeros(len(texts), dtype=bool)
        from_rest[rest] = True
        token_from_rest = np.repeat(from_rest, lens)
        out = np.empty(int(offsets[-1]), dtype=np.int32)
        out[token_from_rest] = rest_ids
        out[~token_from_rest] = ids
        return out, offsets

    return encode


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
    "It is what it is: this is a test of the tokenizer, and it works; we are all in. I'm sure you'd agree.",
    "Unbelievably, the un-tokenizable antidisestablishmentarianism's tokenizations were re-tokenized.",
    "This package provides the development files for the library.",
]


def probe_texts(tokenizer=None, max_length: int | None = None) -> list[str]:
    """A few hundred texts that exercise a WordPiece tokenizer: hostile literals, runs of code
    points across every plane, words around the 100-character WordPiece limit, random vocabulary
    pieces (when a tokenizer is given) and texts at, just over and far over max_length tokens."""
    out = list(_PROBE_LITERALS)
    # Every ASCII character inside a word, between words and next to upper case (the compiled ASCII
    # WordPiece's byte classes: dropped controls join the word, \t\n\r split it, punctuation isolates).
    out += [f"ab{chr(c)}cd {chr(c)}X{chr(c)}" for c in range(128)]
    out += ["[MASK", "MASK]", "[[MASK]]", "x[SEP]y", "[PAD][UNK]", "[cls]"]
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
