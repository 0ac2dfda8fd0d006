"""The study: what a search is (its settings and identity), its Optuna storage, and the bookkeeping that
makes resume and many workers safe.

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

import os
import random
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from edge.errors import EdgeError

from .budgets import Budget
from .candidates import CandidateSource
from .measure import MeasureSettings
from .proxies import Proxy, ProxyContext

HEARTBEAT_S = 10
GRACE_S = 30


@dataclass
class SearchSettings:
    source: CandidateSource                 # where candidates come from (random backbones, a parent's children)
    proxy: Proxy                            # the quality objective
    budgets: list[Budget]
    measure: MeasureSettings
    trials: int
    out: Path
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

    def proxy_context(self, candidate=None) -> ProxyContext:
        return ProxyContext(tokenizer_path=self.source.tokenizer_path, vocab_size=self.source.vocab_size,
                            seed=self.seed, threads=self.measure.threads, source=self.source, candidate=candidate)

    def identity(self) -> dict:
        """What a study is about; a resumed or joined study must agree on all of it."""
        return {"source": self.source.identity(), "quality": self.proxy.spec(),
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
            for params in settings.source.seeds():
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
