"""Quality proxies: how good a candidate backbone would be, at a fraction of the cost of training it.

A proxy is an object with one small interface (`Proxy`): `evaluate(config, ctx)` returns (value,
details), `direction` says whether larger is better, `worst(ctx)` is the value of a candidate that learned
nothing (what a candidate outside the budget gets: only feasible candidates are trained), `spec()` is
its identity in a study, `cost` what it takes per candidate. The search takes a proxy object, as Optuna's
`create_study` takes a sampler; the command line names one through the registry (`parse_proxy`), where
a new proxy is one `@register` line.

Registered (benchmarks/RESULTS.md "Proxy validation" measures each against trained models):
  lm[:FILE][:N]   language modelling: the candidate trained N steps (default 200) on text, scored by the
                  loss on held-out text (minimise). Without FILE, the Python standard library's sources
                  (`edge.corpus`, split by module) with the search's tokenizer; with FILE, 90% / 10% of it.
  mqar[:N]        Zoology's multi-query associative recall, data-free, N steps (default 400); accuracy.
  mad[:TASK][:N]  MAD's synthetic tasks (`tasks.MAD_TASKS`), each trained N steps (default 100);
                  accuracy, or with no TASK the mean accuracy of all six.
  params          non-embedding parameters (LiteTransformerSearch's training-free proxy): free, but blind
                  to the operator type (a conv block and an attention block of equal size score the same).
Every proxy is seeded (weights, data, batches): a value is reproducible. Its cost is recorded per
candidate (`quality_s`) apart from the measurement.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edge.errors import EdgeError
from edge.model import DynamicCache, HybridLM

from .tasks import IGNORE, MAD_TASKS, Task, multiquery_ar


@dataclass(frozen=True)
class ProxyContext:
    """What a proxy may need besides the candidate's config."""
    tokenizer_path: Path | None = None   # the search's tokenizer (the lm proxy's text is read with it)
    vocab_size: int = 0
    seed: int = 0
    threads: int = 1
    source: object = None                # the search's CandidateSource, and the candidate whose config is
    candidate: object = None             # scored (proxies that start from inherited weights need both)


class Proxy:
    """One quality proxy. Subclasses set the class attributes and implement `evaluate`."""
    name = ""             # registry name
    direction = "maximize"
    label = ""            # column and axis title
    trains = True         # costs seconds: evaluated only for candidates within the budget
    cost = ""             # per candidate, for --help and the validation table

    def spec(self) -> str:
        return self.name

    def worst(self, ctx: ProxyContext) -> float:
        return 0.0

    def evaluate(self, config, ctx: ProxyContext) -> tuple[float, dict]:
        raise NotImplementedError

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b

    def __repr__(self) -> str:
        return f"<proxy {self.spec()}>"


def score(proxy: Proxy, config, ctx: ProxyContext) -> tuple[float, dict]:
    """(value, details) of `proxy` for `config`; details carry the cost in seconds (`quality_s`)."""
    started = time.perf_counter()
    value, details = proxy.evaluate(config, ctx)
    details["quality_s"] = round(time.perf_counter() - started, 3)
    return value, details


# ---- the registry ---------------------------------------------------------------------------------
_REGISTRY: dict[str, tuple[Callable[[str, str], Proxy], str]] = {}


def register(name: str, usage: str):
    """Decorator: `factory(argument, full_spec) -> Proxy` answers `--quality NAME[:ARGUMENT]`."""
    def add(factory):
        _REGISTRY[name] = (factory, usage)
        return factory
    return add


def parse_proxy(spec: str) -> Proxy:
    name, _, argument = spec.partition(":")
    if name not in _REGISTRY:
        raise EdgeError(f"unknown --quality {spec!r}; use {', '.join(u for _, u in _REGISTRY.values())}")
    return _REGISTRY[name][0](argument, spec)


def proxy_usages() -> list[str]:
    return [usage for _, usage in _REGISTRY.values()]


def _steps(text: str, default: int, spec: str) -> int:
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        raise EdgeError(f"--quality {spec}: {text!r} is not a positive number of training steps")
    return int(text)


# ---- params ---------------------------------------------------------------------------------------
class ParamsProxy(Proxy):
    name, direction, label, trains, cost = "params", "maximize", "non-embedding params (M)", False, "free"

    def evaluate(self, config, ctx):
        return config.n_params(include_embeddings=False) / 1e6, {}


@register("params", "params")
def _params(argument: str, spec: str) -> Proxy:
    if argument:
        raise EdgeError(f"--quality {spec}: params takes no argument")
    return ParamsProxy()


# ---- shared training ------------------------------------------------------------------------------
def _accuracy(logits, labels: np.ndarray) -> float:
    mask = labels != IGNORE
    return float((logits.argmax(-1).numpy()[mask] == labels[mask]).mean())


def _task_config(config, vocab_size: int):
    """The candidate's backbone with a task's vocabulary (ids 0-2 keep their special-token roles)."""
    return config.replace(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)


