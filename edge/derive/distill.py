"""Distillation on a CPU: a blockwise stage, an end-to-end stage on logits, and the held-out score.

- Stage 1 (`blockwise`, cheap; LoLCATs' attention transfer, Minitron's per-block view): the parent runs
  once per batch and its residual stream at every layer boundary is the data; each child block that
  differs from its parent layers is trained to map the parent's state at its segment's start to the state
  at its end (edge.derive.child.ChildSpec.segments), the loss its error relative to what the parent
  segment adds to the stream. Blocks see the parent's inputs, never each other's, so they train at once.
- Stage 2 (`end_to_end`): KL(parent || child) of the next-token distributions on train windows.
- `score`: on held-out windows, the child's loss, its KL to the parent and the agreement of their
  greedy (argmax) next tokens, beside the parent's own loss.

Only one batch of activations exists at a time (the parent's states are recomputed per batch, never
stored for the corpus). Both stages checkpoint their whole state (weights, optimizer, schedule, step,
tokens, seconds) atomically every `save_every` steps and at the end, and resume from it: a killed run
restarts where it stopped and sees the same batches (edge.derive.corpus.Corpus.batch).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import EdgeError
from ..files import atomic_path
from ..model import DynamicCache, HybridLM
from .child import ChildSpec
from .corpus import Corpus
from .parent import Parent
from .stream import kl_per_token, rope_for


@dataclass
class StageResult:
    stage: str
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    history: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss since the last entry)

    def to_dict(self) -> dict:
        return {"stage": self.stage, "steps": self.steps, "tokens": self.tokens, "seconds": round(self.seconds, 1),
                "final_loss": round(self.final_loss, 5), "history": self.history}


def lr_factor(progress: float, warmup: float = 0.05, floor: float = 0.1) -> float:
    """Linear warm-up over the first 5% of the run, then cosine decay to 10% of the peak."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def _train_only(child, params: list) -> list:
    """Freeze every parameter of `child` but `params` (returned)."""
    for p in child.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


