"""The derivation as one call (`edge derive`) and the pieces a search calls per candidate.

    parent = load_parent(path)
    corpus = Corpus.build(parent.tokenizer(), cache_dir=work)
    importance = importance_for(parent, corpus, work)             # measured once per parent, cached
    spec = plan_child(parent, importance, attention=10)           # or ChildSpec(layout=...)
    child = build(parent, spec, importance, corpus)
    blockwise(child, parent, spec, corpus, steps=...)             # the cheap stage
    end_to_end(child, parent, corpus, steps=...)
    score(child, parent, corpus.heldout_windows(16, 256))
    save_child(child, parent, out, {...})
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..checkpoint import save_model
from ..errors import EdgeError
from ..files import atomic_dir, write_json
from ..model import HybridLM
from .child import ChildSpec, Importance, build_child, measure_importance, needs_importance
from .corpus import Corpus
from .distill import blockwise, end_to_end, score
from .parent import Parent

CALIBRATION = (4, 128)  # windows x tokens: 512 tokens of calibration text (cost: ~30 parent passes)
REPORT = "derive.json"  # what a derived checkpoint carries besides the HF files


def calibration_tokens(corpus: Corpus, windows: int = CALIBRATION[0], seq_len: int = CALIBRATION[1]) -> torch.Tensor:
    """Calibration windows [windows, seq_len] from the train split, apart from the training batches' seeds."""
    return corpus.batch(step=2**31 - 1, batch=windows, seq_len=seq_len, seed=12345)[:, :-1]


def importance_for(parent: Parent, corpus: Corpus, cache_dir: str | Path | None = None,
                   progress: bool = True) -> Importance:
    """The parent's measured importance on the corpus' calibration windows, kept in `cache_dir` (keyed by the
    parent's identity) so that a search or a second derive measures it once."""
    path = Path(cache_dir) / f"importance-{parent.identity[:16]}.json" if cache_dir else None
    if path and path.exists():
        imp = Importance.load(path)
        if imp.parent_identity == parent.identity:
            return imp
    imp = measure_importance(parent, calibration_tokens(corpus), progress=progress)
    if path:
        imp.save(path)
    return imp


def build(parent: Parent, spec: ChildSpec, importance: Importance | None, corpus: Corpus, seed: int = 0) -> HybridLM:
    """build_child with the calibration windows the importance was measured on."""
    return build_child(parent, spec, importance, calibration_tokens(corpus), seed=seed)


def derive(parent: Parent, spec: ChildSpec, corpus: Corpus, *, work: str | Path, stage1_steps: int,
           stage2_steps: int, batch: int = 4, seq_len: int = 256, lr1: float = 1e-3, lr2: float = 3e-4,
           stage1_minutes: float | None = None, stage2_minutes: float | None = None, eval_windows: int = 16,
           seed: int = 0, progress: bool = True) -> tuple[HybridLM, dict]:
    """Measure, build, distill (resumably, state under `work`) and score a child; returns (child, report)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    identity = spec.identity(parent.identity) + json.dumps([batch, seq_len, lr1, lr2, seed])
    started = time.perf_counter()
    importance = importance_for(parent, corpus, work, progress) if needs_importance(parent, spec) else None
    measured_s = time.perf_counter() - started
    child = build(parent, spec, importance, corpus, seed)
    common = dict(batch=batch, seq_len=seq_len, progress=progress, identity=identity)
    s1 = blockwise(child, parent, spec, corpus, steps=stage1_steps, lr=lr1, seed=seed, state=work / "stage1.pt",
                   deadline_s=stage1_minutes * 60 if stage1_minutes else None, **common)
    s2 = end_to_end(child, parent, corpus, steps=stage2_steps, lr=lr2, seed=seed + 1, state=work / "stage2.pt",
                    deadline_s=stage2_minutes * 60 if stage2_minutes else None, **common)
    metrics = score(child, parent, corpus.heldout_windows(eval_windows, seq_len)) if eval_windows else {}
    report = {"parent": {"source": str(parent.source), "kind": parent.kind, "identity": parent.identity},
              "spec": spec.to_dict(), "corpus": corpus.description, "importance_s": round(measured_s, 1),
              "stage1": s1.to_dict(), "stage2": s2.to_dict(), "heldout": metrics,
              "train_tokens": s1.tokens + s2.tokens}
    return child, report


def save_child(child: HybridLM, parent: Parent, out: str | Path, report: dict | None = None) -> Path:
    """Write the child as an HF LFM2 checkpoint directory (transformers' Lfm2ForCausalLM loads it) with the
    parent's tokenizer.json and tokenizer_config.json (chat template included) and `derive.json`; the
    directory appears whole or not at all, and only replaces an earlier derived checkpoint."""
    out = Path(out)
    with atomic_dir(out, replaceable=lambda old: (old / REPORT).is_file()) as tmp:
        save_model(child, tmp)
        (tmp / "tokenizer.json").write_text(parent.tokenizer_json, encoding="utf-8")
        tc = dict(parent.tokenizer_config)
        tc.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        # the child's config decides bos: Session.encode and the exporters add it only when it is set
        tc["add_bos_token"] = child.config.bos_token_id is not None
        write_json(tmp / "tokenizer_config.json", tc)
        c = child.config
        write_json(tmp / "generation_config.json", {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id,
                                                    "pad_token_id": c.pad_token_id})
        write_json(tmp / REPORT, report or {"parent": {"source": str(parent.source), "identity": parent.identity}})
    return out


def load_report(model_dir: str | Path) -> dict:
    path = Path(model_dir) / REPORT
    if not path.is_file():
        raise EdgeError(f"{model_dir} has no {REPORT}; it was not written by `edge derive`")
    return json.loads(path.read_text())