# ---- MQAR -----------------------------------------------------------------------------------------
class MQARProxy(Proxy):
    name, direction, label = "mqar", "maximize", "MQAR accuracy"
    TASK = dict(vocab_size=256, seq_len=64, num_kv_pairs=8)  # Zoology's smallest setting, smaller vocab
    BATCH, LR = 32, 3e-3

    def __init__(self, steps: int = 400):
        self.steps = steps
        self.cost = f"{steps} training steps of 32 x 64 tokens"

    def spec(self) -> str:
        return f"mqar:{self.steps}"

    def evaluate(self, config, ctx):
        from edge.train import logits_of, train_fresh

        cfg = _task_config(config, self.TASK["vocab_size"])
        train_x, train_y = multiquery_ar(num_examples=self.steps * self.BATCH, seed=ctx.seed, **self.TASK)
        test_x, test_y = multiquery_ar(num_examples=256, seed=ctx.seed + 1_000_003, **self.TASK)
        model, final_loss = train_fresh(cfg, train_x, train_y, self.steps, self.BATCH, self.LR, ctx.seed, ctx.threads)
        accuracy = _accuracy(logits_of(model, test_x), test_y)
        return accuracy, {"mqar": {**self.TASK, "steps": self.steps, "batch": self.BATCH, "lr": self.LR,
                                   "final_train_loss": round(final_loss, 4)}}


@register("mqar", "mqar[:STEPS]")
def _mqar(argument: str, spec: str) -> Proxy:
    return MQARProxy(_steps(argument, 400, spec))


# ---- MAD ------------------------------------------------------------------------------------------
class TaskProxy(Proxy):
    """Accuracy on one MAD task after `steps` steps of training the candidate's backbone on it."""
    direction = "maximize"
    BATCH, LR, TEST_EXAMPLES = 16, 3e-3, 256

    def __init__(self, task: Task, steps: int = 100):
        self.task, self.steps = task, steps
        self.name, self.label = f"mad:{task.name}", f"MAD {task.name} accuracy"
        self.cost = f"{steps} training steps of {self.BATCH} sequences"

    def spec(self) -> str:
        return f"{self.name}:{self.steps}"

    def data(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        n = self.task.train_examples or self.steps * self.BATCH
        train_x, train_y = self.task.generate(n, rng)
        if self.task.train_examples:  # a fixed training set, cycled
            reps = math.ceil(self.steps * self.BATCH / n)
            order = np.concatenate([rng.permutation(n) for _ in range(reps)])[:self.steps * self.BATCH]
            train_x, train_y = train_x[order], train_y[order]
        test_x, test_y = self.task.generate(self.TEST_EXAMPLES, np.random.default_rng(seed + 1_000_003))
        return train_x, train_y, test_x, test_y

    def evaluate(self, config, ctx):
        from edge.train import logits_of, train_fresh

        cfg = _task_config(config, self.task.vocab_size)
        train_x, train_y, test_x, test_y = self.data(ctx.seed)
        model, final_loss = train_fresh(cfg, train_x, train_y, self.steps, self.BATCH, self.LR, ctx.seed, ctx.threads)
        accuracy = _accuracy(logits_of(model, test_x), test_y)
        return accuracy, {self.name: {"steps": self.steps, "final_train_loss": round(final_loss, 4)}}


class CompressionProxy(TaskProxy):
    """MAD's compression: the backbone reads the sequence, and a small MLP decoder must rebuild every
    token from the last position's hidden state plus a position code (mad/model/auto_encoder.py)."""

    def evaluate(self, config, ctx):
        from edge.train import train

        cfg = _task_config(config, self.task.vocab_size)
        train_x, _, test_x, test_y = self.data(ctx.seed)
        model = AutoEncoder(cfg, seq_len=train_x.shape[1]).init_weights(ctx.seed)
        final_loss = train(model, train_x, train_x, self.steps, self.BATCH, self.LR, ctx.seed, ctx.threads)
        with torch.no_grad():
            logits = model(torch.from_numpy(test_x))
        return _accuracy(logits, test_y), {self.name: {"steps": self.steps, "final_train_loss": round(final_loss, 4)}}


class AutoEncoder(HybridLM):
    """The candidate as MAD's compression encoder: its logits at every position come from the last
    position's state plus a sinusoidal position code, through a two-layer MLP decoder."""

    def __init__(self, config, seq_len: int):
        super().__init__(config)
        h = config.hidden_size
        angle = torch.arange(seq_len)[:, None] / (10_000 ** (torch.arange(0, h, 2) / h))
        self.register_buffer("positions", torch.cat([angle.sin(), angle.cos()], dim=-1))
        self.decoder = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.GELU(),
                                     nn.LayerNorm(h), nn.Linear(h, h), nn.GELU())

    def forward(self, tokens, input_pos=0, cache=None, last_logits_only=False):
        state = self.hidden(tokens, 0, cache or DynamicCache(self.config, batch_size=tokens.shape[0]))[:, -1:]
        return self.lm_head(self.model.embedding_norm(self.decoder(state + self.positions[None])))

    def init_weights(self, seed: int = 0) -> "AutoEncoder":
        super().init_weights(seed)
        with torch.no_grad():  # LayerNorms as constructed (HybridLM's init draws every other weight)
            for m in self.decoder:
                if isinstance(m, nn.LayerNorm):
                    m.reset_parameters()
        return self


