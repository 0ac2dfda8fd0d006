"""The search: an Optuna multi-objective study over the space, every candidate measured on this machine
or on device agents (`--device`, one thread per device, one candidate in flight on each; docs/design.md §4).

Objectives: the quality proxy (maximise accuracy / parameters, minimise loss) and the measured decode
latency (ms/token at the budget context, minimise). Budgets are constraints, recorded with Optuna 5's
`trial.set_constraint(name, (measured - limit) / limit)` (feasible when <= 0; relative, so NSGA-II's
"smaller total violation wins" weighs budgets alike). NSGA-II by default, seeded; the first trials
are LFM2's layouts scaled to the space (`study.enqueue_trial`).

Storage is a URL. SQLite (the default, OUT/study.db) gives resume: `--trials N` is the number of
finished trials the study should hold, so re-running the same command after an interruption runs only
the rest. PostgreSQL serves many workers (every worker runs `edge search` with the same --storage
and --study). Bookkeeping that makes both safe:
- finished = COMPLETE trials plus those whose measurement failed (crash, timeout: `failure` attr);
- a trial interrupted while RUNNING (Ctrl-C, SIGKILL, a dead machine) is failed - at once when its
  worker process on this host is gone, else by Optuna's heartbeat after `GRACE_S` - and its
  parameters are re-queued once (`retry_of`), so an interrupted candidate is measured, never lost;
- no candidate is measured twice: a trial first writes its candidate hash into the storage, then
  looks for another live or finished trial with the same hash; if there is one it steps aside
  (PRUNED, `duplicate_of`) and the finished one's figures stand. Write-then-read means two workers
  racing on one candidate can at worst both step aside, never both measure it;
- a trial that would push finished + in-flight trials past N steps aside too (`surplus`), so many
  workers together finish N, not N + workers - 1.
"""
from __future__ import annotations

import json
import math
import os
import random
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from device.client import DeviceUnavailable
from edge.errors import EdgeError
from edge.formats import FORMATS
from runtime.isolate import run_child

from . import space as space_mod
from .measure import MeasureFailed, MeasureSettings, measure, summary
from .quality import Proxy, evaluate

HEARTBEAT_S = 10
GRACE_S = 30
MAX_CONSECUTIVE_DUPLICATES = 40
DEVICE_WAIT_S = 120  # how long a device that dropped out is waited for before the search goes on without it


# ---- budgets --------------------------------------------------------------------------------------
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


# ---- what a search is -----------------------------------------------------------------------------
@dataclass
class SearchSettings:
    space: str
    proxy: Proxy
    budgets: list[Budget]
    measure: MeasureSettings
    trials: int
    out: Path
    tokenizer_path: Path
    vocab_size: int
    storage: str | None = None
    study_name: str = "edge-search"
    seed: int = 0
    sampler: str = "nsga2"
    population: int | None = None
    devices: list[str] | None = None        # device agent URLs; None: measure on this machine
    device_token_file: str | None = None
    drift_every: int = 0                    # re-measure the reference candidate every K candidates (0: off)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{(self.out / 'study.db').resolve()}"

    def identity(self) -> dict:
        """What a study is about; a resumed or joined study must agree on all of it."""
        return {"space": self.space, "quality": self.proxy.spec(), "vocab_size": self.vocab_size,
                "budgets": [b.__dict__ for b in self.budgets],
                "measure": {k: v for k, v in self.measure.to_dict().items() if k not in ("timeout_s",)}}


