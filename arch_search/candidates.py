"""Where candidates come from: a candidate source asks the trial for one (define-by-run), names the
first trials to run, writes a candidate's weights as a checkpoint, and gives every candidate an identity.

The search holds one source and never reaches into the space module itself. Two sources exist:
`RandomBackbones` (the space's hybrids with random weights: latency and memory do not depend on the
values, and the quality proxy trains its own copy) and, for `edge search --parent`, children derived
from a pretrained parent (its inherited weights; arch_search/derive.py). The source's identity is part
of the study's and of every candidate's hash, so two children of different parents with one shape are
two candidates.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from . import space as space_mod


class CandidateSource:
    """The interface the search uses. A candidate is any object with `to_config()`, `to_dict()` and
    `describe()` (space.Candidate for random backbones). A source also names the tokenizer every
    candidate uses (`tokenizer_path`, `vocab_size`), which the quality proxies read text with."""
    tokenizer_path: Path
    vocab_size: int
    export_note = ""   # what `--export-best` writes, in a few words (printed beside its path)

    def describe(self) -> str:
        """A few words for titles: "space tiny", "children of SmolLM2-135M"."""
        raise NotImplementedError

    def identity(self) -> dict:
        """What the source is: stored with the study, and part of every candidate's hash."""
        raise NotImplementedError

    def suggest(self, trial):
        """Ask `trial` (an optuna Trial or FixedTrial) for a candidate; every answer is valid."""
        raise NotImplementedError

    def seeds(self) -> list[dict]:
        """Trial parameters to run first (study.enqueue_trial)."""
        return []

    def from_record(self, record: dict):
        """The candidate back from its `to_dict()` (as stored with a trial)."""
        raise NotImplementedError

    def write_checkpoint(self, candidate, directory: Path, seed: int = 0) -> Path:
        """Write the candidate's weights, config and tokenizer as an HF checkpoint into `directory`."""
        raise NotImplementedError

    def export_checkpoint(self, candidate, directory: Path, seed: int = 0) -> Path:
        """The checkpoint `--export-best` ships for the candidate (default: the measured weights)."""
        return self.write_checkpoint(candidate, directory, seed)

    def hash(self, candidate) -> str:
        """The candidate's identity: equal models from the same source are one candidate."""
        canonical = json.dumps({"source": self.identity(), "config": candidate.to_config().to_dict()},
                               sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class RandomBackbones(CandidateSource):
    """The space's hybrids (space.py) with seeded random weights and the search's tokenizer."""
    export_note = "random weights: train it"

    def __init__(self, space: str, tokenizer_path: Path, vocab_size: int):
        space_mod.bounds(space)  # an unknown space: one line now
        self.space, self.tokenizer_path, self.vocab_size = space, Path(tokenizer_path), vocab_size

    def describe(self) -> str:
        return f"space {self.space}"

    def identity(self) -> dict:
        return {"source": "random", "space": self.space, "vocab_size": self.vocab_size}

    def suggest(self, trial) -> space_mod.Candidate:
        return space_mod.suggest(trial, self.space, self.vocab_size)

    def seeds(self) -> list[dict]:
        return space_mod.seed_params(self.space)

    def from_record(self, record: dict) -> space_mod.Candidate:
        return space_mod.Candidate.from_dict(record, self.space)

    def hash(self, candidate: space_mod.Candidate) -> str:
        return candidate.hash  # the config alone: random weights add nothing to the identity

    def write_checkpoint(self, candidate, directory: Path, seed: int = 0) -> Path:
        from edge.checkpoint import save_model
        from edge.model import HybridLM

        directory = Path(directory)
        save_model(HybridLM(candidate.to_config()).init_weights(seed), directory)
        shutil.copyfile(self.tokenizer_path, directory / "tokenizer.json")
        return directory
