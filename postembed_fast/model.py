"""The encoder: a BERT-family transformer run padding-free, the whole forward pass in this file.

Every layer works on [total_tokens, hidden] (the token ids of a batch concatenated,
with cu_seqlens marking where each sequence starts). Weights are loaded once from
safetensors (or a torch.load(weights_only=True) checkpoint), Q/K/V fused into one
projection and cast to the serving dtype at load time.

    x = LayerNorm(word[ids] + position[pos] + token_type[0])
    per layer:
        q, k, v = split(x @ Wqkv + bqkv)            # one GEMM, strided views
        a = varlen_attention(q, k, v, cu_seqlens)   # no pad tokens
        x = add_layernorm(a @ Wo + bo, x)           # LayerNorm(x + residual)
        h = gelu(x @ Wi + bi)                       # exact erf GELU
        x = add_layernorm(h @ Wo2 + bo2, x)
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

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
    max_positions: int
    type_vocab_size: int
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
            max_positions=cfg["max_position_embeddings"] - offset,
            type_vocab_size=cfg.get("type_vocab_size", 2),
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
        self.position = put(take(e + "position_embeddings.weight")[config.position_offset:])
        # Single-segment input: token type 0 everywhere, a constant vector.
        self.token_type0 = put(take(e + "token_type_embeddings.weight")[0])
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
    def forward(self, input_ids, positions, cu_seqlens, max_seqlen: int, backend: str | None = None):
        """input_ids, positions: int64 [total_tokens]; cu_seqlens: int32 [B+1] -> hidden [total_tokens, hidden]."""
        c = self.config
        T = input_ids.shape[0]
        x = self.word[input_ids] + self.position[positions]
        x = add_layernorm(x, self.token_type0.expand_as(x), *self.emb_ln, c.eps, backend=backend)
        for L in self.layers:
            qkv = F.linear(x, L["w_qkv"], L["b_qkv"]).view(T, 3, c.heads, c.head_dim)
            q, k, v = qkv.unbind(1)  # strided views of the fused output: no copies
            a = varlen_attention(q, k, v, cu_seqlens, max_seqlen, backend=backend)
            x = add_layernorm(F.linear(a.view(T, c.hidden), L["w_o"], L["b_o"]), x, *L["ln1"], c.eps, backend=backend)
            # The bias rides in the GEMM (addmm epilogue on CPU and in cuBLAS): cheaper than a separate add.
            h = bias_gelu(F.linear(x, L["w_i"], L["b_i"]), None, backend=backend)
            x = add_layernorm(F.linear(h, L["w_o2"], L["b_o2"]), x, *L["ln2"], c.eps, backend=backend)
        return x
