"""The agent's artifact cache: files stored under their sha256, and the checks a file passes before any
engine sees it (docs/design.md §4 "Deployment targets").

A file arrives under the sha256 the host claims; it is streamed to a temporary file while hashing, and
stored (atomic rename to `artifacts/<sha256>`) only if the digest matches, its first bytes name one of
our formats, and the format's header validates (in a child process, `python -m device.artifacts`, so a
crafted file that hangs or crashes a parser costs a child, not the agent). The client's file name is
never used: the cache is named by digests, and a measurement links the cached file into a fresh work
directory under a name of the agent's choosing (`model.gguf`). Nothing is unpickled anywhere.
"""
from __future__ import annotations

import json
import os
import re
import sys
import uuid
from pathlib import Path

from edge.errors import EdgeError
from edge import headers
from edge.formats import SUFFIXES
from edge.headers import sniff_file  # noqa: F401 - the agent's check of a request's suffix

SHA256 = re.compile(r"[0-9a-f]{64}")
SCRATCH = re.compile(r"[0-9a-f]{32}(\.partial(\.d)?)?")  # the agent's names: uploads, bundles, work folders
MARKER = ".hybrid-edge-agent-cache"  # in a cache folder the agent made (or adopted) and so may clean
LAYOUT = ("artifacts", "incoming", "work")
VALIDATE_TIMEOUT_S = 60
VALIDATE_MEMORY = 1 << 30  # the header check's address space: the readers' budgets fit well inside


def validate(path: Path, max_bytes: int) -> str:
    """Check the header of a .gguf/.pte/.onnx file without running it (the bounded readers of
    edge/headers.py, shared with runtime.load); returns its suffix. A single .onnx must be
    self-contained: external data names a path the device would open. A bundle (device/bundle.py) is
    unpacked and checked into PATH.d, and ".onnx" returned for it."""
    from . import bundle

    with open(path, "rb") as f:
        head = f.read(512)
    if bundle.is_tar(head):
        bundle.unpack(path, bundled(path), max_bytes)
        return ".onnx"
    return headers.check(path, external_data=False)


def bundled(upload: Path) -> Path:
    """Where the check unpacks a bundle upload."""
    return upload.with_name(upload.name + ".d")


def main(argv=None) -> int:
    """`python -m device.artifacts NAME MAX_BYTES`: validate one upload; prints its suffix, or the reason."""
    from runtime.isolate import child_main

    # numpy (imported with gguf-py's tables) must not reserve a thread pool's buffers under the cap
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
    name, max_bytes = (argv or sys.argv[1:])[:2]
    return child_main(lambda: print(validate(Path(name), int(max_bytes))))


# ---- the store ---------------------------------------------------------------------------------------
class ArtifactStore:
    """CACHE/artifacts/<sha256> (validated files only); CACHE/incoming/ holds uploads in progress and
    CACHE/work/ the measurements' folders. The agent owns CACHE: it refuses a non-empty folder that is
    not one of its caches, and at start it removes from incoming/ and work/ only what it names itself."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files, self.incoming, self.work = (self.root / d for d in LAYOUT)
        self._claim()
        for d in (self.files, self.incoming, self.work):
            d.mkdir(exist_ok=True)
        for d in (self.incoming, self.work):  # left by a killed agent: never trusted, never served
            for p in d.iterdir():
                if SCRATCH.fullmatch(p.name):
                    _remove(p)

    def _claim(self) -> None:
        """Make sure CACHE is ours: new, empty, marked, or an older agent's cache (its exact layout)."""
        if self.root.exists() and not self.root.is_dir():
            raise EdgeError(f"--cache {self.root} is a file; give a folder for the agent's cache")
        self.root.mkdir(parents=True, exist_ok=True)
        if (self.root / MARKER).is_file():
            return
        entries = list(self.root.iterdir())
        older = all(p.name in LAYOUT and p.is_dir() for p in entries) and all(
            (SHA256 if p.parent.name == "artifacts" else SCRATCH).fullmatch(p.name)
            for d in entries for p in d.iterdir())
        if entries and not older:
            names = ", ".join(sorted(p.name for p in entries)[:3])
            raise EdgeError(f"--cache {self.root} holds files that are not an agent cache ({names}...); the agent "
                            "deletes what it keeps there, so give an empty or new folder")
        (self.root / MARKER).write_text("hybrid-edge device agent cache: artifacts/ by sha256, incoming/ and "
                                        "work/ are scratch\n")

    def path(self, sha: str) -> Path | None:
        """The cached artifact: a file, or the folder a bundle was unpacked into."""
        if not SHA256.fullmatch(sha):
            return None
        p = self.files / sha
        return p if p.exists() else None

    def count(self) -> int:
        return sum(1 for p in self.files.iterdir() if SHA256.fullmatch(p.name))

    @staticmethod
    def entry(path: Path) -> str | None:
        """A bundle's entry (what runtime.load opens inside its folder: "." or the .onnx); None for a file."""
        from .bundle import MANIFEST

        return json.loads((path / MANIFEST).read_text())["entry"] if path.is_dir() else None

    def new_upload(self) -> Path:
        return self.incoming / f"{uuid.uuid4().hex}.partial"

    def commit(self, tmp: Path, sha: str, max_bytes: int, **limits) -> None:
        """Validate the (already hashed) upload in a child, then rename it (or the folder its bundle was
        unpacked into) into the cache. The child works in incoming/ and is given the upload's bare name,
        so its messages hold no host path; limits: run_child's (the CPUs it may use)."""
        from runtime.isolate import MeasureFailed, run_child

        unpacked = bundled(tmp)
        try:
            run_child("device.artifacts", [tmp.name, str(max_bytes)], VALIDATE_TIMEOUT_S, "header check",
                      cwd=self.incoming, memory_bytes=VALIDATE_MEMORY, **limits)
            if unpacked.is_dir():
                os.replace(unpacked, self.files / sha)
            else:
                os.chmod(tmp, 0o444)
                os.replace(tmp, self.files / sha)
        except MeasureFailed as e:
            raise EdgeError(str(e).removeprefix("header check failed: ")) from None
        finally:
            if unpacked.exists():
                _remove(unpacked)

    def workdir(self) -> Path:
        d = self.work / uuid.uuid4().hex
        d.mkdir()
        return d

    @staticmethod
    def link(src: Path, dst: Path) -> None:
        """Give a measurement its own name for a cached file (or a bundle's folder, file by file): hard
        links, else copies."""
        import shutil

        def one(a, b):
            try:
                os.link(a, b)
            except OSError:
                shutil.copyfile(a, b)

        if src.is_dir():
            shutil.copytree(src, dst, copy_function=one)
        else:
            one(src, dst)


def _remove(p: Path) -> None:
    import shutil

    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
