"""The residual stream of a HybridLM, layer by layer: what derivation measures and distills against.

`HybridLM.forward` runs all layers at once; here the same modules run one at a time so that a caller can
skip layers, start from a stored state, restrict an attention layer to a local window (what a short conv
could see), or keep the state at every layer boundary (the blockwise stage's inputs and targets).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import DynamicCache, HybridLM, causal_mask, grouped_attention, rope_cos_sin


class WindowedCache(DynamicCache):
    """DynamicCache whose attention in the `windows` layers sees only the last w positions (itself
    included): a layer that loses little under w = L_cache mostly reads what a short conv reads."""

    def __init__(self, config, batch_size: int = 1, windows: dict[int, int] | None = None):
        super().__init__(config, batch_size)
        self.windows = windows or {}

    def attend(self, layer, q, k, v, input_pos):
        if layer not in self.windows:
            return super().attend(layer, q, k, v, input_pos)
        T, S = q.shape[2], k.shape[2]  # one prefill from position 0: no stored keys
        band = torch.arange(T)[:, None] - torch.arange(S)[None, :] < self.windows[layer]
        return grouped_attention(q, k, v, causal_mask(T, S, 0) & band)


def rope_for(model: HybridLM, T: int):
    return rope_cos_sin(torch.arange(T), model.config.head_dim, model.config.rope_theta)


def run_layers(model: HybridLM, x: torch.Tensor, layers, *, skip=(), windows=None, states: list | None = None):
    """Run `x` ([B, T, hidden], the residual stream at the input of layers[0]) through `layers` (indices),
    from position 0, skipping `skip`; the state after each is appended to `states` when given."""
    cache = WindowedCache(model.config, x.shape[0], windows)
    rope = rope_for(model, x.shape[1])
    for i in layers:
        if i not in skip:
            x = model.model.layers[i](x, 0, cache, rope)
        if states is not None:
            states.append(x)
    return x


def head(model: HybridLM, x: torch.Tensor) -> torch.Tensor:
    """Logits of the final residual stream."""
    return model.lm_head(model.model.embedding_norm(x))


def residual_states(model: HybridLM, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The residual stream at every layer boundary: [embedding, after layer 0, ..., after the last]."""
    states = [model.model.embed_tokens(tokens)]
    run_layers(model, states[0], range(len(model.model.layers)), states=states)
    return states


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) at every position [..., vocab] -> [...], in nats."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1)