def open_study(settings: SearchSettings):
    import optuna
    from optuna.storages import RDBStorage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    url = settings.storage_url
    for attempt in range(4):
        try:
            storage = RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                                 engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
            break
        except Exception as e:  # noqa: BLE001 - sqlalchemy/driver errors: one line naming the URL
            # workers starting together on a fresh database race to create Optuna's tables: retry
            if attempt == 3 or "could not connect" in str(e) or "No module named" in str(e):
                raise EdgeError(f"cannot open storage {_safe_url(url)}: {str(e).strip().splitlines()[0]}") from None
            time.sleep(1 + 2 * random.random())
    seed = settings.seed
    if not url.startswith("sqlite"):  # many workers: give each its own random stream (optuna #3162)
        seed = (settings.seed * 1_000_003 + os.getpid()) % 2**31
    population = settings.population or max(4, min(50, settings.trials // 3))
    sampler = (optuna.samplers.NSGAIISampler(population_size=population, seed=seed) if settings.sampler == "nsga2"
               else optuna.samplers.TPESampler(seed=seed) if settings.sampler == "tpe"
               else optuna.samplers.RandomSampler(seed=seed))
    study = optuna.create_study(storage=storage, study_name=settings.study_name, sampler=sampler,
                                directions=[settings.proxy.direction, "minimize"], load_if_exists=True)
    identity = settings.identity()
    stored = study.user_attrs.get("identity")
    if stored is None:
        study.set_user_attr("identity", identity)
        study.set_user_attr("objectives", [settings.proxy.label, "decode ms/token"])
        if not study.get_trials(deepcopy=False):
            for params in space_mod.seed_params(settings.space):
                study.enqueue_trial(params, user_attrs={"seed_layout": "lfm2"}, skip_if_exists=True)
    elif stored != identity:
        diff = next(k for k in identity if identity[k] != stored.get(k))
        raise EdgeError(f"study {settings.study_name!r} in {_safe_url(url)} was created with other {diff} "
                        f"({stored.get(diff)}); rerun with the same options or pick a new --study")
    return study


def _safe_url(url: str) -> str:
    """The storage URL without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':')[0]}:***@{host}"
    return url


# ---- trial bookkeeping ----------------------------------------------------------------------------
def is_finished(t) -> bool:
    from optuna.trial import TrialState

    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "failure" in t.user_attrs)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_interrupted(study) -> None:
    """Fail RUNNING trials whose worker on this host is dead (others: the heartbeat does it) and
    re-queue, once, every trial that was interrupted rather than finished."""
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker", "")
        w_host, _, pid = worker.rpartition(":")
        if w_host == host and pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            try:  # skip_if_finished: its worker may have finished it after all; the except: just now
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass
    optuna.storages.fail_stale_trials(study)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        interrupted = (t.state == TrialState.FAIL and "failure" not in t.user_attrs
                       and "retry_of" not in t.user_attrs and t.params)
        if interrupted and t.number not in retried:
            attrs = {"retry_of": t.number}
            if "seed_layout" in t.user_attrs:
                attrs["seed_layout"] = t.user_attrs["seed_layout"]
            study.enqueue_trial(t.params, user_attrs=attrs)


def _step_aside(study, trial, h: str, target: int) -> str | None:
    """After this trial's hash is in the storage: a reason not to measure it, or None."""
    from optuna.trial import TrialState

    others = [t for t in study.get_trials(deepcopy=False) if t.number != trial.number]
    for t in others:
        if t.user_attrs.get("hash") == h and (t.state == TrialState.RUNNING or is_finished(t)):
            trial.set_user_attr("duplicate_of", t.number)
            return f"candidate {h} is trial {t.number}'s"
    finished = sum(is_finished(t) for t in others)
    in_flight = sum(t.state == TrialState.RUNNING and "hash" in t.user_attrs for t in others)
    if finished + in_flight >= target:
        trial.set_user_attr("surplus", True)
        return f"{finished} finished and {in_flight} running trials already make {target}"
    return None


class _Search:
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
        candidate = space_mod.suggest(trial, s.space, s.vocab_size)
        h = candidate.hash
        trial.set_user_attr("hash", h)
        trial.set_user_attr("candidate", candidate.to_dict())
        reason = _step_aside(trial.study, trial, h, s.trials)
        if reason:
            self.duplicates_in_a_row += "duplicate_of" in trial.user_attrs
            raise optuna.TrialPruned(reason)
        self.duplicates_in_a_row = 0
        config = candidate.to_config()
        self.log(f"trial {trial.number}: {candidate.describe()} [{h}] measuring ...")
        trial.set_user_attr("device", self.transport.label)
        with open(self.measure_log, "a") as f:  # one line per measurement started: proves none is repeated
            f.write(json.dumps({"hash": h, "trial": trial.number, "worker": _worker_id(),
                                "device": self.transport.label, "time": time.time()}) + "\n")
        try:
            result = measure(config, s.tokenizer_path, s.measure, s.out / "work" / f"{h}-{os.getpid()}",
                             transport=self.transport)
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
            quality, details = self._worst(), {"quality_s": 0.0, "skipped": "outside the budget"}
        else:
            try:
                quality, details = evaluate(s.proxy, config, s.tokenizer_path, seed=s.seed, threads=s.measure.threads)
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

    def _worst(self) -> float:
        return math.log(self.s.vocab_size) if self.s.proxy.kind == "lm" else self.s.proxy.worst

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
    searches = [_Search(settings, log, t, reference) for t in devices]
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
    """The drift reference: the space's first LFM2 layout, exported once into OUT/reference."""
    workdir = settings.out / "reference"
    artifact = workdir / f"model{FORMATS[settings.measure.target].suffix}"
    if not artifact.exists():
        workdir.mkdir(parents=True, exist_ok=True)
        params = space_mod.seed_params(settings.space)[0]
        import optuna
        config = space_mod.suggest(optuna.trial.FixedTrial(params), settings.space, settings.vocab_size).to_config()
        (workdir / "config.json").write_text(json.dumps(config.to_dict()))
        (workdir / "settings.json").write_text(json.dumps(settings.measure.to_dict()))
        run_child("arch_search.measure", ["export", str(workdir), str(settings.tokenizer_path)],
                  settings.measure.timeout_s, "export")
    return artifact


# ---- results --------------------------------------------------------------------------------------
def trial_rows(study) -> list[dict]:
    """Every finished trial as a flat record (failed measurements included, with their reason)."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False):
        if not is_finished(t):
            continue
        row = {"trial": t.number, "hash": t.user_attrs.get("hash"), "candidate": t.user_attrs.get("candidate"),
               "seed_layout": t.user_attrs.get("seed_layout"), "worker": t.user_attrs.get("worker"),
               "device": t.user_attrs.get("device", "local"), "drift": t.user_attrs.get("drift")}
        if t.state == TrialState.COMPLETE:
            row.update(quality=t.values[0], decode_ms=t.values[1], feasible=t.user_attrs.get("feasible", False),
                       violations=dict(t.constraints), figures=t.user_attrs.get("figures", {}),
                       measure_s=t.user_attrs.get("measure_s"), quality_s=t.user_attrs.get("quality_s"),
                       quality_details=t.user_attrs.get("quality_details"),
                       measurement=t.user_attrs.get("measurement"))
        else:
            row.update(failure=t.user_attrs["failure"], feasible=False)
        rows.append(row)
    return rows


def pareto_front(rows: list[dict], maximize: bool) -> list[dict]:
    """Feasible candidates no other feasible candidate beats on both quality and decode latency."""
    feasible = [r for r in rows if r.get("feasible") and "quality" in r]

    def better_or_equal(a, b):  # a at least as good as b on both objectives
        q = a["quality"] >= b["quality"] if maximize else a["quality"] <= b["quality"]
        return q and a["decode_ms"] <= b["decode_ms"]

    front = [r for r in feasible
             if not any(better_or_equal(o, r) and (o["quality"], o["decode_ms"]) != (r["quality"], r["decode_ms"])
                        for o in feasible)]
    return sorted(front, key=lambda r: r["decode_ms"])


def closest_miss(rows: list[dict], budgets: list[Budget]) -> dict | None:
    """With no feasible candidate: the budget that came closest to being met, by how much, by whom."""
    measured = [r for r in rows if "figures" in r]
    if not measured or not budgets:
        return None
    best = None
    for b in budgets:
        r = min(measured, key=lambda r: b.violation(r["figures"]))
        miss = {"budget": b.name, "limit": b.limit, "unit": b.unit, "best": r["figures"][b.key],
                "over": r["figures"][b.key] - b.limit, "relative": b.violation(r["figures"]), "trial": r["trial"],
                "candidate": r["candidate"]}
        # among budgets some candidate misses, the one missed by the smallest relative margin
        if miss["relative"] > 0 and (best is None or miss["relative"] < best["relative"]):
            best = miss
    if best is None:  # every budget is met by someone, just never all by the same candidate
        r = min(measured, key=lambda r: sum(max(0.0, b.violation(r["figures"])) for b in budgets))
        worst = max(budgets, key=lambda b: b.violation(r["figures"]))
        best = {"budget": worst.name, "limit": worst.limit, "unit": worst.unit, "best": r["figures"][worst.key],
                "over": r["figures"][worst.key] - worst.limit, "relative": worst.violation(r["figures"]),
                "trial": r["trial"], "candidate": r["candidate"], "jointly": True}
    return best


def describe_candidate(c: dict | None) -> str:
    if not c:
        return "?"
    return (f"d{c['depth']} w{c['hidden']} h{c['heads']}/kv{c['kv_heads']} ffn{c['ffn']} "
            f"attn[{','.join(map(str, c['attention']))}] L{c['l_cache']}")


def front_table(front: list[dict], settings: SearchSettings) -> str:
    extra = [b.key for b in settings.budgets if b.key not in ("decode_ms",)]
    prefill_keys = [f"prefill_ms@{n}" for n in settings.measure.prefill_tokens]
    cols = ["decode_ms", *dict.fromkeys([*prefill_keys, *extra, "peak_rss_mb", "kv_mb", "artifact_mb"])]
    with_params = settings.proxy.kind != "params"  # else the quality column already is the parameter count
    head = ["trial", "candidate", settings.proxy.label, *cols, *(["params (M)"] if with_params else []), "hash"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in front:
        c = r["candidate"]
        name = describe_candidate(c) + (" (LFM2 layout)" if r.get("seed_layout") else "")
        cells = [str(r["trial"]), name, f"{r['quality']:.4g}",
                 *[f"{r['figures'].get(k, float('nan')):.4g}" for k in cols],
                 *([f"{_params_m(c, settings):.3g}"] if with_params else []), r["hash"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _params_m(c: dict, settings: SearchSettings) -> float:
    return space_mod.Candidate.from_dict(c, settings.space).to_config().n_params(include_embeddings=False) / 1e6


def plot(rows: list[dict], front: list[dict], settings: SearchSettings, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edge.files import atomic_path

    fig, ax = plt.subplots(figsize=(7.5, 5))
    done = [r for r in rows if "quality" in r]
    feasible = [r for r in done if r["feasible"]]
    infeasible = [r for r in done if not r["feasible"]]
    ax.scatter([r["decode_ms"] for r in feasible], [r["quality"] for r in feasible], c="tab:blue", s=28,
               label=f"within budget ({len(feasible)})")
    ax.scatter([r["decode_ms"] for r in infeasible], [r["quality"] for r in infeasible], c="tab:gray", marker="x",
               s=28, label=f"over budget ({len(infeasible)})")
    if front:
        ax.plot([r["decode_ms"] for r in front], [r["quality"] for r in front], "-o", c="tab:red", ms=7,
                mfc="none", label="Pareto front")
    seeds = [r for r in done if r.get("seed_layout")]
    if seeds:
        ax.scatter([r["decode_ms"] for r in seeds], [r["quality"] for r in seeds], marker="s", s=70, facecolors="none",
                   edgecolors="tab:green", label="LFM2 layouts (seeded)")
    for b in settings.budgets:
        if b.metric == "decode_ms":
            ax.axvline(b.limit, ls="--", c="tab:orange", label=f"budget {b.name} = {b.limit:g} {b.unit}")
    others = [f"{b.name} <= {b.limit:g} {b.unit}" for b in settings.budgets if b.metric != "decode_ms"]
    ax.set_xlabel(f"decode ms/token at {settings.measure.decode_depth} tokens of context "
                  f"({settings.measure.target}, {settings.measure.threads} thread(s))")
    ax.set_ylabel(settings.proxy.label)
    ax.set_title(f"edge search, space {settings.space}: {len(done)} measured candidates"
                 + (f"\nalso bounded: {', '.join(others)}" if others else ""), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_results(study, settings: SearchSettings) -> dict:
    """front.md / front.json / front.png / trials.json in OUT; returns the summary (front, miss)."""
    from edge.files import atomic_path, write_json

    rows = trial_rows(study)
    front = pareto_front(rows, maximize=settings.proxy.direction == "maximize")
    miss = None if front else closest_miss(rows, settings.budgets)
    measured = [r for r in rows if "measure_s" in r]
    timing = {
        "finished_trials": len(rows), "measured": len(measured), "failed": sum("failure" in r for r in rows),
        "median_measure_s": _median([r["measure_s"] for r in measured]),
        "median_quality_s": _median([r["quality_s"] for r in measured]),
        "total_measure_s": round(sum(r["measure_s"] for r in measured), 1),
        "total_quality_s": round(sum(r["quality_s"] or 0 for r in measured), 1),
    }
    result = {"study": settings.study_name, "storage": _safe_url(settings.storage_url), "space": settings.space,
              "quality": settings.proxy.spec(), "objectives": [settings.proxy.label, "decode_ms"],
              "budgets": [{"budget": b.name, "limit": b.limit, "unit": b.unit} for b in settings.budgets],
              "measure": settings.measure.to_dict(), "timing": timing, "front": front, "closest_miss": miss}
    settings.out.mkdir(parents=True, exist_ok=True)
    table = front_table(front, settings)
    with atomic_path(settings.out / "front.md") as tmp:
        tmp.write_text(f"# Pareto front: {settings.study_name}\n\n{table}\n")
    write_json(settings.out / "front.json", result)
    write_json(settings.out / "trials.json", rows)
    plot(rows, front, settings, settings.out / "front.png")
    result["table"] = table
    return result


def _median(xs):
    xs = sorted(x for x in xs if x is not None)
    return round(xs[len(xs) // 2], 3) if xs else None


def best_candidate(front: list[dict], maximize: bool) -> dict:
    """The feasible candidate with the best quality (the fastest among equals)."""
    return sorted(front, key=lambda r: ((-r["quality"] if maximize else r["quality"]), r["decode_ms"]))[0]


def export_best(row: dict, settings: SearchSettings, out_dir: Path) -> Path:
    """Rebuild the winning candidate (same seed as measured), write its checkpoint and its artifact."""
    import shutil

    from edge.checkpoint import save_model
    from edge.model import HybridLM
    from export import export_model


    cand = space_mod.Candidate.from_dict(row["candidate"], settings.space)
    if cand.hash != row["hash"]:
        raise EdgeError(f"trial {row['trial']}'s candidate does not rebuild to hash {row['hash']}; was the space "
                        "changed since the search? rerun the search")
    checkpoint = out_dir / "checkpoint"
    save_model(HybridLM(cand.to_config()).init_weights(settings.measure.seed), checkpoint)
    shutil.copyfile(settings.tokenizer_path, checkpoint / "tokenizer.json")
    m = settings.measure
    return export_model(m.target, checkpoint, out_dir / f"model{FORMATS[m.target].suffix}", quant=m.quant,
                        kv_cache=m.kv_cache, max_seq_len=m.max_seq_len)
