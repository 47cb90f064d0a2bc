"""The encoder: a BERT-family transformer run padding-free, the whole forward pass in this file.

Every layer works on [total_tokens, hidden] (the token ids of a batch concatenated,
with cu_seqlens marking where each sequence starts). Weights are loaded once from
safetensors (or a torch.load(weights_only=True) checkpoint), Q/K/V fused into one
projection and cast to the serving dtype at load time.

    x = LayerNorm(word[ids] + (position + token_type[0])[pos])
    per layer:
        q, k, v = split(x @ Wqkv + bqkv)            # one GEMM, strided views
        a = varlen_attention(q, k, v, cu_seqlens)   # no pad tokens
        x = add_layernorm(a @ Wo + bo, x)           # LayerNorm(x + residual)
        h = gelu(x @ Wi + bi)                       # exact erf GELU, in place
        x = add_layernorm(h @ Wo2 + bo2, x)

Activations live in a Workspace: five buffers reused batch after batch (and written in
place where the math allows). On CPU, fresh per-layer tensors cost page faults on every
batch and fragment the glibc heap, so RSS crept up by ~25 MB per 1,000 posts.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from postembed_fast.kernels import add_layernorm, bias_gelu, varlen_attention

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")


@dataclass(frozen=True)
class EncoderConfig:
    model_type: str
    hidden: int
    heads: int
    layers: int
    intermediate: int
    vocab_size: int
    eps: float
    position_offset: int  # RoBERTa counts positions from padding_idx + 1

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @classmethod
    def from_json(cls, path: Path) -> "EncoderConfig":
        cfg = json.loads(Path(path).read_text())
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"{path}: unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{path}: unsupported hidden_act {cfg.get('hidden_act')!r}; only exact 'gelu' is supported")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: unsupported position_embedding_type {cfg['position_embedding_type']!r}")
        if cfg["hidden_size"] % cfg["num_attention_heads"]:
            raise ValueError(f"{path}: hidden_size is not a multiple of num_attention_heads")
        offset = cfg.get("pad_token_id", 1) + 1 if model_type != "bert" else 0
        return cls(
            model_type=model_type,
            hidden=cfg["hidden_size"],
            heads=cfg["num_attention_heads"],
            layers=cfg["num_hidden_layers"],
            intermediate=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            eps=cfg.get("layer_norm_eps", 1e-12),
            position_offset=offset,
        )


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, else pytorch_model.bin through torch.load(weights_only=True); never plain pickle."""
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    pt = folder / "pytorch_model.bin"
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise ValueError(f"{folder}: no weights (expected model.safetensors or pytorch_model.bin)")


