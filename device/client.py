"""The host side of the device agent's HTTP API (`edge bench --device`, `edge search --device`).

Artifacts go by content: the client hashes a file, asks the agent whether it has that sha256 (HEAD) and
uploads it only if not, streaming it from disk. Every failure becomes one line naming the device and the
reason: `MeasureFailed` for a measurement that failed on the device (a finished, failed candidate),
`DeviceUnavailable` when the device could not be reached or dropped the connection (the search retries
that candidate on another device, or on this one when it is back).
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
from pathlib import Path

from edge.errors import EdgeError, first_line
from runtime.isolate import MeasureFailed

from .transport import Transport

TOKEN_ENV = "EDGE_DEVICE_TOKEN"
CA_ENV = "EDGE_DEVICE_CA"  # PEM file of the certificate (or its CA) an https:// agent serves
CHUNK = 1 << 20


class DeviceUnavailable(MeasureFailed):
    """The device did not answer or dropped the connection: the candidate is not at fault."""


def read_token(token_file: str | None, option: str = "--device-token-file") -> str | None:
    """The token in `token_file`, else $EDGE_DEVICE_TOKEN, else None (an agent started with --no-token).
    A token is printable ASCII without spaces: it travels in an HTTP header."""
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8", errors="replace").strip()
        except OSError as e:
            raise EdgeError(f"cannot read {option} {token_file}: {e.strerror}") from None
        where = f"{option} {token_file}"
        if not token:
            raise EdgeError(f"{where} is empty; put the agent's token in it")
    else:
        token, where = os.environ.get(TOKEN_ENV) or None, f"${TOKEN_ENV}"
    if token is not None and not re.fullmatch(r"[!-~]+", token):
        raise EdgeError(f"the token in {where} has characters other than printable ASCII (or spaces), which an "
                        "HTTP header cannot carry; use e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


class DeviceTransport(Transport):
    def __init__(self, url: str, token: str | None, *, busy_wait_s: float = 0.0, margin_s: float = 60.0):
        import httpx

        if not url.startswith(("http://", "https://")):
            raise EdgeError(f"--device {url!r} is not a URL; give http://HOST:PORT of an `edge device serve` agent")
        self.url = url.rstrip("/")
        self.label = self.url
        self.busy_wait_s = busy_wait_s  # how long a "busy" device is retried before giving up
        self.margin_s = margin_s        # beyond the measurement's own deadline, for the answer to arrive
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        verify = True  # https: the system's CAs, or the agent's own certificate from $EDGE_DEVICE_CA
        if os.environ.get(CA_ENV):
            import ssl

            try:
                verify = ssl.create_default_context(cafile=os.environ[CA_ENV])
            except (OSError, ssl.SSLError) as e:
                raise EdgeError(f"${CA_ENV} {os.environ[CA_ENV]}: not a readable PEM certificate ({e})") from None
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(30.0), verify=verify)
        self.uploads = self.cache_hits = 0
        self._hashes: dict[tuple, tuple[str, Path]] = {}  # (path, files' sizes and mtimes) -> (sha256, upload)
        self._scratch = None
        self._max_bytes: int | None = None

    # ---- HTTP, errors as one line ----
    def _request(self, method: str, path: str, *, what: str, timeout: float | None = None, **kw):
        import httpx

        try:
            r = self.http.request(method, path, timeout=timeout or self.http.timeout, **kw)
        except httpx.TimeoutException:
            raise DeviceUnavailable(f"device {self.url}: no answer to {what} in time") from None
        except httpx.TransportError as e:
            hint = (f"; give the agent's certificate with {CA_ENV}=PEM" if "CERTIFICATE_VERIFY_FAILED" in str(e) else "")
            raise DeviceUnavailable(f"device {self.url}: connection failed during {what} "
                                    f"({type(e).__name__}: {first_line(e)[:160] if str(e) else 'dropped'}){hint}") from None
        if r.status_code == 401:
            raise EdgeError(f"device {self.url} refused the token; give its token with --device-token-file F or "
                            f"the {TOKEN_ENV} environment variable")
        return r

    @staticmethod
    def _error(r) -> str:
        try:
            return r.json()["error"]
        except Exception:  # noqa: BLE001 - not our agent, or no JSON body
            return f"HTTP {r.status_code} {r.text[:160]}".strip()

    def info(self) -> dict:
        r = self._request("GET", "/info", what="the info request")
        if r.status_code != 200:
            raise DeviceUnavailable(f"device {self.url}: {self._error(r)}")
        return r.json()

    def check(self, suffix: str) -> None:
        try:
            formats = self.info()["formats"]
        except MeasureFailed as e:
            raise EdgeError(f"{e}; is `edge device serve` running there (and the SSH tunnel up)?") from None
        if suffix not in formats:
            raise EdgeError(f"device {self.url} has no engine for {suffix} files (it runs {', '.join(formats) or 'none'}); "
                            "install it there or pick another --target")

    def wait_until_reachable(self, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while True:
            try:
                self.info()
                return True
            except DeviceUnavailable:
                if time.monotonic() > end:
                    return False
                time.sleep(1.0)

    # ---- artifacts by content ----
    def ensure(self, path: Path) -> str:
        """Upload `path` unless the agent has it already; returns its sha256. A model folder or an .onnx
        with external data goes as one bundle (device/bundle.py), packed into this transport's scratch."""
        from .bundle import members, needs_bundle, pack

        path = Path(path)
        if not path.exists():
            raise EdgeError(f"{path} does not exist; give an exported artifact")
        multi = needs_bundle(path)
        if not multi and not path.is_file():
            raise EdgeError(f"{path} is neither a .gguf/.pte/.onnx file nor an onnxruntime-genai model folder")
        files = members(path)[2].values() if multi else [path]
        key = (str(path.resolve()), *((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
        if key not in self._hashes:
            upload = path
            if multi:
                if self._scratch is None:
                    self._scratch = tempfile.TemporaryDirectory(prefix="edge-bundles-")
                upload = Path(self._scratch.name) / f"{len(self._hashes)}.tar"
                pack(path, upload)
            self._hashes[key] = (file_sha256(upload), upload)
        sha, upload = self._hashes[key]
        st = upload.stat()
        r = self._request("HEAD", f"/artifacts/{sha}", what=f"the cache check of {path.name}")
        if r.status_code == 200:
            self.cache_hits += 1
            return sha
        if self._max_bytes is None:
            self._max_bytes = self.info()["max_artifact_bytes"]
        if st.st_size > self._max_bytes:  # the agent would refuse it unread; say so before sending it
            raise MeasureFailed(f"device {self.url} refused {path.name}: {st.st_size / 2**20:.1f} MiB is over its "
                                f"--max-artifact-mb {self._max_bytes / 2**20:g}")

        def chunks():
            with open(upload, "rb") as f:
                while block := f.read(CHUNK):
                    yield block

        r = self._request("PUT", f"/artifacts/{sha}", what=f"the upload of {path.name}", content=chunks(),
                          headers={"Content-Length": str(st.st_size), "Content-Type": "application/octet-stream"},
                          timeout=max(60.0, st.st_size / 2**20))  # at least 1 MiB/s
        if r.status_code not in (200, 201):
            raise MeasureFailed(f"device {self.url} refused {path.name}: {self._error(r)}")
        self.uploads += 1
        return sha

    # ---- measurements ----
    def _measure(self, body: dict, deadline_s: float, what: str) -> dict:
        end = time.monotonic() + self.busy_wait_s
        while True:
            r = self._request("POST", "/measure", json={**body, "deadline_s": deadline_s}, what=what,
                              timeout=deadline_s + self.margin_s)
            if r.status_code == 503 and time.monotonic() < end:  # busy: another host measures there
                time.sleep(min(5.0, max(0.5, end - time.monotonic())))
                continue
            if r.status_code in (503, 504):  # still busy, or the deadline passed in its queue: not the candidate's fault
                raise DeviceUnavailable(f"device {self.url}: {self._error(r)}")
            if r.status_code != 200:
                raise MeasureFailed(f"device {self.url}: {self._error(r)}")
            return r.json()

    def measure_candidate(self, artifact: Path, settings) -> dict:
        sha = self.ensure(artifact)
        answer = self._measure({"kind": "candidate", "artifacts": [{"sha256": sha, "suffix": Path(artifact).suffix}],
                                "settings": settings.to_dict()}, settings.timeout_s, "the measurement")
        result = answer["result"]
        result["device"] = {**answer["device"], "url": self.url}
        return result

    def bench(self, artifacts, *, progress: bool = True, deadline_s: float = 1800.0, **options) -> list[dict]:
        from edge.formats.onnx import is_model_folder

        artifacts = [Path(a) for a in artifacts]
        for a in artifacts:
            if not a.exists():
                raise EdgeError(f"{a} does not exist; give an exported artifact")
            if a.suffix not in (".gguf", ".pte", ".onnx") and not is_model_folder(a):
                raise EdgeError(f"{a}: the device agent measures .gguf, .pte or .onnx files and onnxruntime-genai "
                                f"model folders; got {a.suffix or 'another directory'}")
        shas = [self.ensure(a) for a in artifacts]
        body = {"kind": "bench", "options": options,
                "artifacts": [{"sha256": s, "suffix": ".onnx" if a.is_dir() else a.suffix} for s, a in zip(shas, artifacts)]}
        answer = self._measure(body, deadline_s, "the benchmark")
        device = {**answer["device"], "url": self.url}
        records = answer["records"]
        for r in records:  # the host's names for the files, the device's figures
            r["model_filename"] = str(artifacts[r.pop("artifact_index")])
            r["device"] = device
        return records

    def close(self) -> None:
        self.http.close()
        if self._scratch is not None:
            self._scratch.cleanup()
            self._scratch = None


def bench_on_device(url: str, token_file: str | None, artifacts, **options) -> list[dict]:
    """`edge bench --device URL`: the records, or one EdgeError line naming the device and the reason."""
    transport = DeviceTransport(url, read_token(token_file))
    try:
        return transport.bench(artifacts, **options)
    except MeasureFailed as e:
        raise EdgeError(str(e)) from None
    finally:
        transport.close()
