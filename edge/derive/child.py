"""Children: LFM2 hybrids derived from a parent, every move keeping the inherited weights it can.

A `ChildSpec` says what becomes of each parent layer (its `layout`: one character per parent layer,
`a` stays attention, `c` becomes a gated short-conv block, `-` is dropped), the FFN width, the KV heads,
and how new conv blocks and new QK-norms start. `measure_importance` measures, once per parent on
calibration text, what the choices are made from (docs/design.md §15):
- depth: the KL of the parent's next-token distribution to itself with one layer skipped (Minitron's
  loss-when-removed, on logits), and block influence (1 - cos(in, out), ShortGPT);
- attention: the KL when a layer's attention sees only its last L_cache positions, what a short conv
  sees: a layer that loses little there is the one to convert;
- width: each FFN channel's mean |silu(w1 x) * w3 x| and each KV head's output norm (Minitron);
- the QK-norm a Llama parent lacks: the per-channel scale that best keeps q and k (least squares).
`plan_child` turns counts (attention blocks to keep, layers to drop, widths) into a spec by those
measurements; `build_child` builds the HybridLM.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..config import HybridConfig
from ..errors import EdgeError
from ..files import atomic_path
from ..model import DynamicCache, HybridLM
from .parent import Parent
from .stream import head, kl_per_token, residual_states, rope_for, run_layers

CONV_INITS = ("attention", "random")
QK_NORM_INITS = ("calibrated", "ones")
KV_MERGES = ("mean", "select")
ATTENTION_CHOICES = ("drop", "local", "even")  # how plan_child picks the attention blocks that stay


@dataclass(frozen=True)
class ChildSpec:
    layout: str                    # per parent layer: a (attention), c (short conv), - (dropped)
    ffn: int | None = None         # FFN width (None: the parent's)
    kv_heads: int | None = None    # KV heads of the attention blocks (None: the parent's)
    conv_init: str = "attention"   # attention: B, C, x, out from K, Q, V, O; random: fresh weights
    qk_norm_init: str = "calibrated"  # for Llama parents: calibrated per-channel scale, or ones
    kv_merge: str = "mean"         # fewer KV heads: mean-pool each group (GQA paper) or keep its strongest

    def check(self, parent_config: HybridConfig) -> None:
        c = parent_config
        if len(self.layout) != c.num_hidden_layers or set(self.layout) - set("ac-"):
            raise EdgeError(f"layout {self.layout!r} must have one of a/c/- for each of the parent's "
                            f"{c.num_hidden_layers} layers (a: attention, c: short conv, -: dropped)")
        for i, (kind, ch) in enumerate(zip(c.layer_types, self.layout)):
            if kind == "conv" and ch == "a":
                raise EdgeError(f"layout: parent layer {i} is a conv block and cannot become attention; use c or -")
        if "a" not in self.layout or "c" not in self.layout:
            raise EdgeError(f"layout {self.layout!r} needs at least one attention (a) and one conv (c) block: "
                            "llama.cpp's lfm2 runs only hybrids")
        if self.ffn is not None and not 0 < self.ffn <= c.ffn_dim:
            raise EdgeError(f"ffn {self.ffn} must be in 1..{c.ffn_dim} (the parent's FFN width)")
        kv = self.kv_heads
        if kv is not None and not (0 < kv <= c.num_key_value_heads and c.num_key_value_heads % kv == 0):
            raise EdgeError(f"kv_heads {kv} must divide the parent's {c.num_key_value_heads} KV heads")
        for name, value, allowed in (("conv_init", self.conv_init, CONV_INITS),
                                     ("qk_norm_init", self.qk_norm_init, QK_NORM_INITS),
                                     ("kv_merge", self.kv_merge, KV_MERGES)):
            if value not in allowed:
                raise EdgeError(f"{name} {value!r} is not one of {', '.join(allowed)}")

    @property
    def kept(self) -> list[int]:
        """The parent layers the child keeps, in order (child layer i comes from kept[i])."""
        return [i for i, ch in enumerate(self.layout) if ch != "-"]

    def segments(self, n_layers: int) -> list[tuple[int, int]]:
        """Child layer i stands for parent layers [start, end): its own and the dropped ones after it (and,
        for the first, any dropped before it); the blockwise stage maps state[start] to state[end]."""
        kept = self.kept
        starts = [0] + kept[1:]
        return list(zip(starts, starts[1:] + [n_layers]))

    def to_dict(self) -> dict:
        return asdict(self)

    def identity(self, parent_identity: str) -> str:
        """A child's identity: its parent's and its own (two children of one shape from two parents differ)."""
        text = json.dumps({"parent": parent_identity, **self.to_dict()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


# ---- importance ----------------------------------------------------------------------------------------
@dataclass
class Importance:
    drop_kl: list[float]             # per parent layer: KL (nats/token) with that layer skipped
    block_influence: list[float]     # per parent layer: 1 - cos(input, output)
    local_kl: list[float]            # per parent layer: KL with its attention limited to L_cache (nan: conv)
    ffn: list[list[float]]           # per parent layer, per FFN channel: mean |activation|
    kv: list[list[float]]            # per parent layer, per KV head: mean output norm of its query heads
    qk_scale: dict[str, list[list[float]]] = field(default_factory=dict)  # "q"/"k" -> per layer, per channel
    window: int = 3
    calibration_tokens: int = 0
    parent_identity: str = ""

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> "Importance":
        return cls(**json.loads(Path(path).read_text()))


@torch.no_grad()
def measure_importance(parent: Parent, calibration: torch.Tensor, window: int | None = None,
                       progress: bool = True) -> Importance:
    """Measure every importance on `calibration` token windows [N, T] (a few thousand tokens suffice)."""
    from tqdm import tqdm

    model, config = parent.model, parent.config
    window = window or config.conv_L_cache
    n = config.num_hidden_layers
    ffn_sum = [torch.zeros(config.ffn_dim) for _ in range(n)]
    kv_sum = [torch.zeros(config.num_key_value_heads) for _ in range(n)]
    qk = {kind: [[torch.zeros(config.head_dim), torch.zeros(config.head_dim)] for _ in range(n)] for kind in "qk"}
    hooks, recording = [], [False]  # statistics come from the unmodified parent's passes only
    group = config.num_attention_heads // config.num_key_value_heads

    def on_ffn(i):
        def hook(module, args):
            if recording[0]:
                ffn_sum[i].add_(args[0].abs().flatten(0, -2).mean(0))
        return hook

    def on_attn_out(i):
        def hook(module, args):
            if recording[0]:
                y = args[0].unflatten(-1, (config.num_attention_heads, config.head_dim))
                kv_sum[i].add_(y.norm(dim=-1).flatten(0, -2).mean(0).view(-1, group).sum(-1))
        return hook

    def on_proj(i, kind, heads):
        def hook(module, args, out):  # least squares of q_d ~ w_d * rmsnorm(q)_d over tokens and heads
            if not recording[0]:
                return
            y = out.unflatten(-1, (heads, config.head_dim)).flatten(0, -2)
            normed = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + config.norm_eps)
            qk[kind][i][0].add_((y * normed).sum(0))
            qk[kind][i][1].add_(normed.pow(2).sum(0))
        return hook

    for i, layer in enumerate(model.model.layers):
        hooks.append(layer.feed_forward.w2.register_forward_pre_hook(on_ffn(i)))
        if hasattr(layer, "self_attn"):
            hooks.append(layer.self_attn.out_proj.register_forward_pre_hook(on_attn_out(i)))
            hooks.append(layer.self_attn.q_proj.register_forward_hook(on_proj(i, "q", config.num_attention_heads)))
            hooks.append(layer.self_attn.k_proj.register_forward_hook(on_proj(i, "k", config.num_key_value_heads)))
    attention = set(config.attention_layers)
    drop_kl, influence = [0.0] * n, [0.0] * n
    local_kl = [0.0 if i in attention else float("nan") for i in range(n)]
    batches = list(calibration.split(4))
    bar = tqdm(total=len(batches) * (n + len(attention) + 1), desc="importance", unit="pass", disable=not progress)
    try:
        for tokens in batches:
            recording[0] = True
            states = residual_states(model, tokens)
            recording[0] = False
            bar.update()
            logits = head(model, states[-1])
            for i in range(n):
                x, y = states[i], states[i + 1]
                influence[i] += float(1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()) / len(batches)
                skipped = run_layers(model, x, range(i, n), skip={i})
                drop_kl[i] += float(kl_per_token(logits, head(model, skipped)).mean()) / len(batches)
                bar.update()
                if i in attention:
                    local = run_layers(model, x, range(i, n), windows={i: window})
                    local_kl[i] += float(kl_per_token(logits, head(model, local)).mean()) / len(batches)
                    bar.update()
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    count = len(batches)
    return Importance(
        drop_kl=drop_kl, block_influence=influence, local_kl=local_kl,
        ffn=[(s / count).tolist() for s in ffn_sum], kv=[(s / count).tolist() for s in kv_sum],
        qk_scale={kind: [(num / den.clamp_min(1e-12)).tolist() for num, den in qk[kind]] for kind in "qk"},
        window=window, calibration_tokens=int(calibration.numel()), parent_identity=parent.identity)


# ---- planning ------------------------------------------------------------------------------------------
def plan_child(parent: Parent, importance: Importance, *, attention: int, drop: int = 0, ffn: int | None = None,
               kv_heads: int | None = None, choose: str = "drop", **options) -> ChildSpec:
    """A spec with `attention` attention blocks and `drop` fewer layers, chosen by the measurements:
    the `drop` layers whose removal costs least (drop_kl) go; of the parent's remaining attention layers,
    `attention` stay, picked by `choose`: drop (the largest drop_kl; the best measured, docs/design.md
    §15), local (the largest loss under a local window), or even (evenly spaced, LFM2's pattern).
    `options` are ChildSpec's other fields."""
    c = parent.config
    n = c.num_hidden_layers
    if choose not in ATTENTION_CHOICES:
        raise EdgeError(f"choose {choose!r} is not one of {', '.join(ATTENTION_CHOICES)}")
    if not 0 <= drop <= n - 2:
        raise EdgeError(f"drop {drop} must leave at least 2 of the parent's {n} layers")
    dropped = set(sorted(range(n), key=lambda i: importance.drop_kl[i])[:drop])
    candidates = [i for i in c.attention_layers if i not in dropped]
    if not 1 <= attention <= len(candidates) or attention == n - drop:
        raise EdgeError(f"attention {attention} must be between 1 and {len(candidates)} and leave a conv block "
                        f"(the parent keeps {len(candidates)} attention layers after dropping {drop})")
    if choose == "even":  # the layer nearest each of `attention` evenly spaced points, last layer included
        keep, pool = [], list(candidates)
        for k in range(attention):
            target = (k + 1) * len(candidates) / attention - 1
            best = min(pool, key=lambda i: abs(candidates.index(i) - target))
            keep.append(best)
            pool.remove(best)
    else:
        score = importance.local_kl if choose == "local" else importance.drop_kl
        keep = sorted(candidates, key=lambda i: -score[i])[:attention]
    layout = "".join("-" if i in dropped else "a" if i in keep else "c" for i in range(n))
    spec = ChildSpec(layout=layout, ffn=ffn, kv_heads=kv_heads, **options)
    spec.check(c)
    return spec


# ---- building --------------------------------------------------------------------------------------
def child_config(parent: Parent, spec: ChildSpec) -> HybridConfig:
    c = parent.config
    kept = spec.kept
    return c.replace(
        num_hidden_layers=len(kept), layer_types=["full_attention" if spec.layout[i] == "a" else "conv" for i in kept],
        intermediate_size=spec.ffn or c.ffn_dim, block_auto_adjust_ff_dim=False,
        num_key_value_heads=spec.kv_heads or c.num_key_value_heads)


def needs_importance(parent: Parent, spec: ChildSpec) -> bool:
    """Whether building `spec` reads measurements: it prunes, or calibrates the QK-norm a Llama block gains."""
    pc = parent.config
    return bool((spec.ffn or pc.ffn_dim) < pc.ffn_dim or (spec.kv_heads or pc.num_key_value_heads) < pc.num_key_value_heads
                or (not parent.qk_norm and spec.qk_norm_init == "calibrated" and "a" in spec.layout))


@torch.no_grad()
def build_child(parent: Parent, spec: ChildSpec, importance: Importance | None = None,
                calibration: torch.Tensor | None = None, seed: int = 0) -> HybridLM:
    """The child's HybridLM with every weight it can inherit from `parent`. Pruning (ffn, kv_heads) needs
    `importance`; conv blocks initialised from attention are rescaled on `calibration` tokens [N, T] so that
    their output has the attention output's RMS (without calibration, they are not rescaled)."""
    spec.check(parent.config)
    pc = parent.config
    config = child_config(parent, spec)
    if needs_importance(parent, spec) and importance is None:
        raise EdgeError("this spec prunes or calibrates: build_child needs the parent's measured importance")
    child = HybridLM(config).init_weights(seed)
    pm, cm = parent.model.model, child.model
    cm.embed_tokens.weight.copy_(pm.embed_tokens.weight)
    cm.embedding_norm.weight.copy_(pm.embedding_norm.weight)
    if not config.tie_word_embeddings:
        child.lm_head.weight.copy_(parent.model.lm_head.weight)
    converted = any(ch == "c" and t == "full_attention" for ch, t in zip(spec.layout, pc.layer_types))
    rescale = calibration is not None and converted and spec.conv_init == "attention"
    states = residual_states(parent.model, calibration) if rescale else None
    for ci, pi in enumerate(spec.kept):
        src, dst = pm.layers[pi], cm.layers[ci]
        dst.operator_norm.weight.copy_(src.operator_norm.weight)
        dst.ffn_norm.weight.copy_(src.ffn_norm.weight)
        _copy_ffn(src.feed_forward, dst.feed_forward, importance.ffn[pi] if importance else None)
        if pc.layer_types[pi] == "conv":
            dst.conv.load_state_dict(src.conv.state_dict())
        elif spec.layout[pi] == "a":
            _copy_attention(parent, spec, importance, pi, src.self_attn, dst.self_attn)
        elif spec.conv_init == "attention":
            x = src.operator_norm(states[pi]) if states is not None else None
            _conv_from_attention(parent, src.self_attn, dst.conv, x)
    return child.eval()


def _keep(scores, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in their original order (keeping all keeps the order: exact)."""
    return torch.tensor(scores).topk(k).indices.sort().values


def _copy_ffn(src, dst, scores) -> None:
    width = dst.w1.weight.shape[0]
    idx = torch.arange(width) if width == src.w1.weight.shape[0] else _keep(scores, width)
    dst.w1.weight.copy_(src.w1.weight[idx])
    dst.w3.weight.copy_(src.w3.weight[idx])
    dst.w2.weight.copy_(src.w2.weight[:, idx])


def _kv_rows(w: torch.Tensor, old: int, new: int, head_dim: int, scores, merge: str) -> torch.Tensor:
    """K or V projection rows for `new` KV heads from `old`: each new head stands for old // new
    consecutive old ones (so query head h keeps reading the group it read), mean-pooled or the strongest."""
    heads = w.view(old, head_dim, -1)
    g = old // new
    if merge == "mean":
        return heads.view(new, g, head_dim, -1).mean(1).reshape(new * head_dim, -1)
    best = torch.tensor(scores).view(new, g).argmax(1) + torch.arange(new) * g
    return heads[best].reshape(new * head_dim, -1)


def _copy_attention(parent: Parent, spec: ChildSpec, importance, pi: int, src, dst) -> None:
    pc = parent.config
    old, new, d = pc.num_key_value_heads, dst.n_kv_heads, pc.head_dim
    dst.q_proj.weight.copy_(src.q_proj.weight)
    dst.out_proj.weight.copy_(src.out_proj.weight)
    for name in ("k_proj", "v_proj"):
        w = getattr(src, name).weight
        if new != old:
            w = _kv_rows(w, old, new, d, importance.kv[pi], spec.kv_merge)
        getattr(dst, name).weight.copy_(w)
    if parent.qk_norm:
        dst.q_layernorm.weight.copy_(src.q_layernorm.weight)
        dst.k_layernorm.weight.copy_(src.k_layernorm.weight)
    elif spec.qk_norm_init == "calibrated":  # the Llama block had no QK-norm: a scale that keeps q and k
        dst.q_layernorm.weight.copy_(torch.tensor(importance.qk_scale["q"][pi]))
        k_scale = torch.tensor(importance.qk_scale["k"][pi])
        dst.k_layernorm.weight.copy_(k_scale)
    else:
        dst.q_layernorm.weight.fill_(1.0)
        dst.k_layernorm.weight.fill_(1.0)


def _expand_kv(w: torch.Tensor, heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """K/V rows repeated for every query head of their group: [kv*d, h] -> [heads*d, h]."""
    return w.view(kv_heads, 1, head_dim, -1).expand(kv_heads, heads // kv_heads, head_dim, -1).reshape(heads * head_dim, -1)


def _conv_from_attention(parent: Parent, attn, conv, x: torch.Tensor | None) -> None:
    """Mamba-in-the-Llama's mapping onto a short conv: C <- Q, B <- K, x <- V (K and V repeated per query
    head: heads x head_dim = hidden), out <- O, kernel = the current token only. B and C are scaled to
    unit RMS and out to the attention output's RMS on the calibration inputs `x` (normed), if given."""
    c = parent.config
    h = c.hidden_size
    q = attn.q_proj.weight
    k = _expand_kv(attn.k_proj.weight, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    v = _expand_kv(attn.v_proj.weight, c.num_attention_heads, c.num_key_value_heads, c.head_dim)
    b_w, c_w, o_w = k.clone(), q.clone(), attn.out_proj.weight.clone()
    kernel = torch.zeros_like(conv.conv.weight)
    kernel[..., -1] = 1.0
    if x is not None:
        b_w /= (x @ b_w.T).pow(2).mean().sqrt().clamp_min(1e-6)
        c_w /= (x @ c_w.T).pow(2).mean().sqrt().clamp_min(1e-6)
        mixed = (x @ c_w.T) * (x @ b_w.T) * (x @ v.T)
        target = attn(x, 0, DynamicCache(c, x.shape[0]), rope_for(parent.model, x.shape[1]))
        o_w *= target.pow(2).mean().sqrt() / (mixed @ o_w.T).pow(2).mean().sqrt().clamp_min(1e-6)
    conv.in_proj.weight.copy_(torch.cat([b_w, c_w, v]))  # chunk order of ShortConv: B, C, x
    conv.out_proj.weight.copy_(o_w)
    conv.conv.weight.copy_(kernel)
    if conv.conv.bias is not None:
        conv.conv.bias.zero_()
        conv.in_proj.bias.zero_()
        conv.out_proj.bias.zero_()
    assert conv.in_proj.weight.shape == (3 * h, h)