class _Run:
    """The resumable loop both stages share: optimizer, schedule, state file, progress bar, deadline."""

    def __init__(self, name: str, model: HybridLM, params, steps: int, lr: float, state: Path | None,
                 identity: str, progress: bool, deadline_s: float | None, tokens_per_step: int):
        self.name, self.model, self.steps, self.state, self.identity = name, model, steps, state, identity
        self.params = [p for p in params if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        self.lr = lr
        self.step, self.tokens, self.seconds, self.history = 0, 0, 0.0, []
        self.tokens_per_step = tokens_per_step
        self.deadline_s = deadline_s
        self._window = []
        if state is not None and state.exists():
            self._resume()
        from tqdm import tqdm
        self.bar = tqdm(total=steps, initial=self.step, desc=name, unit="step", disable=not progress,
                        dynamic_ncols=True)

    def _resume(self):
        saved = torch.load(self.state, map_location="cpu", weights_only=True)  # tensors and plain data only
        if saved.get("identity") != self.identity or saved.get("stage") != self.name:
            raise EdgeError(f"{self.state} holds another run ({saved.get('stage')} of another child or settings); "
                            "remove it or give another --work directory")
        self.model.load_state_dict(saved["model"])
        self.opt.load_state_dict(saved["optimizer"])
        self.step, self.tokens, self.seconds = saved["step"], saved["tokens"], saved["seconds"]
        self.history = [tuple(h) for h in saved["history"]]

    def save(self):
        if self.state is None:
            return
        with atomic_path(self.state) as tmp:
            torch.save({"identity": self.identity, "stage": self.name, "step": self.step, "tokens": self.tokens,
                        "seconds": self.seconds, "history": self.history, "model": self.model.state_dict(),
                        "optimizer": self.opt.state_dict()}, tmp)

    def progress(self) -> float:
        """How far the run is: by steps, or by time when a deadline comes first (the schedule follows it)."""
        done = self.step / max(1, self.steps)
        return max(done, self.seconds / self.deadline_s) if self.deadline_s else done

    def done(self) -> bool:
        return self.progress() >= 1.0

    def update(self, loss: torch.Tensor, started: float, save_every: int, log_every: int = 10):
        for group in self.opt.param_groups:
            group["lr"] = self.lr * lr_factor(self.progress())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.step += 1
        self.tokens += self.tokens_per_step
        self.seconds += time.perf_counter() - started
        value = float(loss.detach())
        self._window.append(value)
        if self.step % log_every == 0 or self.done():
            self.history.append((self.step, round(sum(self._window) / len(self._window), 5)))
            self._window = []
        self.bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{self.tokens / max(self.seconds, 1e-9):.0f}")
        self.bar.update()
        if self.step % save_every == 0 or self.done():
            self.save()
        return value

    def result(self, final: float) -> StageResult:
        self.bar.close()
        return StageResult(self.name, self.step, self.tokens, self.seconds, final, self.history)


@dataclass(frozen=True)
class Unit:
    """One thing the blockwise stage trains: a child layer's mixer (conv or attention) against the parent
    layer's mixer output, its FFN against the parent FFN's output plus what the dropped layers after it
    added, or (when layers before it were dropped) the whole block against the parent segment."""
    child_layer: int
    kind: str        # mixer | ffn | block
    parent_layer: int
    start: int       # the parent segment [start, end) this child layer stands for
    end: int


def stage1_units(parent: Parent, spec: ChildSpec) -> list[Unit]:
    """The units whose function differs from the parent's: converted or re-normed mixers, pruned FFNs, FFNs
    that absorb dropped layers. An LFM2 parent's unchanged layers are the parent's exactly: no unit."""
    pc = parent.config
    units = []
    for ci, ((start, end), pi) in enumerate(zip(spec.segments(pc.num_hidden_layers), spec.kept)):
        if start < pi:
            units.append(Unit(ci, "block", pi, start, end))
            continue
        attention = pc.layer_types[pi] == "full_attention"
        if attention and (spec.layout[pi] == "c" or not parent.qk_norm
                          or (spec.kv_heads or pc.num_key_value_heads) != pc.num_key_value_heads):
            units.append(Unit(ci, "mixer", pi, start, end))
        if end - start > 1 or (spec.ffn or pc.ffn_dim) != pc.ffn_dim:
            units.append(Unit(ci, "ffn", pi, start, end))
    return units


def _unit_module(child: HybridLM, unit: Unit):
    layer = child.model.layers[unit.child_layer]
    return {"mixer": layer.op, "ffn": layer.feed_forward, "block": layer}[unit.kind]


@torch.no_grad()
def trace(model: HybridLM, tokens: torch.Tensor, layers: set[int]) -> dict:
    """The parent's residual stream at every layer boundary ("x": [embedding, after layer 0, ...]) and, for
    `layers`, each one's normed mixer input, mixer output, normed FFN input and FFN output. The loop is
    DecoderLayer.forward's, unrolled to keep what it computes."""
    x = model.model.embed_tokens(tokens)
    cache, rope = DynamicCache(model.config, tokens.shape[0]), rope_for(model, tokens.shape[1])
    out = {"x": [x], "mixer_in": {}, "mixer_out": {}, "ffn_in": {}, "ffn_out": {}}
    for i, layer in enumerate(model.model.layers):
        a = layer.operator_norm(x)
        o = layer.op(a, 0, cache, rope)
        h = x + o
        f = layer.ffn_norm(h)
        m = layer.feed_forward(f)
        x = h + m
        out["x"].append(x)
        if i in layers:
            out["mixer_in"][i], out["mixer_out"][i], out["ffn_in"][i], out["ffn_out"][i] = a, o, f, m
    return out


def blockwise(child: HybridLM, parent: Parent, spec: ChildSpec, corpus: Corpus, *, steps: int, batch: int = 4,
              seq_len: int = 256, lr: float = 1e-3, seed: int = 0, state: str | Path | None = None,
              save_every: int = 50, progress: bool = True, deadline_s: float | None = None,
              identity: str = "") -> StageResult:
    """Stage 1: train each unit (stage1_units) to reproduce its parent counterpart on the parent's own
    activations; the loss is each unit's squared error relative to its target's power, averaged."""
    units = stage1_units(parent, spec)
    params = _train_only(child, [p for u in units for p in _unit_module(child, u).parameters()])
    run = _Run("blockwise", child, params, steps, lr, Path(state) if state else None, identity or "blockwise",
               progress, deadline_s, batch * seq_len)
    child.train()
    final = float("nan")
    rope = rope_for(child, seq_len)
    needed = {u.parent_layer for u in units}
    try:
        while units and not run.done():
            started = time.perf_counter()
            t = trace(parent.model, corpus.batch(run.step, batch, seq_len, seed)[:, :-1], needed)
            xs, losses = t["x"], []
            for u in units:
                module, p = _unit_module(child, u), u.parent_layer
                if u.kind == "mixer":
                    y, target = module(t["mixer_in"][p], 0, DynamicCache(child.config, batch), rope), t["mixer_out"][p]
                elif u.kind == "ffn":  # the dropped layers' contributions land on the FFN before them
                    y, target = module(t["ffn_in"][p]), t["ffn_out"][p] + xs[u.end] - xs[p + 1]
                else:
                    x = xs[u.start]
                    y, target = module(x, 0, DynamicCache(child.config, batch), rope) - x, xs[u.end] - x
                losses.append((y - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12))
            final = run.update(torch.stack(losses).mean(), started, save_every)
    finally:
        child.eval()
        for p in child.parameters():
            p.requires_grad_(True)
    return run.result(final)


def end_to_end(child: HybridLM, parent: Parent, corpus: Corpus, *, steps: int, batch: int = 4, seq_len: int = 256,
               lr: float = 3e-4, seed: int = 1, state: str | Path | None = None, save_every: int = 50,
               progress: bool = True, deadline_s: float | None = None, identity: str = "",
               train_embeddings: bool = False) -> StageResult:
    """Stage 2: KL(parent || child) of the next-token distributions on train windows. The embedding (and
    the tied head) stays the parent's unless `train_embeddings` (a random-init child needs it trained)."""
    params = _train_only(child, [p for n, p in child.named_parameters()
                                 if train_embeddings or "embed_tokens" not in n and "lm_head" not in n])
    run = _Run("end_to_end", child, params, steps, lr, Path(state) if state else None, identity or "end_to_end",
               progress, deadline_s, batch * seq_len)
    child.train()
    final = float("nan")
    try:
        while not run.done():
            started = time.perf_counter()
            tokens = corpus.batch(run.step, batch, seq_len, seed)[:, :-1]
            with torch.no_grad():
                target = parent.model(tokens, 0, DynamicCache(parent.config, batch))
            student = child(tokens, 0, DynamicCache(child.config, batch))
            final = run.update(kl_per_token(target, student).mean(), started, save_every)
    finally:
        child.eval()
        for p in child.parameters():
            p.requires_grad_(True)
    return run.result(final)


@torch.no_grad()
def score(child: HybridLM, parent: Parent, windows: torch.Tensor, batch: int = 4) -> dict:
    """Held-out quality of `child` on token windows [N, T+1]: mean next-token loss (nats), KL to the parent
    (nats/token), greedy agreement (fraction of positions where both argmaxes agree), and the parent's loss."""
    sums = {"loss": 0.0, "kl": 0.0, "agree": 0.0, "parent_loss": 0.0}
    n = 0
    for chunk in windows.split(batch):
        x, y = chunk[:, :-1], chunk[:, 1:]
        teacher = parent.model(x, 0, DynamicCache(parent.config, x.shape[0]))
        student = child(x, 0, DynamicCache(child.config, x.shape[0]))
        count = y.numel()
        sums["loss"] += float(F.cross_entropy(student.flatten(0, 1), y.flatten(), reduction="sum"))
        sums["parent_loss"] += float(F.cross_entropy(teacher.flatten(0, 1), y.flatten(), reduction="sum"))
        sums["kl"] += float(kl_per_token(teacher, student).sum())
        sums["agree"] += float((teacher.argmax(-1) == student.argmax(-1)).sum())
        n += count
    return {"loss": sums["loss"] / n, "kl": sums["kl"] / n, "agreement": sums["agree"] / n,
            "parent_loss": sums["parent_loss"] / n, "tokens": n}
