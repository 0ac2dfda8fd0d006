"""The search loop: one worker per device (this machine, or each `--device` agent), each with one
candidate in flight. A trial asks the candidate source for a candidate, measures it through the device's
transport, checks the budgets, and scores the feasible ones with the quality proxy (docs/design.md §8).

Objectives: the quality proxy (its direction) and the measured decode latency (ms/token at the budget
context, minimise); budgets are constraints (budgets.py). NSGA-II by default, seeded; the first trials
are the source's seeds (LFM2's layouts scaled to the space).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

from device.client import DeviceUnavailable
from edge.errors import EdgeError
from edge.formats import FORMATS
from runtime.isolate import MeasureFailed, model_name

from .measure import export_artifact, measure, summary
from .proxies import score
from .study import SearchSettings, _step_aside, _worker_id, is_finished, open_study, recover_interrupted

MAX_CONSECUTIVE_DUPLICATES = 40
DEVICE_WAIT_S = 120  # how long a device that dropped out is waited for before the search goes on without it


class Worker:
    def __init__(self, settings: SearchSettings, log, transport=None, reference=None):
        from device.transport import LocalTransport

        self.s = settings
        self.transport = transport or LocalTransport()
        self.log = log if not settings.devices or len(settings.devices) < 2 else (
            lambda msg: log(f"[{self.transport.label}] {msg}"))
        self.measure_log = settings.out / "measurements.jsonl"
        self.duplicates_in_a_row = 0
        self.device_down = False
        self.reference = reference  # the drift reference's artifact (see _measure_reference)
        self.measured = 0            # candidates this device measured (the drift reference is re-measured every K)
        self.drift_due = -1          # `measured` at the last reference measurement
        self.drift: dict | None = None
        self.first_reference_ms: float | None = None

    def objective(self, trial):
        import optuna

        s = self.s
        trial.set_user_attr("worker", _worker_id())
        candidate = s.source.suggest(trial)
        h = s.source.hash(candidate)
        trial.set_user_attr("hash", h)
        trial.set_user_attr("candidate", candidate.to_dict())
        reason = _step_aside(trial.study, trial, h, s.trials)
        if reason:
            self.duplicates_in_a_row += "duplicate_of" in trial.user_attrs
            raise optuna.TrialPruned(reason)
        self.duplicates_in_a_row = 0
        self.log(f"trial {trial.number}: {candidate.describe()} [{h}] measuring ...")
        trial.set_user_attr("device", self.transport.label)
        with open(self.measure_log, "a") as f:  # one line per measurement started: proves none is repeated
            f.write(json.dumps({"hash": h, "trial": trial.number, "worker": _worker_id(),
                                "device": self.transport.label, "time": time.time()}) + "\n")
        workdir = s.out / "work" / f"{h}-{os.getpid()}"
        try:
            checkpoint = s.source.write_checkpoint(candidate, workdir / "checkpoint", seed=s.measure.seed)
            result = measure(checkpoint, s.measure, workdir, transport=self.transport)
        except DeviceUnavailable as e:
            # not the candidate's fault: without a `failure` it is re-queued (recover_interrupted) and
            # measured by the next free device; a retry that meets a lost device again is failed with the reason
            self.device_down = True
            if "retry_of" in trial.user_attrs:
                trial.set_user_attr("failure", str(e))
            self.log(f"trial {trial.number}: {e}; {'failed' if 'retry_of' in trial.user_attrs else 're-queued'}")
            raise
        except MeasureFailed as e:
            trial.set_user_attr("failure", str(e))
            self.log(f"trial {trial.number}: measurement failed: {e}")
            raise
        figures = summary(result, s.measure)
        trial.set_user_attr("figures", figures)
        trial.set_user_attr("measurement", {k: v for k, v in result.items() if k not in ("export_s", "measure_s")})
        trial.set_user_attr("measure_s", result["measure_s"])
        if self.drift:
            trial.set_user_attr("drift", self.drift)
        self.measured += 1
        violations = {b.name: b.violation(figures) for b in s.budgets}
        for name, v in violations.items():
            trial.set_constraint(name, v)
        feasible = all(v <= 0 for v in violations.values())
        trial.set_user_attr("feasible", feasible)
        if s.proxy.trains and not feasible:
            # as in LFM2's search: only candidates inside the budget compete on quality
            quality, details = s.proxy.worst(s.proxy_context()), {"quality_s": 0.0, "skipped": "outside the budget"}
        else:
            try:
                quality, details = score(s.proxy, candidate.to_config(), s.proxy_context(candidate))
            except Exception as e:  # noqa: BLE001 - a candidate the proxy cannot train is one failed trial
                trial.set_user_attr("failure", f"quality proxy failed: {type(e).__name__}: {e}"[:300])
                raise MeasureFailed(trial.user_attrs["failure"]) from None
        trial.set_user_attr("quality", quality)
        trial.set_user_attr("quality_details", details)
        trial.set_user_attr("quality_s", details["quality_s"])
        self.log(f"trial {trial.number}: {s.proxy.label} {quality:.4g}, decode {figures['decode_ms']:.3f} ms/token, "
                 f"{'feasible' if feasible else 'over budget'} (measure {result['measure_s']:.1f} s, "
                 f"quality {details['quality_s']:.1f} s)")
        return quality, figures["decode_ms"]

    def run(self, study) -> None:
        from optuna.trial import TrialState

        target = self.s.trials
        while True:
            recover_interrupted(study)
            trials = study.get_trials(deepcopy=False)
            finished = sum(is_finished(t) for t in trials)
            if finished >= target:
                return
            in_flight = sum(t.state == TrialState.RUNNING and "hash" in t.user_attrs for t in trials)
            if finished + in_flight >= target:  # the rest is being measured elsewhere (or will go stale)
                time.sleep(2 + random.random())
                continue
            if self.duplicates_in_a_row >= MAX_CONSECUTIVE_DUPLICATES:
                raise EdgeError(f"the sampler proposed {self.duplicates_in_a_row} measured candidates in a row; "
                                f"the space looks exhausted at {finished} trials: lower --trials or widen --space")
            if self.device_down and not self._wait_for_device(study):
                return
            if self.s.drift_every and self.measured % self.s.drift_every == 0 and self.drift_due != self.measured:
                self._measure_reference()
            study.optimize(self.objective, n_trials=1, catch=(MeasureFailed,))

    def _wait_for_device(self, study) -> bool:
        """After a device dropped out: True once it answers again, False when the study is done without
        it or it stayed away DEVICE_WAIT_S (the other devices go on)."""
        end = time.monotonic() + DEVICE_WAIT_S
        while time.monotonic() < end:
            if sum(is_finished(t) for t in study.get_trials(deepcopy=False)) >= self.s.trials:
                return False
            if self.transport.wait_until_reachable(2.0):
                self.device_down = False
                self.log(f"device {self.transport.label} answers again")
                return True
        self.log(f"device {self.transport.label} unreachable for {DEVICE_WAIT_S} s; going on without it")
        return False

    def _measure_reference(self) -> None:
        """Re-measure the fixed reference candidate on this device; its decode time against the first
        measurement is the device's drift (a throttling device shows a ratio above 1)."""
        self.drift_due = self.measured
        try:
            result = self.transport.measure_candidate(self.reference, self.s.measure)
        except MeasureFailed as e:
            self.log(f"drift reference: {e}")
            if isinstance(e, DeviceUnavailable):
                self.device_down = True
            return
        ms = summary(result, self.s.measure)["decode_ms"]
        first = self.first_reference_ms = self.first_reference_ms or ms
        self.drift = {"reference_decode_ms": round(ms, 4), "ratio": round(ms / first, 4), "after": self.measured}
        with open(self.s.out / "drift.jsonl", "a") as f:
            f.write(json.dumps({"device": self.transport.label, "time": time.time(), **self.drift}) + "\n")
        self.log(f"drift reference: decode {ms:.3f} ms/token, {self.drift['ratio']:.3f}x the first")


