"""Budgets: the limits a candidate must meet, measured on the device. Each is a constraint, not an
objective: the study records `(measured - limit) / limit` per budget (feasible when <= 0; relative, so
NSGA-II's "smaller total violation wins" weighs budgets alike and, among infeasible candidates, prefers
the nearest)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from edge.errors import EdgeError

from .measure import MeasureSettings


@dataclass(frozen=True)
class Budget:
    metric: str          # decode_ms | prefill_ms | mem_mb
    tokens: int | None   # prefill_ms@N: N prompt tokens; decode_ms@D: D tokens of context
    limit: float

    @property
    def key(self) -> str:
        """The figure this budget bounds, as named in the measurement summary."""
        return {"decode_ms": "decode_ms", "mem_mb": "peak_rss_mb"}.get(self.metric, f"prefill_ms@{self.tokens}")

    @property
    def name(self) -> str:
        return f"{self.metric}@{self.tokens}" if self.tokens is not None and self.metric == "prefill_ms" else self.metric

    @property
    def unit(self) -> str:
        return {"decode_ms": "ms/token", "prefill_ms": "ms", "mem_mb": "MiB"}[self.metric]

    def violation(self, figures: dict) -> float:
        return (figures[self.key] - self.limit) / self.limit


def parse_budget(spec: str) -> Budget:
    """decode_ms=V, decode_ms@DEPTH=V, prefill_ms@N=V, mem_mb=V; one-line errors."""
    usage = "use decode_ms=V, decode_ms@DEPTH=V, prefill_ms@N=V or mem_mb=V"
    name, eq, value = spec.partition("=")
    if not eq:
        raise EdgeError(f"--budget {spec!r} has no '='; {usage}")
    metric, at, tokens = name.strip().partition("@")
    if metric not in ("decode_ms", "prefill_ms", "mem_mb"):
        raise EdgeError(f"--budget {spec!r}: unknown budget {metric!r}; {usage}")
    try:
        limit = float(value)
    except ValueError:
        raise EdgeError(f"--budget {spec!r}: {value!r} is not a number; {usage}") from None
    if not (limit > 0 and math.isfinite(limit)):
        raise EdgeError(f"--budget {spec!r}: the limit must be a positive number")
    n = None
    if at:
        if metric == "mem_mb" or not tokens.isdigit() or int(tokens) < 1:
            raise EdgeError(f"--budget {spec!r}: '@' takes a positive token count, for prefill_ms or decode_ms; {usage}")
        n = int(tokens)
    elif metric == "prefill_ms":
        raise EdgeError(f"--budget {spec!r}: say how many prompt tokens, e.g. prefill_ms@512={value}")
    return Budget(metric, n, limit)


def measure_settings_for(budgets: list[Budget], **overrides) -> MeasureSettings:
    """The measurement protocol the budgets need: prefill lengths they name, the decode context."""
    depths = {b.tokens for b in budgets if b.metric == "decode_ms" and b.tokens is not None}
    if len(depths) > 1:
        raise EdgeError(f"decode budgets name several contexts ({sorted(depths)}); give one decode_ms budget")
    prefill = tuple(sorted({b.tokens for b in budgets if b.metric == "prefill_ms"})) or (512,)
    settings = dict(prefill_tokens=prefill, decode_depth=depths.pop() if depths else 512)
    settings.update(overrides)
    return MeasureSettings(**settings)


