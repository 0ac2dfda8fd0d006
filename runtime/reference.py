"""The PyTorch reference backend: a Hugging Face checkpoint directory run by edge.HybridLM in fp32."""
from __future__ import annotations

import numpy as np
import torch

from edge.chat import read_chat_template
from edge.checkpoint import load_model
from edge.formats import REFERENCE_ENGINE
from edge.model import DynamicCache
from edge.tokenizer import load_tokenizer

from .session import Session


class ReferenceSession(Session):
    engine = REFERENCE_ENGINE

    def __init__(self, model_dir, n_threads: int | None = None, kv_cache: str | None = None,
                 max_seq_len: int | None = None):
        self._fixed_at_export(model_dir, "kv_cache", kv_cache, "f32")  # HybridLM's cache is fp32
        self.model = load_model(model_dir)
        config = self.model.config
        tokenizer = load_tokenizer(model_dir) if (model_dir / "tokenizer.json").exists() else None
        super().__init__(config, tokenizer, max_seq_len or config.max_position_embeddings, n_threads,
                         quant="f32", kv_cache="f32", path=str(model_dir))
        if n_threads:
            torch.set_num_threads(n_threads)
        self.cache = DynamicCache(config)
        self.chat_template = read_chat_template(model_dir)

    @torch.inference_mode()
    def _forward(self, ids):
        tokens = torch.tensor([ids], dtype=torch.long)
        logits = self.model(tokens, self.n_past, self.cache, last_logits_only=True)
        return logits[0, -1].float().numpy().astype(np.float32)

    def _reset(self):
        self.cache = DynamicCache(self.config)

    def kv_cache_bytes(self):
        return self.cache.kv_bytes()
