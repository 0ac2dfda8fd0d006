"""`edge device serve`: the agent that measures on the device the model is for (docs/design.md §4, §6, §14).

HTTP API (Starlette on uvicorn; every request needs `Authorization: Bearer TOKEN` unless started with
--no-token, which only a loopback address allows, and then only for requests whose Host names this
machine's loopback and that carry no Origin: no web page can reach it):
  GET  /info                  the device (CPU, CPUs in use, engines and versions), limits, queue state
  HEAD /artifacts/<sha256>    200 if the artifact is cached, 404 if not
  PUT  /artifacts/<sha256>    upload (Content-Length required; over the limit -> 413 before reading);
                              stored only if the digest matches and the header validates
  POST /measure               JSON {"kind": "bench"|"candidate", "artifacts": [{"sha256", "suffix"}],
                              "options"|"settings": {...}, "deadline_s": S} -> records/result + device block
One measurement runs at a time (the device is what is measured); up to --queue requests wait, later ones
get 503 "busy". A request's deadline covers its wait in the queue, the --cooldown-s pause and its child
process; a client that hangs up cancels its measurement (queued or running). At most --max-uploads
uploads at once (503 beyond). Header checks of uploads run on the CPUs outside --cpus, or, when there
are none, wait for the running measurement: they never share its CPUs, and each measurement's device
block says what ran beside it (`alongside`). Errors name files by their sha256, never by a path here.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from edge.errors import EdgeError, first_line
from edge.formats import FORMATS
from runtime.isolate import REQUEST, MeasureFailed, model_name

from .artifacts import SHA256, SUFFIXES, ArtifactStore, sniff_file

MAX_JSON_BYTES = 64 * 1024
DEFAULT_PORT = 8765
DEFAULT_CACHE = "~/.cache/hybrid-edge/device"
MIN_MEASURE_S = 1.0  # the least a deadline must leave for the measurement itself
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
log = logging.getLogger("edge.device")


# ---- request checks ----------------------------------------------------------------------------------
def _int(d: dict, key: str, lo: int, hi: int, default=None):
    v = d.get(key, default)
    if v is None and default is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise EdgeError(f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _seconds(value, what: str) -> float:
    """A finite, positive number of seconds (JSON allows 400-digit integers; float() would overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EdgeError(f"{what} must be a positive number of seconds, got {value!r}"[:200])
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not 0 < seconds < math.inf:
        raise EdgeError(f"{what} must be a positive, finite number of seconds")
    return seconds


def parse_json(body: bytes) -> dict:
    """A request body as a JSON object, or EdgeError (400) for anything the parser cannot take: not JSON,
    nested too deep (RecursionError), NaN/Infinity (not JSON, though Python's parser takes them)."""
    def constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        req = json.loads(body, parse_constant=constant)  # JSON only: nothing is unpickled or evaluated
    except (ValueError, RecursionError):
        raise EdgeError("the request body is not JSON (or nests too deep)") from None
    if not isinstance(req, dict):
        raise EdgeError("the request body must be a JSON object")
    return req


def checked_bench_options(o: dict) -> dict:
    """The options of runtime.bench.bench_artifacts the agent accepts, range-checked."""
    if not isinstance(o, dict):
        raise EdgeError("options must be an object")
    unknown = set(o) - {"n_prompt", "n_gen", "depth", "repetitions", "n_threads", "kv_cache", "seed"}
    if unknown:
        raise EdgeError(f"unknown bench options {sorted(unknown)}")
    kv = o.get("kv_cache")
    known = sorted({k for f in FORMATS.values() for k in f.kv_caches})  # the engine refuses a wrong one
    if kv is not None and (not isinstance(kv, str) or kv not in known):
        raise EdgeError(f"kv_cache must be one of {', '.join(known)}, got {kv!r}")
    return {"n_prompt": _int(o, "n_prompt", 0, 1 << 17, 512), "n_gen": _int(o, "n_gen", 0, 1 << 17, 128),
            "depth": _int(o, "depth", 0, 1 << 20, 0), "repetitions": _int(o, "repetitions", 1, 1000, 5),
            "n_threads": _int(o, "n_threads", 1, 1024, 1), "kv_cache": kv, "seed": _int(o, "seed", 0, 2**32, 0)}


def checked_settings(d: dict) -> dict:
    """A candidate's measurement protocol from a request, range-checked: the fields of the search's
    MeasureSettings that the timing child reads back from its settings file (runtime.isolate.SETTINGS)."""
    if not isinstance(d, dict):
        raise EdgeError("settings must be an object")
    prefill = d.get("prefill_tokens", [512])
    if (not isinstance(prefill, list) or not 1 <= len(prefill) <= 16
            or any(not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 1 << 17 for n in prefill)):
        raise EdgeError("prefill_tokens must be 1-16 integers in [1, 131072]")
    cv = d.get("max_cv", 0.10)
    if not isinstance(cv, (int, float)) or not 0 < cv <= 10:
        raise EdgeError("max_cv must be a number in (0, 10]")
    target = d.get("target", "gguf")
    if target not in ("gguf", "executorch", "onnx"):
        raise EdgeError(f"target must be gguf, executorch or onnx, got {target!r}")
    return {"target": target, "prefill_tokens": prefill, "decode_depth": _int(d, "decode_depth", 0, 1 << 20, 512),
            "n_gen": _int(d, "n_gen", 1, 1 << 16, 32), "repetitions": _int(d, "repetitions", 1, 1000, 3),
            "threads": _int(d, "threads", 1, 1024, 1), "max_cv": float(cv),
            "max_attempts": _int(d, "max_attempts", 1, 20, 3), "seed": _int(d, "seed", 0, 2**32, 0)}


# ---- the agent ---------------------------------------------------------------------------------------
@dataclass
class Limits:
    """What `edge device serve` takes from one client and how long it waits for it."""
    max_artifact_bytes: int = 2048 << 20
    queue: int = 4                 # measurements that may wait while one runs
    max_deadline_s: float = 1800.0
    cooldown_s: float = 0.0
    cool_below: float | None = None
    cooldown_max_s: float = 300.0
    max_uploads: int = 2           # uploads received (and checked) at once
    io_timeout_s: float = 10.0     # a request's headers, and every gap in a body
    keep_alive_s: float = 5.0      # an idle connection between requests
    max_connections: int = 32


class Stalled(Exception):
    """A client stopped sending a body for longer than io_timeout_s."""


class TooLate(Exception):
    """The deadline left no time for the measurement (queue wait, cooldown): not the artifact's fault."""


class Agent:
    def __init__(self, *, cache: Path, token: str | None, limits: Limits | None = None, name: str | None = None,
                 cpus: set[int] | None = None, spare_cpus: set[int] | None = None, hosts: set[str] | None = None):
        from . import probe

        self.store = ArtifactStore(cache)
        self.token = token.encode() if token else None
        self.limits = limits = limits or Limits()
        self.cpus, self.spare_cpus = cpus, spare_cpus or None  # measurements' CPUs; header checks' CPUs
        self.hosts = hosts  # without a token: the Host names accepted (DNS rebinding)
        self.device = probe.describe(name)
        if cpus:
            self.device["cpus"] = sorted(cpus)
        self.lock = asyncio.Lock()          # held by the running measurement (and by serialized checks)
        self.measurer = ThreadPoolExecutor(1, thread_name_prefix="measure")  # uploads never starve it
        self.checker = ThreadPoolExecutor(limits.max_uploads, thread_name_prefix="check")
        self.admitted = 0                   # measurements running or waiting
        self.uploads = 0                    # uploads in progress
        self.measurements = self.cancelled = 0
        self.totals = {"upload_bytes": 0, "header_checks": 0}  # what ran beside a measurement: the difference

    def authorized(self, request) -> bool:
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        # constant time: a wrong token's prefix is not revealed by how fast it is refused
        return hmac.compare_digest(value.strip().encode(), self.token) and scheme.lower() == "bearer"

    def foreign(self, request) -> str | None:
        """Without a token: why a request may come from a web page (its Host is not this machine's
        loopback: DNS rebinding; it carries an Origin: a browser), else None."""
        if self.hosts is None:
            return None
        if "origin" in request.headers:
            return "a request with an Origin header (from a web page) is refused by an agent without a token"
        host = re.fullmatch(r"(\[[^\]]*\]|[^:]*)(:\d+)?", request.headers.get("host", ""))
        if host is None or host.group(1).strip("[]").lower() not in self.hosts:
            return ("the Host header does not name this machine's loopback; an agent without a token answers only "
                    "http://127.0.0.1:PORT or http://localhost:PORT")
        return None

    def public(self, message: str, names: dict[str, str] | None = None) -> str:
        """A message for the client: the agent's file names replaced by the artifacts' sha256, and no
        path of this machine (children work in their folder and see bare names; this is the backstop)."""
        for name, label in (names or {}).items():
            message = message.replace(name, label)
        for root in {str(self.store.root), str(self.store.root.resolve())}:
            message = message.replace(root, "<cache>")
        return message

    # ---- handlers ----
    def app(self):
        from starlette.applications import Starlette
        from starlette.requests import ClientDisconnect
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        def error(status: int, message: str, **headers):
            return JSONResponse({"error": message}, status_code=status, headers=headers or None)

        def guarded(handler):
            async def wrapped(request):
                refused = self.foreign(request)
                if refused:
                    return error(403, refused)
                if not self.authorized(request):
                    return error(401, "missing or wrong token: send Authorization: Bearer TOKEN")
                try:
                    return await handler(request)
                except EdgeError as e:
                    return error(400, self.public(str(e)))
                except Stalled:
                    return error(408, f"the request body stalled for over {self.limits.io_timeout_s:g} s; send it "
                                 "again", Connection="close")
                except ClientDisconnect:
                    return Response(status_code=499)  # nobody is there to read it
                except Exception as e:  # noqa: BLE001 - a bug: one line for the client, the traceback in the log
                    log.exception("unexpected error in %s %s", request.method, request.url.path)
                    return error(500, f"internal error of the agent ({type(e).__name__}); see its log")
            return wrapped

        async def info(request):
            return JSONResponse({"agent": "hybrid-edge device agent", "api": 1, "device": self.device,
                                 "formats": sorted(self.device["engines"]),
                                 "max_artifact_bytes": self.limits.max_artifact_bytes,
                                 "busy": self.lock.locked(), "waiting": max(0, self.admitted - self.lock.locked()),
                                 "queue": self.limits.queue, "uploads": self.uploads,
                                 "max_uploads": self.limits.max_uploads,
                                 "header_checks_on": sorted(self.spare_cpus) if self.spare_cpus else "after measurements",
                                 "measurements": self.measurements, "cancelled": self.cancelled,
                                 "artifacts": self.store.count()})

        async def has_artifact(request):
            return Response(status_code=200 if self.store.path(request.path_params["sha"]) else 404)

        async def put_artifact(request):
            sha = request.path_params["sha"]
            if not SHA256.fullmatch(sha):
                return error(400, "the artifact name must be its sha256: 64 lowercase hex digits")
            if self.store.path(sha):
                return JSONResponse({"sha256": sha, "stored": False, "cached": True})
            length = request.headers.get("content-length", "")
            if not length.isdigit():
                return error(411, "send Content-Length (the agent checks the size before reading)")
            length = int(length)
            if length > self.limits.max_artifact_bytes:  # refused before a byte of the body is read
                return error(413, f"artifact of {length / 2**20:.1f} MiB is over this agent's "
                             f"--max-artifact-mb {self.limits.max_artifact_bytes / 2**20:g}", Connection="close")
            if self.uploads >= self.limits.max_uploads:
                return error(503, f"busy: {self.uploads} uploads in progress (--max-uploads "
                             f"{self.limits.max_uploads}); retry later", Connection="close", **{"Retry-After": "5"})
            self.uploads += 1
            tmp = self.store.new_upload()
            label = {tmp.name: f"upload {sha[:16]}..."}
            digest, size = hashlib.sha256(), 0
            try:
                with open(tmp, "wb") as f:
                    async for chunk in self.body(request):
                        size += len(chunk)
                        self.totals["upload_bytes"] += len(chunk)
                        if size > length:
                            return error(400, "the upload is longer than its Content-Length", Connection="close")
                        digest.update(chunk)
                        f.write(chunk)
                if size != length:
                    return error(400, f"the upload ended after {size} of {length} bytes; send it again")
                if digest.hexdigest() != sha:
                    return error(422, f"sha256 mismatch: the upload hashes to {digest.hexdigest()[:16]}..., not "
                                 f"{sha[:16]}...; nothing stored")
                await self.check(tmp, sha)
            except EdgeError as e:
                return error(415, f"refused: {self.public(str(e), label)}")
            except OSError as e:
                if e.errno == 28:  # ENOSPC
                    return error(507, "the device's disk is full; free space there, or start the agent with --cache "
                                 "on a larger disk")
                raise
            finally:
                tmp.unlink(missing_ok=True)
                self.uploads -= 1
            return JSONResponse({"sha256": sha, "stored": True}, status_code=201)

        async def measure(request):
            body = b""
            async for chunk in self.body(request):  # read at most the limit, whatever Content-Length says
                body += chunk
                if len(body) > MAX_JSON_BYTES:
                    return error(413, f"a measurement request is at most {MAX_JSON_BYTES} bytes of JSON",
                                 Connection="close")
            req = parse_json(body)
            deadline_s = min(_seconds(req.get("deadline_s", self.limits.max_deadline_s), "deadline_s"),
                             self.limits.max_deadline_s)
            if deadline_s < self.limits.cooldown_s + MIN_MEASURE_S:
                return error(400, f"deadline_s {deadline_s:g} leaves no time to measure after this agent's "
                             f"--cooldown-s {self.limits.cooldown_s:g} pause; give a longer one")
            deadline = time.monotonic() + deadline_s
            job = self.prepare(req)  # raises EdgeError -> 400
            if self.admitted > self.limits.queue:  # one running, `queue` waiting
                return error(503, f"busy: one measurement running and {self.admitted - 1} waiting (queue "
                             f"{self.limits.queue}); retry later", **{"Retry-After": "10"})
            self.admitted += 1
            gone = asyncio.ensure_future(self.disconnected(request))
            try:
                if not await self.first(self.lock.acquire(), gone, deadline):
                    if gone.done():
                        self.cancelled += 1
                        return Response(status_code=499)
                    return error(504, "the deadline passed while the request waited in the queue")
                try:
                    cancel = threading.Event()
                    run = asyncio.get_running_loop().run_in_executor(self.measurer, self.run, job, deadline, cancel)
                    await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
                    if not run.done():  # the client went away: stop its child now, not at its deadline
                        cancel.set()
                        with contextlib.suppress(Exception):
                            await run
                        self.cancelled += 1
                        return Response(status_code=499)
                    answer = run.result()
                except TooLate as e:
                    return error(504, str(e))
                except MeasureFailed as e:  # one line for the host, no path of this machine
                    return error(422, first_line(e))
                finally:
                    self.lock.release()
            finally:
                self.admitted -= 1
                gone.cancel()
            return JSONResponse(answer)

        routes = [Route("/info", guarded(info), methods=["GET"]),
                  Route("/artifacts/{sha}", guarded(has_artifact), methods=["HEAD", "GET"]),
                  Route("/artifacts/{sha}", guarded(put_artifact), methods=["PUT"]),
                  Route("/measure", guarded(measure), methods=["POST"])]
        return Starlette(routes=routes)

    async def body(self, request):
        """The request body's chunks; Stalled when a gap between them exceeds io_timeout_s."""
        chunks = request.stream().__aiter__()
        while True:
            try:
                chunk = await asyncio.wait_for(chunks.__anext__(), self.limits.io_timeout_s)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise Stalled from None
            yield chunk

    @staticmethod
    async def disconnected(request) -> None:
        """Returns when the client closes its connection (after the body was read)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    @staticmethod
    async def first(awaitable, gone, deadline: float) -> bool:
        """Await `awaitable` unless the client goes or the deadline passes first; True if it finished."""
        task = asyncio.ensure_future(awaitable)
        await asyncio.wait({task, gone}, timeout=max(0.0, deadline - time.monotonic()),
                           return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return True
        task.cancel()  # asyncio.Lock hands the lock on when a waiter is cancelled
        return False

    async def check(self, tmp: Path, sha: str) -> None:
        """The header check of an upload, in a child: on the spare CPUs, else after the running measurement."""
        loop = asyncio.get_running_loop()
        commit = functools.partial(self.store.commit, tmp, sha, self.limits.max_artifact_bytes)
        if self.spare_cpus:
            self.totals["header_checks"] += 1
            await loop.run_in_executor(self.checker, functools.partial(commit, cpus=self.spare_cpus))
            return
        async with self.lock:  # serialized with the measurements: it shares their CPUs
            self.totals["header_checks"] += 1
            await loop.run_in_executor(self.checker, commit)

    # ---- measurements ----
    def prepare(self, req: dict) -> dict:
        kind = req.get("kind")
        if kind not in ("bench", "candidate"):
            raise EdgeError("kind must be 'bench' or 'candidate'")
        items = req.get("artifacts")
        if not isinstance(items, list) or not 1 <= len(items) <= (1 if kind == "candidate" else 16):
            raise EdgeError("artifacts must list 1 artifact for a candidate, 1-16 for a bench")
        files = []
        for item in items:
            sha, suffix = (item.get("sha256"), item.get("suffix")) if isinstance(item, dict) else (None, None)
            if suffix not in SUFFIXES:
                raise EdgeError(f"suffix must be one of {', '.join(SUFFIXES)}, got {str(suffix)[:40]!r}")
            path = self.store.path(sha) if isinstance(sha, str) else None
            if path is None:
                raise EdgeError(f"artifact {str(sha)[:16]}... is not on the device; upload it first")
            actual = ".onnx" if path.is_dir() else sniff_file(path)  # a bundle: a model folder or .onnx + data
            if actual != suffix:
                raise EdgeError(f"artifact {sha[:16]}... is a {actual} file, not a {suffix}")
            files.append((path, suffix, sha))
        if kind == "candidate":
            settings = checked_settings(req.get("settings", {}))
            if FORMATS[settings["target"]].suffix != files[0][1]:
                raise EdgeError(f"target {settings['target']} measures {FORMATS[settings['target']].suffix} files, "
                                f"not {files[0][1]}")
            return {"kind": kind, "files": files, "settings": settings}
        return {"kind": kind, "files": files, "options": checked_bench_options(req.get("options", {}))}

    def cool_down(self, deadline: float, cancel: threading.Event) -> dict:
        """The pause before a measurement, inside its deadline: until the hottest zone is under
        --cool-below (at most --cooldown-max-s), then --cooldown-s. A hung-up client ends it."""
        from .probe import temperatures

        started = time.monotonic()
        note = {}
        if self.limits.cool_below is not None:
            until = min(started + self.limits.cooldown_max_s, deadline - self.limits.cooldown_s - MIN_MEASURE_S)
            temps = temperatures()
            if not temps:
                note["cool_below"] = "no temperature sensor exposed; waited the fixed pause only"
            while temps and max(temps.values()) >= self.limits.cool_below and time.monotonic() < until:
                if cancel.wait(min(2.0, max(0.0, until - time.monotonic()))):
                    break
                temps = temperatures()
            if temps and max(temps.values()) >= self.limits.cool_below:
                note["cool_below"] = f"still {max(temps.values()):.1f} C after {time.monotonic() - started:.0f} s"
        if self.limits.cooldown_s:
            cancel.wait(self.limits.cooldown_s)
        return {"cooldown_s": round(time.monotonic() - started, 2), **note}

    def place(self, path: Path, workdir: Path, name: str) -> str:
        """Link a cached artifact into the work folder under the agent's `name`; returns what the child
        loads there: the file, or for a bundle its entry inside the folder (a model folder, an .onnx).
        A candidate's bundle is laid out as the search's child expects it: the entry named `name`."""
        entry = self.store.entry(path)
        if entry is None:
            self.store.link(path, workdir / name)
            return name
        folder = Path(name).stem  # model0.onnx -> model0/
        self.store.link(path, workdir / folder)
        if name == model_name(".onnx") and entry != ".":  # a candidate: WORKDIR/model.onnx beside its data
            for f in (workdir / folder).iterdir():
                os.replace(f, workdir / (name if f.name == entry else f.name))
            return name
        return folder if entry == "." else f"{folder}/{entry}"

    def run(self, job: dict, deadline: float, cancel: threading.Event) -> dict:
        """One measurement, in a child process (runtime.bench's timer, runtime.isolate's runner) working
        in a fresh folder of the cache where the artifacts have the agent's names (model0.gguf...)."""
        from .probe import conditions
        from .transport import LocalTransport

        if deadline - time.monotonic() < self.limits.cooldown_s + MIN_MEASURE_S:
            raise TooLate("the deadline leaves no time to measure after the queue and the --cooldown-s pause")
        before_totals = dict(self.totals)
        cooled = self.cool_down(deadline, cancel)
        if cancel.is_set():
            raise MeasureFailed("cancelled during the cooldown")
        workdir = self.store.workdir()
        names = {}
        try:
            before = conditions(self.device["cpus"])
            remaining = deadline - time.monotonic()
            limits = {"cancel": cancel, "cpus": self.cpus}
            if job["kind"] == "candidate":
                settings = job["settings"]
                path, suffix, sha = job["files"][0]
                names[model_name(suffix)] = f"artifact {sha[:16]}..."
                self.place(path, workdir, model_name(suffix))
                out = {"result": LocalTransport.time_candidate(workdir, settings, remaining, **limits)}
            else:
                files = [self.place(path, workdir, model_name(suffix, i))
                         for i, (path, suffix, _) in enumerate(job["files"])]
                for name, (_, _, sha) in zip(files, job["files"]):
                    names[name] = f"artifact {sha[:16]}..."
                (workdir / REQUEST).write_text(json.dumps({"files": files, "options": job["options"]}))
                records = LocalTransport.bench_isolated(workdir, remaining, **limits)
                for r in records:  # the agent's names mean nothing to the host: say which artifact it was
                    r["artifact_index"] = files.index(r.pop("model_filename"))
                out = {"records": records}
            self.measurements += 1
            alongside = {k: self.totals[k] - before_totals[k] for k in self.totals}
            out["device"] = {**self.device, "before": before, "after": conditions(self.device["cpus"]), **cooled,
                             "alongside": {"upload_mib": round(alongside["upload_bytes"] / 2**20, 3),
                                           "header_checks": alongside["header_checks"],
                                           "their_cpus": sorted(self.spare_cpus) if self.spare_cpus
                                           else "the measurement's (checks waited for it)"}}
            return out
        except MeasureFailed as e:
            raise MeasureFailed(self.public(str(e), names)) from None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


# ---- the command -------------------------------------------------------------------------------------
def parse_cpus(spec: str) -> set[int]:
    """'0', '0,2', '0-3', '0-1,4' -> a set of CPU numbers."""
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise EdgeError(f"--cpus {spec!r}: give CPU numbers like 0 or 0,2 or 0-3") from None
    return cpus


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="run the device agent: receive artifacts, measure them here, answer with records",
                       description="Run on the device the model is for (laptop, board, phone through Termux). "
                       "The host measures through it with `edge bench --device URL` and `edge search --device URL`. "
                       "It binds to loopback by default: reach it from the host through an SSH tunnel or adb forward.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only; "
                   "anything else exposes a service that runs the model files it receives: it needs a token and "
                   "--tls-cert/--tls-key)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    s.add_argument("--token-file", metavar="F", help="file holding the bearer token hosts must send, printable "
                   "ASCII, at least 16 characters, readable by you alone (required unless --no-token)")
    s.add_argument("--no-token", action="store_true", help="accept requests without a token; allowed only "
                   "when --host is a loopback address, and then only from clients that name it (no web page)")
    s.add_argument("--cache", metavar="DIR", default=DEFAULT_CACHE, help="artifact cache, kept across restarts: "
                   "files named by their sha256; a new or empty folder, or one the agent made "
                   f"(default {DEFAULT_CACHE})")
    s.add_argument("--cpus", metavar="LIST", help="CPUs the measurements run on, e.g. 4-7 for the big cores "
                   "(default: all this process may use); the agent itself and the header checks of uploads run "
                   "on the others, or wait for the measurement when there are none")
    s.add_argument("--max-artifact-mb", type=float, default=2048, metavar="N", help="largest upload accepted, "
                   "in MiB; larger ones are refused before they are read (default 2048)")
    s.add_argument("--queue", type=int, default=4, metavar="N", help="requests that may wait while one "
                   "measurement runs; more get 'busy' (default 4; 0: none waits)")
    s.add_argument("--max-deadline-s", type=float, default=1800, metavar="S", help="longest a request may "
                   "take, queue wait and --cooldown-s included; a request's own deadline_s can only shorten it "
                   "(default 1800)")
    s.add_argument("--cooldown-s", type=float, default=0.0, metavar="S", help="fixed pause before every "
                   "measurement, inside its deadline (default 0)")
    s.add_argument("--cool-below", type=float, metavar="C", help="before every measurement wait until the "
                   "hottest thermal zone is below C degrees Celsius (at most --cooldown-max-s)")
    s.add_argument("--cooldown-max-s", type=float, default=300.0, metavar="S", help="longest wait for "
                   "--cool-below (default 300)")
    s.add_argument("--max-uploads", type=int, default=Limits.max_uploads, metavar="N", help="uploads received "
                   f"at once; more get 'busy' (default {Limits.max_uploads})")
    s.add_argument("--max-connections", type=int, default=Limits.max_connections, metavar="N", help="open "
                   "connections; beyond it the oldest idle one is closed (default "
                   f"{Limits.max_connections}, lowered to what the file-descriptor limit allows)")
    s.add_argument("--io-timeout-s", type=float, default=Limits.io_timeout_s, metavar="S", help="longest wait "
                   "for a request's headers and for each part of a body; idle connections close after "
                   f"{Limits.keep_alive_s:g} s (default {Limits.io_timeout_s:g})")
    s.add_argument("--tls-cert", metavar="PEM", help="serve HTTPS with this certificate (chain); required with "
                   "--tls-key for a non-loopback --host")
    s.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    s.add_argument("--name", help="device name recorded with every measurement (default: the host name)")
    s.set_defaults(func=serve)


