"""The device in the loop (`edge device serve`, `edge bench --device`, `edge search --device`) over loopback.

Every agent is a separate process with its own working directory, pinned to one CPU (`--cpus`); the
"slow device" is an agent on the other CPU under a CPU quota (cgroup v2 `cpu.max`, else v1
`cpu.cfs_quota_us`; skipped where neither is writable). Real engines throughout (tiny GGUF artifacts).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import optuna
import pytest

from arch_search.measure import measure, summary
from arch_search.search import measure_settings_for, parse_budget
from arch_search.space import seed_params, suggest
from device.client import DeviceTransport
from edge.cli import main as edge
from export import export_model
from test_search import finished_trials, postgres_url  # noqa: F401 - the PostgreSQL fixture of the search tests

# the agents measure GGUF artifacts: skipped, with the cause, where llama.cpp cannot run (tests/engines.py)
pytestmark = pytest.mark.engine("llamacpp")

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "test-token-" + uuid.uuid4().hex
BENCH = ["-p", "32", "-n", "32", "-r", "3", "-t", "1"]
# the search's budgets: prefill 64 tokens, decode at 64 tokens of context (small, fast measurements)
SEARCH = ["search", "--target", "gguf", "--quality", "params", "--space", "tiny", "-t", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProc:
    """`edge device serve` in its own process and working directory."""

    def __init__(self, root: Path, name: str, cpus: str, *extra: str, cache: Path | None = None):
        self.dir = root / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache = cache or self.dir / "cache"
        self.name, self.cpus, self.extra = name, cpus, extra
        self.token_file = self.dir / "token"
        self.token_file.write_text(TOKEN + "\n")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, quota=None) -> "AgentProc":
        cmd = [sys.executable, "-m", "edge.cli", "device", "serve", "--port", str(self.port), "--cache",
               str(self.cache), "--token-file", str(self.token_file), "--cpus", self.cpus, "--name", self.name,
               *self.extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = open(self.dir / "agent.log", "a")
        self.proc = subprocess.Popen(cmd, cwd=self.dir, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if quota:
            quota(self.proc.pid)  # before it forks any measuring child: they inherit the group
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.dir / "agent.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if self.get("/info").status_code == 200:
                    return self
            time.sleep(0.3)
        raise AssertionError(f"agent {self.name} did not start: {(self.dir / 'agent.log').read_text()}")

    def get(self, path, token=TOKEN, **kw):
        return httpx.get(self.url + path, headers={"Authorization": f"Bearer {token}"} if token else {}, **kw)

    def info(self) -> dict:
        return self.get("/info").json()

    def transport(self) -> DeviceTransport:
        return DeviceTransport(self.url, TOKEN)

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None


@contextlib.contextmanager
def agents(root: Path, *specs):
    started = []
    try:
        for spec in specs:
            name, cpus, *extra = spec
            started.append(AgentProc(root, name, cpus, *extra).start())
        yield started
    finally:
        for a in started:
            a.stop()


class CpuQuota:
    """A CPU quota for one process tree: cgroup v2 cpu.max where writable, else cgroup v1's cpu controller."""

    def __init__(self, percent: int):
        self.percent = percent
        self.group = None
        name = f"edge-test-{uuid.uuid4().hex[:8]}"
        v2 = Path("/sys/fs/cgroup/cgroup.controllers")
        if v2.exists() and "cpu" in v2.read_text().split() and os.access(v2.parent, os.W_OK):
            self.group, self.files = v2.parent / name, {"cpu.max": f"{percent * 100} 10000"}
        elif os.access("/sys/fs/cgroup/cpu", os.W_OK) and Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
            # a 10 ms period: the quota bites inside one decode test, not only across 100 ms windows
            self.group = Path("/sys/fs/cgroup/cpu") / name
            self.files = {"cpu.cfs_period_us": "10000", "cpu.cfs_quota_us": str(percent * 100)}

    def __call__(self, pid: int) -> None:
        self.group.mkdir()
        for f, v in self.files.items():
            (self.group / f).write_text(v)
        (self.group / "cgroup.procs").write_text(str(pid))

    def remove(self) -> None:
        if self.group and self.group.exists():
            with contextlib.suppress(OSError):
                self.group.rmdir()


