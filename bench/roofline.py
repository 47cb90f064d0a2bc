"""FLOPs and bytes per token for a BERT encoder, counted from its config (useful work only:
padding tokens a system computes do not count)."""
from __future__ import annotations


def per_token(cfg, mean_len: float, weight_bytes: int, batch_tokens: int, act_bytes=4) -> dict:
    """cfg: postembed_fast.model.EncoderConfig. mean_len: mean tokens per post (the L of attention).

    flops: 2 * (linear weights) per token (Q,K,V,O: 4h^2; FFN: 2*h*i) per layer
           + attention 4 * L * h per layer (Q K^T and P V, 2 * L * h each).
    bytes (minimum): the token id (8 B), its word and position rows read once, the embedding
           written once per post (h * 4 B / L per token), and every weight read once per batch
           of batch_tokens tokens (weight_bytes / batch_tokens)."""
    h, i, n = cfg.hidden, cfg.intermediate, cfg.layers
    linear = n * 2 * (4 * h * h + 2 * h * i)
    attention = n * 4 * mean_len * h
    min_bytes = 8 + 2 * h * act_bytes + h * 4 / mean_len + weight_bytes / batch_tokens
    return dict(flops_linear=linear, flops_attention=attention, flops=linear + attention,
                min_bytes=min_bytes, weight_bytes=weight_bytes, batch_tokens=batch_tokens,
                arithmetic_intensity=(linear + attention) / min_bytes, mean_len=mean_len)


def weight_bytes(encoder) -> int:
    """Bytes of the weights every batch reads whole (the layers and LayerNorms); the word and
    position (+ token type) tables are gathered row by row and counted per token instead."""
    ts = [*encoder.emb_ln]
    for layer in encoder.layers:
        for v in layer.values():
            ts.extend(v if isinstance(v, tuple) else [v])
    return sum(t.numel() * t.element_size() for t in ts)
