"""HybridLM: an LFM2-compatible hybrid of gated short convolutions and grouped-query attention.

Parameter names equal Hugging Face `Lfm2ForCausalLM`'s state dict, so real checkpoints load unchanged.

The sequence state lives in a *cache object* passed to `forward`; the model never owns it. That is
the seam exporters use: the reference `DynamicCache` below grows tensors by concatenation, the
ExecuTorch exporter passes one whose state is mutable buffers, the ONNX exporter one whose state
arrives as graph inputs and leaves as graph outputs. A cache implements two methods:

    attend(layer, q, k, v, input_pos) -> [B, n_heads, T, head_dim]
        store k, v ([B, n_kv_heads, T, head_dim], grouped: never expanded) at positions
        input_pos .. input_pos+T-1 and return causal attention of q over everything stored so far.
    conv_window(layer, bx) -> [B, hidden, W]
        prepend the layer's conv state to bx ([B, hidden, T]), keep the newest L_cache-1 columns as
        the new state, and return the window (W >= L_cache-1+T) that the depthwise conv slides over.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import HybridConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(positions, head_dim: int, theta: float):
    """cos, sin [T, head_dim] for integer positions [T] (HF's non-interleaved rotate-half layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def causal_mask(q_len, kv_len, input_pos, device=None):
    """Boolean [q_len, kv_len] mask: query t (at position input_pos+t) sees keys at positions <= its own."""
    q_pos = input_pos + torch.arange(q_len, device=device)[:, None]
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


def grouped_attention(q, k, v, mask=None, causal: bool = False):
    """Attention of q [B, H, T, D] over grouped k, v [B, KV, S, D] (H a multiple of KV); `causal` instead
    of a mask when queries and keys are the same positions (SDPA's fused causal path: half the time of an
    explicit mask in training)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


class MLP(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        h, ff = config.hidden_size, config.ffn_dim
        self.w1 = nn.Linear(h, ff, bias=False)  # gate
        self.w3 = nn.Linear(h, ff, bias=False)  # up
        self.w2 = nn.Linear(ff, h, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (config.num_attention_heads,
                                                        config.num_key_value_heads, config.head_dim)
        self.rope_theta = config.rope_theta
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_layernorm = RMSNorm(self.head_dim, config.norm_eps)
        self.k_layernorm = RMSNorm(self.head_dim, config.norm_eps)

    def forward(self, x, input_pos, cache, rope):
        B, T, _ = x.shape
        q = self.q_layernorm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)
        k = self.k_layernorm(self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope  # QK-norm comes before RoPE in LFM2
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = cache.attend(self.layer_idx, q, k, v, input_pos)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class ShortConv(nn.Module):
    """Double-gated short convolution: B, C, x = in_proj(x); y = out_proj(C * conv(B * x))."""

    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        h, L = config.hidden_size, config.conv_L_cache
        self.conv = nn.Conv1d(h, h, kernel_size=L, groups=h, bias=config.conv_bias, padding=L - 1)
        self.in_proj = nn.Linear(h, 3 * h, bias=config.conv_bias)
        self.out_proj = nn.Linear(h, h, bias=config.conv_bias)

    def forward(self, x, input_pos, cache, rope):
        T = x.shape[1]
        b, c, xx = self.in_proj(x).transpose(-1, -2).chunk(3, dim=-2)
        window = cache.conv_window(self.layer_idx, b * xx)
        # the window already carries the causal history, so the conv runs without padding
        y = F.conv1d(window, self.conv.weight, self.conv.bias, groups=self.conv.groups)[..., -T:]
        return self.out_proj((c * y).transpose(-1, -2))


class DecoderLayer(nn.Module):
    def __init__(self, config: HybridConfig, layer_idx: int):
        super().__init__()
        if config.layer_types[layer_idx] == "full_attention":
            self.self_attn = Attention(config, layer_idx)
        else:
            self.conv = ShortConv(config, layer_idx)
        self.feed_forward = MLP(config)
        self.operator_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.ffn_norm = RMSNorm(config.hidden_size, config.norm_eps)

    @property
    def op(self):
        return self.self_attn if hasattr(self, "self_attn") else self.conv

    def forward(self, x, input_pos, cache, rope):
        h = x + self.op(self.operator_norm(x), input_pos, cache, rope)
        return h + self.feed_forward(self.ffn_norm(h))


class Backbone(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.embedding_norm = RMSNorm(config.hidden_size, config.norm_eps)  # despite the name: the final norm


class HybridLM(nn.Module):
    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden(self, tokens, input_pos, cache):
        """The last layer's output [B, T, hidden] (before the final norm) for tokens [B, T]."""
        T = tokens.shape[1]
        positions = input_pos + torch.arange(T, device=tokens.device)
        rope = rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta)
        x = self.model.embed_tokens(tokens)
        for layer in self.model.layers:
            x = layer(x, input_pos, cache, rope)
        return x

    def forward(self, tokens, input_pos, cache, last_logits_only: bool = False):
        """Logits [B, T, vocab] (or [B, 1, vocab]) for tokens [B, T] at positions input_pos.. ."""
        x = self.hidden(tokens, input_pos, cache)
        if last_logits_only:
            x = x[:, -1:]
        return self.lm_head(self.model.embedding_norm(x))

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> "HybridLM":
        """Random init as transformers does (normal(0, initializer_range)), seedable and reproducible."""
        g = torch.Generator().manual_seed(seed)
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            elif name.endswith("conv.conv.weight"):  # depthwise kernel: fan-in is L_cache
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self


class DynamicCache:
    """The reference cache: fp32 tensors grown by concatenation (like HF's Lfm2HybridConvCache)."""

    def __init__(self, config: HybridConfig, batch_size: int = 1):
        self.config = config
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.conv_states = {i: torch.zeros(batch_size, config.hidden_size, config.conv_L_cache - 1)
                            for i in config.conv_layers}

    def attend(self, layer, q, k, v, input_pos):
        if layer in self.keys:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        T, S = q.shape[2], k.shape[2]
        if T == S:  # no past: the fused causal path
            return grouped_attention(q, k, v, causal=T > 1)
        return grouped_attention(q, k, v, None if T == 1 else causal_mask(T, S, S - T, q.device))

    def conv_window(self, layer, bx):
        window = torch.cat([self.conv_states[layer].to(bx.dtype), bx], dim=-1)
        self.conv_states[layer] = window[..., -(self.config.conv_L_cache - 1):]
        return window

    @property
    def n_past(self) -> int:
        return next(iter(self.keys.values())).shape[2] if self.keys else 0

    def kv_bytes(self) -> int:
        """Bytes held by the attention layers' K and V (the conv states are a small constant)."""
        return sum(t.numel() * t.element_size() for t in [*self.keys.values(), *self.values.values()])