# ---- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def gguf(tiny_dir, tmp_path_factory):
    return export_model("gguf", tiny_dir, tmp_path_factory.mktemp("device_gguf") / "tiny.gguf", max_seq_len=256)


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("device_tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def fast(tmp_path_factory):
    a = AgentProc(tmp_path_factory.mktemp("agents"), "fast", "0").start()
    yield a
    a.stop()


@pytest.fixture(scope="session")
def second(tmp_path_factory):
    a = AgentProc(tmp_path_factory.mktemp("agents"), "second", "1").start()
    yield a
    a.stop()


@pytest.fixture(scope="session")
def slow(tmp_path_factory):
    quota = CpuQuota(10)
    if quota.group is None:
        pytest.skip("no writable cgroup cpu controller here to make a slower device")
    a = AgentProc(tmp_path_factory.mktemp("agents"), "slow", "1").start(quota=quota)
    yield a
    a.stop()
    quota.remove()


def tg_median_ts(records) -> float:
    (tg,) = [r for r in records if r["n_gen"]]
    return tg["median_ts"]


# ---- bench --device ----------------------------------------------------------------------------------
def test_bench_on_device_matches_local_and_names_the_device(fast, gguf, tmp_path, capsys):
    remote, local = tmp_path / "remote.json", tmp_path / "local.json"
    assert edge(["bench", str(gguf), *BENCH, "--device", fast.url, "--device-token-file", str(fast.token_file),
                 "--json", str(remote)]) == 0
    out = capsys.readouterr().out
    assert "| tiny.gguf" in out and "pp32" in out and "tg32" in out  # the same table as a local run
    assert edge(["bench", str(gguf), *BENCH, "--json", str(local)]) == 0
    remote_records, local_records = json.loads(remote.read_text()), json.loads(local.read_text())
    assert [r["test"] for r in remote_records] == [r["test"] for r in local_records] == ["pp32", "tg32"]
    for r, l in zip(remote_records, local_records):
        assert set(l) <= set(r), "a device record has every field of a local one"
        assert r["model_filename"] == str(gguf) and r["model_size"] == l["model_size"]
        d = r["device"]
        assert d["url"] == fast.url and d["name"] == "fast" and d["cpus"] == [0]
        assert d["engines"][".gguf"].startswith("llama-cpp-python ") and d["cpu_model"] and d["cores"] >= 1
        assert isinstance(d["isa"], list)
        assert "before" in d and "after" in d
        # same machine, same artifact: within noise (a loose bound: this 2-core machine is shared)
        ratio = r["median_ts"] / l["median_ts"]
        assert 0.4 < ratio < 2.5, f"{r['test']}: device/local = {ratio:.2f}"
    print(f"device/local t/s ratio: " + ", ".join(
        f"{r['test']} {r['median_ts'] / l['median_ts']:.2f}" for r, l in zip(remote_records, local_records)))
    # the second benchmark of the same file finds it in the agent's cache
    t = fast.transport()
    t.bench([gguf], n_prompt=8, n_gen=0, repetitions=1)
    assert (t.uploads, t.cache_hits) == (0, 1)
    t.close()


def test_a_slower_device_shows_a_slower_decode_and_a_different_front(fast, slow, gguf, tokenizer_file, tmp_path):
    opts = dict(n_prompt=0, n_gen=32, repetitions=3)
    f, s = fast.transport(), slow.transport()
    fast_ts, slow_ts = tg_median_ts(f.bench([gguf], **opts)), tg_median_ts(s.bench([gguf], **opts))
    print(f"decode t/s: fast agent {fast_ts:.1f}, slow agent (1 CPU, 10% quota) {slow_ts:.1f}")
    assert slow_ts < fast_ts / 2, (fast_ts, slow_ts)
    # the search's first candidate (the first LFM2 layout), measured on both devices: one export
    budgets = [parse_budget("prefill_ms@64=100000"), parse_budget("decode_ms@64=1000")]
    settings = measure_settings_for(budgets, target="gguf", threads=1)
    config = suggest(optuna.trial.FixedTrial(seed_params("tiny")[0]), "tiny", 1024).to_config()
    work = tmp_path / "candidate"
    fast_ms = summary(measure(config, tokenizer_file, settings, work, keep=True, transport=f), settings)["decode_ms"]
    slow_ms = summary(s.measure_candidate(work / "model.gguf", settings), settings)["decode_ms"]
    assert slow_ms > 3 * fast_ms, (fast_ms, slow_ms)
    # a decode budget between the two: feasible on the fast device only
    limit = math.sqrt(fast_ms * slow_ms)
    fronts = {}
    for agent in (fast, slow):
        out = tmp_path / agent.name
        code = edge([*SEARCH, "--budget", "prefill_ms@64=100000", "--budget", f"decode_ms@64={limit:.4f}",
                     "--trials", "1", "--out", str(out), "--tokenizer", str(tokenizer_file),
                     "--device", agent.url, "--device-token-file", str(agent.token_file)])
        fronts[agent.name] = (code, json.loads((out / "front.json").read_text())["front"])
        (row,) = json.loads((out / "trials.json").read_text())
        assert row["device"] == agent.url and row["measurement"]["device"]["name"] == agent.name
    assert fronts["fast"][0] == 0 and len(fronts["fast"][1]) == 1
    assert fronts["slow"] == (1, []), "over budget on the slow device: no front, exit 1"
    f.close(), s.close()


# ---- search --device ---------------------------------------------------------------------------------
def test_two_devices_serve_one_search_and_each_candidate_is_measured_once(fast, second, tokenizer_file, tmp_path):
    before = {a.name: a.info()["measurements"] for a in (fast, second)}
    out = tmp_path / "search"
    assert edge([*SEARCH, "--budget", "prefill_ms@64=100000", "--budget", "decode_ms@64=1000", "--trials", "3",
                 "--out", str(out), "--tokenizer", str(tokenizer_file), "--device", fast.url, "--device", second.url,
                 "--device-token-file", str(fast.token_file), "--drift-every", "2"]) == 0
    rows = json.loads((out / "trials.json").read_text())
    assert len(rows) == 3 and all("figures" in r for r in rows)
    assert {r["device"] for r in rows} == {fast.url, second.url}, "both devices were kept busy"
    for r in rows:
        assert r["measurement"]["device"]["url"] == r["device"]
        assert r["measurement"]["device"]["cpus"] == ([0] if r["device"] == fast.url else [1])
    hashes = [json.loads(line)["hash"] for line in (out / "measurements.jsonl").read_text().splitlines()]
    assert len(hashes) == len(set(hashes)) == 3, "every candidate measured once"
    # the drift reference: measured first on each device (ratio 1), again after every 2 candidates there
    drift = [json.loads(line) for line in (out / "drift.jsonl").read_text().splitlines()]
    for url in (fast.url, second.url):
        assert [d["ratio"] for d in drift if d["device"] == url][0] == 1.0
    assert all(r["drift"]["ratio"] > 0 for r in rows)
    done = sum(a.info()["measurements"] - before[a.name] for a in (fast, second))
    assert done == 3 + len(drift)


# ---- security ----------------------------------------------------------------------------------------
def test_agent_refuses_to_start_without_a_token(tmp_path, capsys):
    assert edge(["device", "serve", "--cache", str(tmp_path)]) == 1
    assert "needs a token" in capsys.readouterr().err
    assert edge(["device", "serve", "--no-token", "--host", "0.0.0.0", "--cache", str(tmp_path)]) == 1
    assert "only on a loopback address" in capsys.readouterr().err


def test_token_required_and_compared(fast, gguf):
    sha = hashlib.sha256(gguf.read_bytes()).hexdigest()
    for token in (None, "wrong", TOKEN[:-1]):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        assert httpx.get(fast.url + "/info", headers=headers).status_code == 401
        assert httpx.head(f"{fast.url}/artifacts/{sha}", headers=headers).status_code == 401
        assert httpx.put(f"{fast.url}/artifacts/{sha}", headers=headers, content=b"x").status_code == 401
        assert httpx.post(f"{fast.url}/measure", headers=headers, json={}).status_code == 401
    t = DeviceTransport(fast.url, "wrong")
    with pytest.raises(Exception, match="refused the token"):
        t.info()


def test_search_checks_its_devices_before_it_starts(fast, tmp_path, tokenizer_file, capsys, monkeypatch):
    dead = f"http://127.0.0.1:{free_port()}"
    for device, token, message in ((dead, TOKEN, "connection failed"), (fast.url, "wrong", "refused the token")):
        monkeypatch.setenv("EDGE_DEVICE_TOKEN", token)
        assert edge([*SEARCH, "--budget", "decode_ms@64=1", "--trials", "1", "--out", str(tmp_path),
                     "--tokenizer", str(tokenizer_file), "--device", device]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


@pytest.fixture(scope="module")
def strict(tmp_path_factory, gguf):
    limit_mb = 1.5 * gguf.stat().st_size / 2**20  # the tiny model fits, twice its size does not
    a = AgentProc(tmp_path_factory.mktemp("agents"), "strict", "0", "--max-artifact-mb", f"{limit_mb:.3f}",
                  "--queue", "1", "--cooldown-s", "0.2", "--cool-below", "200").start()
    yield a
    a.stop()


def auth():
    return {"Authorization": f"Bearer {TOKEN}"}


def cached(agent) -> list[str]:
    return sorted(p.name for p in (agent.cache / "artifacts").iterdir())


def test_oversized_upload_refused_before_it_is_read(strict, gguf):
    sha = "0" * 64
    # headers only, announcing 5 GiB: the answer comes without the agent waiting for a byte of the body
    with socket.create_connection(("127.0.0.1", strict.port), timeout=10) as s:
        s.sendall(f"PUT /artifacts/{sha} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                  f"Content-Length: {5 * 2**30}\r\n\r\n".encode())
        answer = b""
        while b"max-artifact-mb" not in answer and (chunk := s.recv(4096)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"max-artifact-mb" in answer
    big = os.urandom(2 * gguf.stat().st_size)
    try:  # the agent answers before reading, so the client may see its write cut off instead
        r = httpx.put(f"{strict.url}/artifacts/{hashlib.sha256(big).hexdigest()}", headers=auth(), content=big)
        assert r.status_code == 413
    except (httpx.WriteError, httpx.RemoteProtocolError):
        pass
    assert cached(strict) == [] and list((strict.cache / "incoming").iterdir()) == []


def test_bad_sha256_refused_and_nothing_stored(strict, gguf):
    data = gguf.read_bytes()
    claimed = hashlib.sha256(data + b"!").hexdigest()
    r = httpx.put(f"{strict.url}/artifacts/{claimed}", headers=auth(), content=data)
    assert r.status_code == 422 and "sha256 mismatch" in r.json()["error"]
    for sha in (claimed, hashlib.sha256(data).hexdigest()):
        assert httpx.head(f"{strict.url}/artifacts/{sha}", headers=auth()).status_code == 404
    assert cached(strict) == [] and list((strict.cache / "incoming").iterdir()) == []


def test_a_gguf_that_is_not_a_gguf_never_reaches_an_engine(strict, gguf, tmp_path, capsys):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a model at all" * 100)
    truncated = tmp_path / "truncated.gguf"  # a real header cut short: the magic alone is not enough
    truncated.write_bytes(gguf.read_bytes()[:4096])
    for path, reason in ((fake, "not a .gguf, .pte or .onnx"), (truncated, "not a readable GGUF")):
        assert edge(["bench", str(path), "-p", "8", "-n", "0", "-r", "1", "--device", strict.url,
                     "--device-token-file", str(strict.token_file)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and reason in err and "Traceback" not in err, err
    info = strict.info()
    assert info["measurements"] == 0 and cached(strict) == []


def test_pte_and_onnx_headers_are_checked_too(tmp_path):
    from device.artifacts import validate
    from edge.errors import EdgeError

    cases = {"pte": (b"\xff\xff\x00\x00ET12" + bytes(64), "root table offset"),
             "pte-ext": (b"\x20\x00\x00\x00ET12eh00\x18\x00\x00\x00" + (2**40).to_bytes(8, "little") + bytes(64),
                         "extended header"),
             "onnx": (b"\x08\x07" + b"\xff" * 256, "not a valid ONNX")}
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(EdgeError, match=reason):
            validate(tmp_path / name)


def test_a_client_path_or_name_never_touches_the_file_system(strict, gguf, tmp_path):
    sentinel = tmp_path / "escaped"
    for name in (f"..%2F..%2F..%2F{sentinel}", "../../x", "." * 64, "A" * 64):
        r = httpx.put(f"{strict.url}/artifacts/{name}", headers=auth(), content=b"GGUF")
        assert r.status_code in (400, 404, 405)
    r = httpx.post(f"{strict.url}/measure", headers=auth(), json={
        "kind": "bench", "artifacts": [{"sha256": f"../../{sentinel}", "suffix": ".gguf"}]})
    assert r.status_code == 400 and "not on the device" in r.json()["error"]
    r = httpx.post(f"{strict.url}/measure", headers=auth(), json={
        "kind": "bench", "artifacts": [{"sha256": "0" * 64, "suffix": "/../../x.gguf"}]})
    assert r.status_code == 400 and "suffix" in r.json()["error"]
    assert not sentinel.exists() and cached(strict) == []
    # what the host calls the file is not what the device stores: its name is the sha256
    t = strict.transport()
    records = t.bench([gguf], n_prompt=8, n_gen=0, repetitions=1)
    assert cached(strict) == [hashlib.sha256(gguf.read_bytes()).hexdigest()]
    assert records[0]["model_filename"] == str(gguf)
    assert records[0]["device"]["cooldown_s"] >= 0.2  # --cooldown-s (and --cool-below: no wait under 200 C)
    t.close()


def test_a_flood_gets_busy_and_the_agent_keeps_working(strict, gguf):
    t = strict.transport()
    sha = t.ensure(gguf)
    body = {"kind": "bench", "artifacts": [{"sha256": sha, "suffix": ".gguf"}],
            "options": {"n_prompt": 0, "n_gen": 64, "repetitions": 2}, "deadline_s": 120}
    codes = []

    def send():
        codes.append(httpx.post(f"{strict.url}/measure", headers=auth(), json=body, timeout=180).status_code)

    threads = [threading.Thread(target=send) for _ in range(6)]
    for th in threads:
        th.start()
    time.sleep(1.0)
    assert strict.get("/info").status_code == 200, "the agent answers while it measures"
    for th in threads:
        th.join()
    # --queue 1: one running, one waiting, the rest told "busy"
    assert codes.count(200) >= 2 and codes.count(503) >= 3 and set(codes) <= {200, 503}, codes
    assert tg_median_ts(t.bench([gguf], n_prompt=0, n_gen=8, repetitions=1)) > 0
    t.close()


# ---- faults ------------------------------------------------------------------------------------------
def test_a_deadline_ends_the_measurement_not_the_agent(strict, gguf, capsys):
    t = strict.transport()
    started = time.monotonic()
    with pytest.raises(Exception, match=r"bench timed out after \d+ s"):
        t.bench([gguf], n_prompt=0, n_gen=200, repetitions=1000, deadline_s=3)  # minutes of work, 3 s allowed
    assert time.monotonic() - started < 30
    assert not strict.info()["busy"]
    assert tg_median_ts(t.bench([gguf], n_prompt=0, n_gen=8, repetitions=1)) > 0
    t.close()


def test_a_full_disk_is_one_line_and_stores_nothing(gguf, tmp_path):
    cache = tmp_path / "small-disk"
    cache.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(cache)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here to fill the device's disk")
    try:
        a = AgentProc(tmp_path, "full", "0", cache=cache).start()
        try:
            t = a.transport()
            with pytest.raises(Exception, match="disk is full") as e:
                t.ensure(gguf)  # 1.5 MiB into a 1 MiB file system
            assert "\n" not in str(e.value)
            assert list((cache / "artifacts").iterdir()) == [] and list((cache / "incoming").iterdir()) == []
            assert a.info()["artifacts"] == 0, "the agent keeps serving"
            t.close()
        finally:
            a.stop()
    finally:
        subprocess.run(["umount", str(cache)], check=True)


def test_agent_killed_mid_search_loses_no_trial_and_restarts_with_its_cache(gguf, tokenizer_file, tmp_path):
    with agents(tmp_path, ("victim", "0"), ("survivor", "1")) as (victim, survivor):
        t = victim.transport()
        t.ensure(gguf)  # cached before the kill
        t.close()
        out = tmp_path / "search"
        cmd = [sys.executable, "-m", "edge.cli", *SEARCH, "--budget", "prefill_ms@64=100000", "--budget",
               "decode_ms@64=1000", "--trials", "3", "--out", str(out), "--tokenizer", str(tokenizer_file),
               "--device", victim.url, "--device", survivor.url]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_DEVICE_TOKEN": TOKEN}
        search = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not victim.info()["busy"]:  # a measurement is running on the victim
            assert search.poll() is None and time.monotonic() < deadline, search.stdout.read()
            time.sleep(0.2)
        victim.stop(signal.SIGKILL)
        log, _ = search.communicate(timeout=600)
        assert search.returncode == 0, log
        assert "re-queued" in log
        rows = json.loads((out / "trials.json").read_text())
        assert len(rows) == 3 and all("figures" in r for r in rows), "no finished trial lost"
        measured = [json.loads(line) for line in (out / "measurements.jsonl").read_text().splitlines()]
        killed = [m for m in measured if m["device"] == victim.url][-1]
        retried = [m for m in measured if m["hash"] == killed["hash"] and m["device"] == survivor.url]
        assert retried, "the interrupted candidate was measured on the other device"
        # restarted on the same cache, the agent serves what it had
        victim.start()
        t = victim.transport()
        assert t.info()["artifacts"] >= 1
        assert tg_median_ts(t.bench([gguf], n_prompt=0, n_gen=8, repetitions=1)) > 0
        assert (t.uploads, t.cache_hits) == (0, 1)
        t.close()


def test_postgres_workers_each_with_their_own_device(fast, second, tokenizer_file, tmp_path, postgres_url):
    study = f"device-{uuid.uuid4().hex[:8]}"
    outs = [tmp_path / "w0", tmp_path / "w1"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGE_DEVICE_TOKEN": TOKEN}
    procs = [subprocess.Popen([sys.executable, "-m", "edge.cli", *SEARCH, "--budget", "prefill_ms@64=100000",
                               "--budget", "decode_ms@64=1000", "--trials", "3", "--storage", postgres_url,
                               "--study", study, "--out", str(out), "--tokenizer", str(tokenizer_file),
                               "--device", agent.url], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for out, agent in zip(outs, (fast, second))]
    try:
        logs = [p.communicate(timeout=600)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], logs
        trials = finished_trials(postgres_url, study)
        assert len(trials) == 3 and {t.user_attrs["device"] for t in trials} <= {fast.url, second.url}
        hashes = [json.loads(line)["hash"] for out in outs for line in (out / "measurements.jsonl").read_text().splitlines()]
        assert len(hashes) == len(set(hashes)) == 3, "no candidate measured twice across workers and devices"
    finally:
        optuna.delete_study(study_name=study, storage=postgres_url)