def run_search(settings: SearchSettings, log=print):
    """Open (or resume, or join) the study and run trials until it holds `settings.trials` finished ones."""
    settings.out.mkdir(parents=True, exist_ok=True)
    study = open_study(settings)
    before = sum(is_finished(t) for t in study.get_trials(deepcopy=False))
    if before:
        log(f"study {settings.study_name!r} holds {before} finished trials; running until {settings.trials}")
    from device.transport import transports

    # a busy device (another host's search) is waited for, up to one measurement's time limit
    devices = transports(settings.devices, settings.device_token_file, busy_wait_s=settings.measure.timeout_s)
    for t in devices:  # an unreachable device, a wrong token or a missing engine: one line now, not later
        t.check(FORMATS[settings.measure.target].suffix)
    reference = reference_artifact(settings) if settings.drift_every else None
    searches = [Worker(settings, log, t, reference) for t in devices]
    if len(searches) == 1:
        searches[0].run(study)
    else:  # one thread per device, each with one candidate in flight; the storage's bookkeeping is shared
        import threading

        # Optuna claims a queued trial by reading it WAITING then writing RUNNING; on SQLite (no row locks)
        # two threads can both claim the same one, so this process's threads ask for trials one at a time
        ask, asking = study.ask, threading.Lock()

        def ask_one_at_a_time(*args, **kwargs):
            with asking:
                return ask(*args, **kwargs)

        study.ask = ask_one_at_a_time
        errors = []

        def work(search):
            try:
                search.run(study)
            except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
                errors.append(e)

        threads = [threading.Thread(target=work, args=(s,), daemon=True) for s in searches]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    for t in devices:
        t.close()
    finished = sum(is_finished(t) for t in study.get_trials(deepcopy=False))
    if finished < settings.trials:
        raise EdgeError(f"no device left to measure on ({', '.join(t.label for t in devices)} unreachable); "
                        f"{finished} of {settings.trials} trials finished and kept: restart the agents and rerun "
                        "the same command to resume")
    return study


def reference_artifact(settings: SearchSettings) -> Path:
    """The drift reference: the source's first seed (the space's first LFM2 layout), exported once into
    OUT/reference."""
    import optuna

    workdir = settings.out / "reference"
    artifact = workdir / model_name(FORMATS[settings.measure.target].suffix)
    if not artifact.exists():
        source = settings.source
        if not source.seeds():
            raise EdgeError("--drift-every needs a reference candidate, and this candidate source has no seeds")
        candidate = source.suggest(optuna.trial.FixedTrial(source.seeds()[0]))
        checkpoint = source.write_checkpoint(candidate, workdir / "checkpoint", seed=settings.measure.seed)
        export_artifact(checkpoint, settings.measure, workdir)
        shutil.rmtree(checkpoint)
    return artifact
