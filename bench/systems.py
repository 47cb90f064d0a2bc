"""The systems under test behind one interface: `embed(texts) -> numpy [N, D or D/8]`.

Every system gets the same texts, model folder and device; tokenization is inside embed().
"""
from __future__ import annotations

import numpy as np
import torch

from postembed_fast.loading import default_model_folder

HF_BATCH = 32  # the hand-rolled baseline's batch size (sentence-transformers' default too)


class Postembed:
    """postembed_fast.Embedder; one Embedder per dtype, int8/binary share the default-dtype one."""

    def __init__(self, embedder, precision="float32", batch_tokens=None):
        self.e, self.precision, self.batch_tokens = embedder, precision, batch_tokens
        dt = str(embedder.dtype).replace("torch.", "")
        self.name = f"postembed_fast {dt}" + ("" if precision.startswith("float") else f" -> {precision}")
        self.dtype = dt
        self.is_float = precision.startswith("float")

    def embed(self, texts):
        return self.e.embed(texts, precision=self.precision, batch_tokens=self.batch_tokens)


class SentenceTransformers:
    """sentence-transformers encode() with its defaults (batch_size 32, length-sorted inside encode)."""

    def __init__(self, device, dtype=torch.float32, folder=None):
        from sentence_transformers import SentenceTransformer

        self.m = SentenceTransformer(str(folder or default_model_folder()), device=str(device))
        if dtype != torch.float32:
            self.m = self.m.to(dtype)
        self.dtype = str(dtype).replace("torch.", "")
        self.name = f"sentence-transformers {self.dtype}"
        self.is_float = True
        self.device = torch.device(device)

    def embed(self, texts):
        return self.m.encode(texts, batch_size=32, convert_to_numpy=True, show_progress_bar=False).astype(np.float32)


class HFMeanPool:
    """The baseline most people write: AutoModel(attn_implementation="sdpa"), batches of 32 texts
    taken in length-sorted order (longest first), padded per batch, masked mean pooling, L2 norm."""

    def __init__(self, device, dtype=torch.float32, folder=None, max_length=256):
        from transformers import AutoModel, AutoTokenizer

        folder = str(folder or default_model_folder())
        self.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.m = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="sdpa",
                                           dtype=dtype).to(device).eval()
        self.device, self.max_length = torch.device(device), max_length
        self.dtype = str(dtype).replace("torch.", "")
        self.name = f"transformers SDPA {self.dtype}"
        self.is_float = True

    @torch.inference_mode()
    def embed(self, texts):
        texts = list(texts)
        order = np.argsort([-len(t) for t in texts], kind="stable")  # by characters, as sentence-transformers
        out = np.empty((len(texts), self.m.config.hidden_size), dtype=np.float32)
        for s in range(0, len(texts), HF_BATCH):
            idx = order[s:s + HF_BATCH]
            enc = self.tok([texts[i] for i in idx], padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt").to(self.device)
            hidden = self.m(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden.float() * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out[idx] = torch.nn.functional.normalize(pooled, dim=1).cpu().numpy()
        return out
