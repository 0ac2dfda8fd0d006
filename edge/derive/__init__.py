"""Derive a trained LFM2 hybrid from a pretrained model (docs/design.md §15): load a parent, plan a child
from measured importance, build it with inherited weights, distill it in two stages, score and save it.

The API a search calls per candidate (see edge/derive/run.py for the sequence):
    load_parent, Corpus.build, importance_for, plan_child / ChildSpec, build, blockwise, end_to_end, score,
    save_child; ChildSpec.identity(parent.identity) is the candidate's identity.
"""
from .child import ChildSpec, Importance, build_child, child_config, measure_importance, plan_child
from .corpus import Corpus
from .distill import StageResult, blockwise, end_to_end, score, stage1_units
from .parent import Parent, load_parent
from .run import build, calibration_tokens, derive, importance_for, load_report, save_child

__all__ = ["ChildSpec", "Importance", "build_child", "child_config", "measure_importance", "plan_child", "Corpus",
           "StageResult", "blockwise", "end_to_end", "score", "stage1_units", "Parent", "load_parent", "build",
           "calibration_tokens", "derive", "importance_for", "load_report", "save_child"]
