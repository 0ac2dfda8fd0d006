"""`edge search --parent PATH`: the candidates are children of a pretrained parent (edge/derive), scored
by how well they keep the parent after the cheap distillation stage (docs/design.md §8, §15).

- `ParentChildren` (a CandidateSource): a trial picks the derive moves - how many attention blocks stay
  (chosen by measured importance, `plan_child`'s `drop` rule), how many layers are dropped, the FFN width
  and the KV heads; the other attention layers become gated short convs initialised from their
  projections. The measured checkpoint is the child with its inherited weights (latency and memory do
  not depend on the values, so measuring needs no training); `--export-best` derives the winner in full
  (both distillation stages, resumable) and ships it trained.
- `distill[:STEPS]` (a quality proxy, the default with --parent): the child after STEPS steps of the
  blockwise stage, scored by its KL to the parent on held-out text (minimise; loss and greedy
  agreement are recorded beside it).

The parent is loaded once per search process; its importance and the tokenized corpus are cached in
OUT/derive, keyed by the parent's identity and the tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from edge.derive import ChildSpec, Corpus, blockwise, build, child_config, importance_for, load_parent, plan_child, \
    save_child, score
from edge.derive.run import derive
from edge.errors import EdgeError
from edge.files import atomic_path

from .candidates import CandidateSource
from .proxies import Proxy, ProxyContext, _steps, register

FFN_SHARES = (1.0, 0.75, 0.5)  # FFN widths a child may keep, rounded to 32 (a 4-bit weight group)
BATCH, SEQ_LEN = 2, 128        # the proxy's stage-1 batches (a trial's cost: STEPS of them)
EVAL_WINDOWS = 8               # held-out windows of SEQ_LEN tokens the proxy scores on


@dataclass(frozen=True)
class Child:
    """A candidate of ParentChildren: a ChildSpec and the config it makes of the parent."""
    spec: ChildSpec
    config: object  # HybridConfig

    def to_config(self):
        return self.config

    def to_dict(self) -> dict:
        return self.spec.to_dict()

    def describe(self) -> str:
        c = self.config
        return (f"{self.spec.layout} L{c.num_hidden_layers} attn{len(c.attention_layers)} ffn{c.ffn_dim} "
                f"kv{c.num_key_value_heads}")


class ParentChildren(CandidateSource):
    export_note = "derived from the parent and trained (both distillation stages)"

    def __init__(self, parent_path: str | Path, out: Path, corpus: str | Path | None = None,
                 export_steps: tuple[int, int] = (200, 200), progress: bool = False):
        self.parent = load_parent(parent_path)
        self.work = Path(out) / "derive"
        self.work.mkdir(parents=True, exist_ok=True)
        self.tokenizer_path = Path(out) / "tokenizer.json"  # the parent's: every child keeps it
        with atomic_path(self.tokenizer_path) as tmp:
            Path(tmp).write_text(self.parent.tokenizer_json, encoding="utf-8")
        self.vocab_size = self.parent.config.vocab_size
        self.corpus_source = corpus
        self.export_steps = export_steps
        self.progress = progress
        self._corpus = self._importance = None

    # the corpus and the importance are built on first use (a resumed, finished search needs neither)
    @property
    def corpus(self) -> Corpus:
        if self._corpus is None:
            self._corpus = Corpus.build(self.parent.tokenizer(), self.corpus_source, cache_dir=self.work)
        return self._corpus

    def importance(self):
        """The parent's measured importance: every trial plans its child from it."""
        if self._importance is None:
            self._importance = importance_for(self.parent, self.corpus, self.work, progress=self.progress)
        return self._importance

    def describe(self) -> str:
        return f"children of {self.parent.source.name}"

    def identity(self) -> dict:
        return {"source": "parent", "parent": self.parent.identity, "kind": self.parent.kind,
                "corpus": str(Path(self.corpus_source).resolve()) if self.corpus_source else "python-stdlib"}

    # ---- the moves a trial picks --------------------------------------------------------------------
    def _choices(self) -> tuple[int, int, list[int], list[int]]:
        """The ranges of the moves: layers to drop, attention blocks to keep, FFN widths, KV heads."""
        c = self.parent.config
        n, n_attention = c.num_hidden_layers, len(c.attention_layers)
        if n_attention < 1 or n < 2:
            raise EdgeError(f"parent {self.parent.source} has {n_attention} attention layers in {n}; a child needs "
                            "at least two layers, one of them attention")
        # a child is a hybrid: a parent without conv layers must convert at least one attention layer
        max_attention = max(1, n_attention - (n_attention == n))
        widths = sorted({max(32, round(c.ffn_dim * share / 32) * 32) for share in FFN_SHARES if share < 1}
                        - {c.ffn_dim}, reverse=True)
        widths = [c.ffn_dim] + [w for w in widths if w < c.ffn_dim]
        kv = [k for k in range(c.num_key_value_heads, 0, -1) if c.num_key_value_heads % k == 0]
        return n // 4, max_attention, widths, kv

    def suggest(self, trial) -> Child:
        max_drop, max_attention, widths, kv = self._choices()
        drop = trial.suggest_int("drop", 0, max_drop)
        attention = trial.suggest_int("attention", 1, max_attention)
        ffn = trial.suggest_categorical("ffn", widths)
        kv_heads = trial.suggest_categorical("kv_heads", kv)
        return self._plan(drop, attention, ffn, kv_heads)

    def _plan(self, drop: int, attention: int, ffn: int, kv_heads: int) -> Child:
        pc = self.parent.config
        n, imp = pc.num_hidden_layers, self.importance()
        # plan_child drops the layers of least drop_kl; an attention count those drops made impossible is
        # clamped (the same child twice then steps aside as a duplicate, study.py)
        dropped = set(sorted(range(n), key=lambda i: imp.drop_kl[i])[:drop])
        kept_attention = sum(i not in dropped for i in pc.attention_layers)
        attention = max(1, min(attention, kept_attention, n - drop - 1))
        spec = plan_child(self.parent, imp, attention=attention, drop=drop,
                          ffn=None if ffn == pc.ffn_dim else ffn,
                          kv_heads=None if kv_heads == pc.num_key_value_heads else kv_heads)
        return Child(spec, child_config(self.parent, spec))

    def seeds(self) -> list[dict]:
        """The child the SmolLM2 benchmark derives: one attention block in three, the parent's widths."""
        _, max_attention, widths, kv = self._choices()
        n_attention = len(self.parent.config.attention_layers)
        return [{"drop": 0, "attention": max(1, min(n_attention // 3, max_attention)), "ffn": widths[0],
                 "kv_heads": kv[0]}]

    def from_record(self, record: dict) -> Child:
        spec = ChildSpec(**record)
        spec.check(self.parent.config)
        return Child(spec, child_config(self.parent, spec))

    def hash(self, candidate: Child) -> str:
        # the spec, not only the config: two layouts of one config, or two inits, are two children
        canonical = json.dumps({"source": self.identity(), "spec": candidate.spec.to_dict()}, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    # ---- weights ------------------------------------------------------------------------------------
    def build(self, candidate: Child, seed: int = 0):
        return build(self.parent, candidate.spec, self.importance(), self.corpus, seed=seed)

    def write_checkpoint(self, candidate: Child, directory: Path, seed: int = 0) -> Path:
        """The child with its inherited weights, untrained: what the device measures."""
        return save_child(self.build(candidate, seed), self.parent, directory)

    def export_checkpoint(self, candidate: Child, directory: Path, seed: int = 0) -> Path:
        """The child derived in full: both distillation stages, with progress bars (state in DIRECTORY.work:
        rerunning resumes)."""
        directory = Path(directory)
        stage1, stage2 = self.export_steps
        work = directory.with_name(directory.name + ".work")
        child, report = derive(self.parent, candidate.spec, self.corpus, work=work, stage1_steps=stage1,
                               stage2_steps=stage2, seed=seed, progress=True)
        return save_child(child, self.parent, directory, report)


class DistillProxy(Proxy):
    """Held-out KL to the parent after STEPS steps of the blockwise stage (the cheap one)."""
    name, direction, label = "distill", "minimize", "held-out KL to the parent"

    def __init__(self, steps: int = 20):
        self.steps = steps
        self.cost = (f"{steps} blockwise distillation steps of {BATCH} x {SEQ_LEN} tokens, "
                     f"{EVAL_WINDOWS} held-out windows scored")

    def spec(self) -> str:
        return f"distill:{self.steps}"

    def worst(self, ctx: ProxyContext) -> float:
        return math.log(ctx.vocab_size) if ctx.vocab_size else float("inf")

    def evaluate(self, config, ctx: ProxyContext):
        import torch

        source, candidate = ctx.source, ctx.candidate
        if not isinstance(source, ParentChildren):
            raise EdgeError("--quality distill scores children of a parent; give --parent PATH")
        torch.set_num_threads(ctx.threads)
        child = source.build(candidate, ctx.seed)
        stage = blockwise(child, source.parent, candidate.spec, source.corpus, steps=self.steps, batch=BATCH,
                          seq_len=SEQ_LEN, seed=ctx.seed, state=None, progress=False,
                          identity=source.hash(candidate))
        held = score(child, source.parent, source.corpus.heldout_windows(EVAL_WINDOWS, SEQ_LEN))
        final = round(stage.final_loss, 5) if math.isfinite(stage.final_loss) else None  # nan: nothing to train
        details = {"distill": {"steps": self.steps, "batch": BATCH, "seq_len": SEQ_LEN, "stage1_loss": final,
                               **held}}
        return held["kl"], details


@register("distill", "distill[:STEPS]")
def _distill(argument: str, spec: str) -> Proxy:
    return DistillProxy(_steps(argument, 20, spec))
