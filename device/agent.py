"""`edge device serve`: the agent that measures on the device the model is for (docs/design.md §4, §6).

HTTP API (Starlette on uvicorn; every request needs `Authorization: Bearer TOKEN` unless started with
--no-token, which only a loopback address allows):
  GET  /info                  the device (CPU, CPUs in use, engines and versions), limits, queue state
  HEAD /artifacts/<sha256>    200 if the artifact is cached, 404 if not
  PUT  /artifacts/<sha256>    upload (Content-Length required; over the limit -> 413 before reading);
                              stored only if the digest matches and the header validates
  POST /measure               JSON {"kind": "bench"|"candidate", "artifacts": [{"sha256", "suffix"}],
                              "options"|"settings": {...}, "deadline_s": S} -> records/result + device block
One measurement runs at a time (the device is what is measured); up to --queue requests wait, later ones
get 503 "busy". A request's deadline covers its wait in the queue and its child process.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import os
import shutil
import time
from pathlib import Path

from edge.errors import EdgeError, first_line
from edge.formats import FORMATS
from runtime.isolate import REQUEST, model_name

from .artifacts import SHA256, SUFFIXES, ArtifactStore, sniff_file

MAX_JSON_BYTES = 64 * 1024
DEFAULT_PORT = 8765
DEFAULT_CACHE = "~/.cache/hybrid-edge/device"


# ---- request checks ----------------------------------------------------------------------------------
def _int(d: dict, key: str, lo: int, hi: int, default=None):
    v = d.get(key, default)
    if v is None and default is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise EdgeError(f"{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


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
class Agent:
    def __init__(self, *, cache: Path, token: str | None, max_artifact_bytes: int, queue: int,
                 max_deadline_s: float, cooldown_s: float = 0.0, cool_below: float | None = None,
                 cooldown_max_s: float = 300.0, name: str | None = None):
        from . import probe

        self.store = ArtifactStore(cache)
        self.token = token.encode() if token else None
        self.max_bytes = max_artifact_bytes
        self.queue = queue
        self.max_deadline_s = max_deadline_s
        self.cooldown_s, self.cool_below, self.cooldown_max_s = cooldown_s, cool_below, cooldown_max_s
        self.device = probe.describe(name)
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.measurements = 0

    def authorized(self, request) -> bool:
        if self.token is None:
            return True
        given = request.headers.get("authorization", "")
        scheme, _, value = given.partition(" ")
        # constant time: a wrong token's prefix is not revealed by how fast it is refused
        return hmac.compare_digest(value.strip().encode(), self.token) and scheme.lower() == "bearer"

    # ---- handlers ----
    def app(self):
        from starlette.applications import Starlette
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        def error(status: int, message: str, **headers):
            return JSONResponse({"error": message}, status_code=status, headers=headers or None)

        def guarded(handler):
            async def wrapped(request):
                if not self.authorized(request):
                    return error(401, "missing or wrong token: send Authorization: Bearer TOKEN")
                try:
                    return await handler(request)
                except EdgeError as e:
                    return error(400, str(e))
            return wrapped

        async def info(request):
            return JSONResponse({"agent": "hybrid-edge device agent", "api": 1, "device": self.device,
                                 "formats": sorted(self.device["engines"]), "max_artifact_bytes": self.max_bytes,
                                 "busy": self.lock.locked(), "waiting": self.waiting, "queue": self.queue,
                                 "measurements": self.measurements, "artifacts": self.store.count()})

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
            if int(length) > self.max_bytes:  # refused before a byte of the body is read
                return error(413, f"artifact of {int(length) / 2**20:.1f} MiB is over this agent's "
                             f"--max-artifact-mb {self.max_bytes / 2**20:g}")
            tmp = self.store.new_upload()
            digest, size = hashlib.sha256(), 0
            try:
                with open(tmp, "wb") as f:
                    async for chunk in request.stream():
                        size += len(chunk)
                        if size > int(length):
                            return error(400, "the upload is longer than its Content-Length")
                        digest.update(chunk)
                        f.write(chunk)
                if size != int(length):
                    return error(400, f"the upload ended after {size} of {length} bytes; send it again")
                if digest.hexdigest() != sha:
                    return error(422, f"sha256 mismatch: the upload hashes to {digest.hexdigest()[:16]}..., not "
                                 f"{sha[:16]}...; nothing stored")
                await asyncio.to_thread(self.store.commit, tmp, sha)
            except EdgeError as e:
                return error(415, f"refused: {e}")
            except OSError as e:
                if e.errno == 28:  # ENOSPC
                    return error(507, f"the device's disk is full ({self.store.root}); free space or use --cache elsewhere")
                raise
            finally:
                tmp.unlink(missing_ok=True)
            return JSONResponse({"sha256": sha, "stored": True}, status_code=201)

        async def measure(request):
            body = b""
            async for chunk in request.stream():  # read at most the limit, whatever Content-Length says
                body += chunk
                if len(body) > MAX_JSON_BYTES:
                    return error(413, f"a measurement request is at most {MAX_JSON_BYTES} bytes of JSON")
            try:
                req = json.loads(body)  # JSON only: nothing a client sends is unpickled or evaluated
            except ValueError:
                return error(400, "the request body is not JSON")
            if not isinstance(req, dict):
                return error(400, "the request body must be a JSON object")
            deadline_s = req.get("deadline_s", self.max_deadline_s)
            if not isinstance(deadline_s, (int, float)) or deadline_s <= 0:
                return error(400, "deadline_s must be a positive number of seconds")
            deadline = time.monotonic() + min(float(deadline_s), self.max_deadline_s)
            job = self.prepare(req)  # raises EdgeError -> 400
            if self.waiting >= self.queue:
                return error(503, f"busy: one measurement running and {self.waiting} waiting (queue "
                             f"{self.queue}); retry later", **{"Retry-After": "10"})
            self.waiting += 1
            try:
                await asyncio.wait_for(self.lock.acquire(), timeout=max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return error(504, "the deadline passed while the request waited in the queue")
            finally:
                self.waiting -= 1
            try:
                answer = await asyncio.to_thread(self.run, job, deadline)
            except Exception as e:  # noqa: BLE001 - MeasureFailed and the like: one line for the host
                return error(422, first_line(e))
            finally:
                self.lock.release()
            return JSONResponse(answer)

        routes = [Route("/info", guarded(info), methods=["GET"]),
                  Route("/artifacts/{sha}", guarded(has_artifact), methods=["HEAD", "GET"]),
                  Route("/artifacts/{sha}", guarded(put_artifact), methods=["PUT"]),
                  Route("/measure", guarded(measure), methods=["POST"])]
        return Starlette(routes=routes)

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
                raise EdgeError(f"suffix must be one of {', '.join(SUFFIXES)}, got {suffix!r}")
            path = self.store.path(sha) if isinstance(sha, str) else None
            if path is None:
                raise EdgeError(f"artifact {str(sha)[:16]}... is not on the device; upload it first")
            actual = sniff_file(path)
            if actual != suffix:
                raise EdgeError(f"artifact {sha[:16]}... is a {actual} file, not a {suffix}")
            files.append((path, suffix))
        if kind == "candidate":
            settings = checked_settings(req.get("settings", {}))
            if FORMATS[settings["target"]].suffix != files[0][1]:
                raise EdgeError(f"target {settings['target']} measures {FORMATS[settings['target']].suffix} files, "
                                f"not {files[0][1]}")
            return {"kind": kind, "files": files, "settings": settings}
        return {"kind": kind, "files": files, "options": checked_bench_options(req.get("options", {}))}

    def cool_down(self) -> dict:
        """Optional pause before a measurement: until the hottest zone is under --cool-below, then --cooldown-s."""
        from .probe import temperatures

        started = time.monotonic()
        note = {}
        if self.cool_below is not None:
            temps = temperatures()
            if not temps:
                note["cool_below"] = "no temperature sensor exposed; waited the fixed pause only"
            while temps and max(temps.values()) >= self.cool_below and time.monotonic() - started < self.cooldown_max_s:
                time.sleep(2.0)
                temps = temperatures()
            if temps and max(temps.values()) >= self.cool_below:
                note["cool_below"] = f"still {max(temps.values()):.1f} C after {self.cooldown_max_s:g} s"
        if self.cooldown_s:
            time.sleep(self.cooldown_s)
        return {"cooldown_s": round(time.monotonic() - started, 2), **note}

    def run(self, job: dict, deadline: float) -> dict:
        """One measurement, in a child process (runtime.bench's timer, runtime.isolate's runner)."""
        from runtime.isolate import MeasureFailed

        from .probe import conditions
        from .transport import LocalTransport

        cooled = self.cool_down()
        workdir = self.store.workdir()
        try:
            before = conditions()
            remaining = deadline - time.monotonic()
            if remaining <= 1:
                raise MeasureFailed("the deadline passed before the measurement could start")
            if job["kind"] == "candidate":
                settings = job["settings"]
                self.store.link(job["files"][0][0], workdir / model_name(FORMATS[settings["target"]].suffix))
                out = {"result": LocalTransport.time_candidate(workdir, settings, remaining)}
            else:
                names = [model_name(suffix, i) for i, (_, suffix) in enumerate(job["files"])]
                for (path, _), name in zip(job["files"], names):
                    self.store.link(path, workdir / name)
                (workdir / REQUEST).write_text(json.dumps({"files": names, "options": job["options"]}))
                records = LocalTransport().bench_isolated(workdir, remaining)
                for r in records:  # the agent's paths mean nothing to the host: say which artifact it was
                    r["artifact_index"] = names.index(Path(r.pop("model_filename")).name)
                out = {"records": records}
            self.measurements += 1
            out["device"] = {**self.device, "before": before, "after": conditions(), **cooled}
            return out
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
                       "It binds to loopback by default: reach it from the host through an SSH tunnel.")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only; "
                   "anything else exposes a service that runs the model files it receives: require a token)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    s.add_argument("--token-file", metavar="F", help="file holding the bearer token hosts must send "
                   "(required unless --no-token)")
    s.add_argument("--no-token", action="store_true", help="accept requests without a token; allowed only "
                   "when --host is a loopback address")
    s.add_argument("--cache", metavar="DIR", default=DEFAULT_CACHE, help="artifact cache, kept across restarts: "
                   f"files named by their sha256 (default {DEFAULT_CACHE})")
    s.add_argument("--cpus", metavar="LIST", help="CPUs the measurements may run on, e.g. 4-7 for the big "
                   "cores (default: all this process may use)")
    s.add_argument("--max-artifact-mb", type=float, default=2048, metavar="N", help="largest upload accepted, "
                   "in MiB; larger ones are refused before they are read (default 2048)")
    s.add_argument("--queue", type=int, default=4, metavar="N", help="requests that may wait while one "
                   "measurement runs; more get 'busy' (default 4)")
    s.add_argument("--max-deadline-s", type=float, default=1800, metavar="S", help="longest a request may "
                   "take, queue wait included; a request's own deadline_s can only shorten it (default 1800)")
    s.add_argument("--cooldown-s", type=float, default=0.0, metavar="S", help="fixed pause before every "
                   "measurement (default 0)")
    s.add_argument("--cool-below", type=float, metavar="C", help="before every measurement wait until the "
                   "hottest thermal zone is below C degrees Celsius (at most --cooldown-max-s)")
    s.add_argument("--cooldown-max-s", type=float, default=300.0, metavar="S", help="longest wait for "
                   "--cool-below (default 300)")
    s.add_argument("--name", help="device name recorded with every measurement (default: the host name)")
    s.set_defaults(func=serve)


def serve(args) -> None:
    if args.no_token and args.token_file:
        raise EdgeError("give either --token-file or --no-token, not both")
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip()
        except OSError as e:
            raise EdgeError(f"cannot read --token-file {args.token_file}: {e.strerror}") from None
        if len(token) < 16:
            raise EdgeError(f"the token in {args.token_file} is shorter than 16 characters; use e.g. "
                            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    elif not args.no_token:
        raise EdgeError("the agent needs a token: --token-file F (hosts send it with --device-token-file F), or "
                        "--no-token with a loopback --host")
    elif not is_loopback(args.host):
        raise EdgeError(f"--no-token is allowed only on a loopback address, not {args.host}; give --token-file F")
    if not 1 <= args.port <= 65535:
        raise EdgeError(f"--port must be in 1-65535, got {args.port}")
    if args.max_artifact_mb <= 0 or args.queue < 0 or args.max_deadline_s <= 0 or args.cooldown_s < 0:
        raise EdgeError("--max-artifact-mb and --max-deadline-s must be positive, --queue and --cooldown-s not negative")
    if args.cpus:
        cpus = parse_cpus(args.cpus)
        allowed = os.sched_getaffinity(0)
        if not cpus <= allowed:
            raise EdgeError(f"--cpus {args.cpus}: CPUs {sorted(cpus - allowed)} are not available here "
                            f"(available: {sorted(allowed)})")
        os.sched_setaffinity(0, cpus)  # the measuring children inherit it
    cache = Path(args.cache).expanduser()
    agent = Agent(cache=cache, token=token, max_artifact_bytes=int(args.max_artifact_mb * 2**20), queue=args.queue,
                  max_deadline_s=args.max_deadline_s, cooldown_s=args.cooldown_s, cool_below=args.cool_below,
                  cooldown_max_s=args.cooldown_max_s, name=args.name)
    import uvicorn

    print(f"edge device agent on http://{args.host}:{args.port} (cache {cache}, {agent.store.count()} artifacts; "
          f"CPUs {agent.device['cpus']}; engines {', '.join(agent.device['engines'].values()) or 'none'})", flush=True)
    uvicorn.run(agent.app(), host=args.host, port=args.port, log_level="warning", access_log=False)