class MADSuite(Proxy):
    """The mean accuracy of the six MAD tasks, each trained `steps` steps."""
    name, direction, label = "mad", "maximize", "MAD mean accuracy"

    def __init__(self, steps: int = 100):
        self.steps = steps
        self.tasks = [mad_task(name, steps) for name in MAD_TASKS]
        self.cost = f"6 x {steps} training steps"

    def spec(self) -> str:
        return f"mad:{self.steps}"

    def evaluate(self, config, ctx):
        scores = {}
        for task in self.tasks:
            scores[task.task.name], _ = task.evaluate(config, ctx)
        return float(np.mean(list(scores.values()))), {"mad": {"steps": self.steps, "accuracy": scores}}


def mad_task(name: str, steps: int = 100) -> TaskProxy:
    task = MAD_TASKS[name]
    return (CompressionProxy if name == "compression" else TaskProxy)(task, steps)


@register("mad", "mad[:TASK][:STEPS]")
def _mad(argument: str, spec: str) -> Proxy:
    task, _, steps = argument.partition(":")
    if task.isdigit() or not task:
        return MADSuite(_steps(task, 100, spec))
    if task not in MAD_TASKS:
        raise EdgeError(f"--quality {spec}: unknown MAD task {task!r}; choose one of {', '.join(MAD_TASKS)}")
    return mad_task(task, _steps(steps, 100, spec))


# ---- language modelling ---------------------------------------------------------------------------
STDLIB = "python-stdlib"


class LMProxy(Proxy):
    """Held-out loss after `steps` steps of language modelling on real text (STAR's quality signal,
    at a CPU's scale)."""
    name, direction, label = "lm", "minimize", "held-out loss"
    BATCH, LR = 16, 1e-3

    def __init__(self, corpus: str | None = None, steps: int = 200, seq_len: int = 128):
        self.corpus, self.steps, self.seq_len = corpus, steps, seq_len
        self.cost = f"{steps} training steps of {self.BATCH} x {seq_len} tokens"

    def spec(self) -> str:
        where = self.corpus or STDLIB
        return f"lm:{where}:{self.steps}" + (f"@{self.seq_len}" if self.seq_len != 128 else "")

    def worst(self, ctx: ProxyContext) -> float:
        return math.log(ctx.vocab_size) if ctx.vocab_size else float("inf")

    def evaluate(self, config, ctx):
        from edge.train import lm_batches, token_losses, train_fresh

        if ctx.tokenizer_path is None:
            raise EdgeError("the lm proxy needs the search's tokenizer")
        train_ids, heldout_ids = corpus_ids(self.corpus, str(ctx.tokenizer_path))
        need = self.seq_len + 1
        if min(len(train_ids), len(heldout_ids)) < 2 * need:
            raise EdgeError(f"--quality lm:{self.corpus}: the corpus has only {len(train_ids) + len(heldout_ids)} "
                            f"tokens; give at least {20 * need} (a few dozen KB of text)")
        train_x, train_y = lm_batches(train_ids, self.steps, self.BATCH, self.seq_len, ctx.seed)
        n_val = min(64, len(heldout_ids) // need)
        val = heldout_ids[:n_val * need].reshape(n_val, need)
        model, final_loss = train_fresh(config, train_x, train_y, self.steps, self.BATCH, self.LR, ctx.seed,
                                        ctx.threads)
        value = float(token_losses(model, val).mean())
        return value, {"lm": {"corpus": self.corpus or STDLIB, "tokens": int(len(train_ids) + len(heldout_ids)),
                              "steps": self.steps, "batch": self.BATCH, "seq_len": self.seq_len, "lr": self.LR,
                              "final_train_loss": round(final_loss, 4)}}


@lru_cache(maxsize=4)
def corpus_ids(corpus: str | None, tokenizer_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) token ids of a corpus file (90% / 10%) or, for None, of the stdlib's split;
    tokenized once per process."""
    from edge.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_path)

    def ids(text: str) -> np.ndarray:
        return np.array(tokenizer.encode(text).ids, dtype=np.int64)

    if corpus is None:
        from edge.corpus import stdlib_text
        return ids(stdlib_text("train")), ids(stdlib_text("heldout"))
    all_ids = ids(Path(corpus).read_text(errors="replace"))
    split = int(len(all_ids) * 0.9)
    return all_ids[:split], all_ids[split:]


@register("lm", "lm[:FILE][:STEPS]")
def _lm(argument: str, spec: str) -> Proxy:
    path, _, tail = argument.rpartition(":")
    if not tail.isdigit():
        path, tail = argument, ""
    elif not path and Path(tail).is_file():  # `lm:FILE` whose name is all digits
        path, tail = tail, ""
    if path and not Path(path).is_file():
        raise EdgeError(f"--quality lm:{path}: no such file; give a text corpus, e.g. lm:corpus.txt, "
                        "or plain `lm` for the Python standard library's sources")
    return LMProxy(str(Path(path).resolve()) if path else None, _steps(tail, 200, spec))