def _finite(args, *names: str, positive: bool = False) -> None:
    for name in names:
        value = getattr(args, name.lstrip("-").replace("-", "_"))
        if value is not None and not (math.isfinite(value) and (value > 0 if positive else value >= 0)):
            raise EdgeError(f"{name} must be a {'positive' if positive else 'non-negative'} finite number, "
                            f"got {value}")


def read_agent_token(path: str) -> str:
    """The agent's token: printable ASCII (an HTTP header carries it), 16+ characters; warns (stderr) when
    the file is readable by other users."""
    from .client import read_token

    token = read_token(path, option="--token-file")
    if len(token) < 16:
        raise EdgeError(f"the token in {path} is shorter than 16 characters; use e.g. "
                        "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    mode = os.stat(path).st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        print(f"warning: the token file {path} is readable by other users (mode {stat.filemode(mode)}); "
              f"`chmod 600 {path}` keeps them from measuring on this device", file=sys.stderr, flush=True)
    return token


def serve(args) -> None:
    if args.no_token and args.token_file:
        raise EdgeError("give either --token-file or --no-token, not both")
    _finite(args, "--max-artifact-mb", "--max-deadline-s", "--io-timeout-s", positive=True)
    _finite(args, "--cooldown-s", "--cooldown-max-s", "--cool-below")
    for name in ("queue", "max_uploads", "max_connections"):
        if getattr(args, name) < (0 if name == "queue" else 1):
            raise EdgeError(f"--{name.replace('_', '-')} must be {'0 or more' if name == 'queue' else '1 or more'}")
    if not 1 <= args.port <= 65535:
        raise EdgeError(f"--port must be in 1-65535, got {args.port}")
    if args.cooldown_s + MIN_MEASURE_S > args.max_deadline_s:
        raise EdgeError(f"--cooldown-s {args.cooldown_s:g} leaves no time to measure within --max-deadline-s "
                        f"{args.max_deadline_s:g}")
    if bool(args.tls_cert) != bool(args.tls_key):
        raise EdgeError("give both --tls-cert and --tls-key, or neither")
    loopback = is_loopback(args.host)
    if args.no_token and not loopback:
        raise EdgeError(f"--no-token is allowed only on a loopback address, not {args.host}; give --token-file F")
    if not args.no_token and not args.token_file:
        raise EdgeError("the agent needs a token: --token-file F (hosts send it with --device-token-file F), or "
                        "--no-token with a loopback --host")
    if not loopback and not args.tls_cert:
        raise EdgeError(f"--host {args.host} is not a loopback address: the token would cross the network in "
                        "clear; give --tls-cert/--tls-key, or keep the loopback default and use an SSH tunnel or "
                        "adb forward (README, Device section)")
    token = read_agent_token(args.token_file) if args.token_file else None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cpus = spare = None
    if args.cpus:
        cpus = parse_cpus(args.cpus)
        if not cpus <= allowed:
            raise EdgeError(f"--cpus {args.cpus}: CPUs {sorted(cpus - allowed)} are not available here "
                            f"(available: {sorted(allowed)})")
        spare = allowed - cpus
        # the agent (its event loop, the hashing of uploads) and the header checks on the other CPUs;
        # with none left, everything shares --cpus and the checks wait for the measurements
        os.sched_setaffinity(0, spare or cpus)
    from .server import connection_cap, run

    limits = Limits(max_artifact_bytes=int(args.max_artifact_mb * 2**20), queue=args.queue,
                    max_deadline_s=args.max_deadline_s, cooldown_s=args.cooldown_s, cool_below=args.cool_below,
                    cooldown_max_s=args.cooldown_max_s, max_uploads=args.max_uploads,
                    io_timeout_s=args.io_timeout_s, max_connections=connection_cap(args.max_connections))
    cache = Path(args.cache).expanduser()
    hosts = None if token else LOOPBACK_NAMES | {args.host.lower()}
    agent = Agent(cache=cache, token=token, limits=limits, name=args.name, cpus=cpus, spare_cpus=spare, hosts=hosts)
    scheme = "https" if args.tls_cert else "http"
    print(f"edge device agent on {scheme}://{args.host}:{args.port} (cache {cache}, {agent.store.count()} artifacts; "
          f"CPUs {agent.device['cpus']}, header checks on {sorted(spare) if spare else 'the same, after measurements'}; "
          f"engines {', '.join(agent.device['engines'].values()) or 'none'}; at most {limits.max_connections} "
          "connections)", flush=True)
    ssl = {"ssl_certfile": args.tls_cert, "ssl_keyfile": args.tls_key} if args.tls_cert else None
    run(agent.app(), host=args.host, port=args.port, max_connections=limits.max_connections,
        header_timeout_s=limits.io_timeout_s, keep_alive_s=limits.keep_alive_s, ssl=ssl)