def _strip_prefix(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """Checkpoints name the encoder 'embeddings...', 'bert.embeddings...', 'roberta.embeddings...' etc."""
    anchor = "embeddings.word_embeddings.weight"
    prefixes = [k[: -len(anchor)] for k in state if k.endswith(anchor)]
    if len(prefixes) != 1:
        raise ValueError(f"{folder}: cannot find a single '{anchor}' in the weights (found {len(prefixes)})")
    p = prefixes[0]
    return {k[len(p):]: v for k, v in state.items() if k.startswith(p)}


class Encoder:
    """Weights on one device in one dtype, and the padding-free forward pass."""

    def __init__(self, config: EncoderConfig, state: dict[str, torch.Tensor], device, dtype, folder: Path):
        self.config = config
        sd = _strip_prefix(state, folder)

        def take(name: str) -> torch.Tensor:
            if name not in sd:
                raise ValueError(f"{folder}: weight {name!r} is missing from the checkpoint")
            return sd[name]

        def put(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype).contiguous()

        e = "embeddings."
        self.word = put(take(e + "word_embeddings.weight"))
        # Single-segment input: token type 0 everywhere, a constant vector, folded into the positions.
        position = take(e + "position_embeddings.weight")[config.position_offset:]
        self.position_tt = put(position.float() + take(e + "token_type_embeddings.weight")[0].float())
        self.emb_ln = (put(take(e + "LayerNorm.weight")), put(take(e + "LayerNorm.bias")))
        self.layers = []
        for i in range(config.layers):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            w_qkv = torch.cat([take(att + f"self.{n}.weight") for n in ("query", "key", "value")])
            b_qkv = torch.cat([take(att + f"self.{n}.bias") for n in ("query", "key", "value")])
            self.layers.append(
                dict(
                    w_qkv=put(w_qkv),
                    b_qkv=put(b_qkv),
                    w_o=put(take(att + "output.dense.weight")),
                    b_o=put(take(att + "output.dense.bias")),
                    ln1=(put(take(att + "output.LayerNorm.weight")), put(take(att + "output.LayerNorm.bias"))),
                    w_i=put(take(p + "intermediate.dense.weight")),
                    b_i=put(take(p + "intermediate.dense.bias")),
                    w_o2=put(take(p + "output.dense.weight")),
                    b_o2=put(take(p + "output.dense.bias")),
                    ln2=(put(take(p + "output.LayerNorm.weight")), put(take(p + "output.LayerNorm.bias"))),
                )
            )
        if self.word.shape != (config.vocab_size, config.hidden):
            raise ValueError(f"{folder}: word embeddings {tuple(self.word.shape)} do not match config.json")

    @torch.inference_mode()
    def forward(self, input_ids, positions, cu_seqlens, max_seqlen: int, backend: str | None = None,
                workspace: "Workspace | None" = None):
        """input_ids, positions: int64 [total_tokens]; cu_seqlens: int32 [B+1] -> hidden [total_tokens, hidden].

        With a workspace the result is a view into it, valid until that workspace's next
        forward; without one, every buffer is fresh."""
        c = self.config
        T = input_ids.shape[0]
        ws = workspace if workspace is not None else Workspace()
        x, qkv, a, o, h = ws.buffers(T, c, self.word.device, self.word.dtype)
        torch.index_select(self.word, 0, input_ids, out=o)
        torch.index_select(self.position_tt, 0, positions, out=a)
        add_layernorm(o, a, *self.emb_ln, c.eps, backend=backend, out=x)
        q, k, v = qkv.view(T, 3, c.heads, c.head_dim).unbind(1)  # strided views of the fused output
        for L in self.layers:
            # Biases ride in the GEMMs (addmm's epilogue on CPU and in cuBLAS): cheaper than separate adds.
            torch.addmm(L["b_qkv"], x, L["w_qkv"].t(), out=qkv)
            varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend=backend, out=a.view(T, c.heads, c.head_dim))
            torch.addmm(L["b_o"], a, L["w_o"].t(), out=o)
            add_layernorm(o, x, *L["ln1"], c.eps, backend=backend, out=x)
            torch.addmm(L["b_i"], x, L["w_i"].t(), out=h)
            bias_gelu(h, None, backend=backend, out=h)
            torch.addmm(L["b_o2"], h, L["w_o2"].t(), out=o)
            add_layernorm(o, x, *L["ln2"], c.eps, backend=backend, out=x)
        return x


class Workspace:
    """Activation buffers for one forward at a time (so: one per thread), grown to the largest
    batch seen, never shrunk. Holds 7 x hidden + intermediate values per token of that batch
    (~63 MB for 4,096 tokens of MiniLM in float32)."""

    def __init__(self):
        self._key, self._bufs = None, None

    def buffers(self, T: int, c: EncoderConfig, device, dtype):
        """(x, qkv, attention out, projection out, FFN hidden) views of T rows each."""
        widths = (c.hidden, 3 * c.hidden, c.hidden, c.hidden, c.intermediate)
        key = (device, dtype, widths)
        if self._bufs is None or self._key != key or self._bufs[0].shape[0] < T:
            rows = -(-T // 256) * 256  # room to spare: batches vary by a few tokens
            self._bufs = [torch.empty(rows, w, device=device, dtype=dtype) for w in widths]
            self._key = key
        return [b[:T] for b in self._bufs]


class ThreadWorkspaces(threading.local):
    """One Workspace per thread: an Embedder may run on several threads at once."""

    def __init__(self):
        self.workspace = Workspace()
