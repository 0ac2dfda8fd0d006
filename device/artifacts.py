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

import os
import re
import struct
import sys
import uuid
from pathlib import Path

from edge.errors import EdgeError
from edge.formats import SUFFIXES

SHA256 = re.compile(r"[0-9a-f]{64}")
VALIDATE_TIMEOUT_S = 120


def sniff(head: bytes) -> str | None:
    """The artifact suffix its first bytes announce, or None. GGUF starts with b"GGUF"; a .pte is a
    flatbuffer whose file identifier (bytes 4-8) is "ET" + two digits (ET12 today); an ONNX ModelProto as
    onnx serializes it starts with field 1 (ir_version, a varint: tag byte 0x08)."""
    if head[:4] == b"GGUF":
        return ".gguf"
    if len(head) >= 8 and head[4:6] == b"ET" and head[6:8].isdigit():
        return ".pte"
    if head[:1] == b"\x08":
        return ".onnx"
    return None


def sniff_file(path: Path) -> str | None:
    with open(path, "rb") as f:
        return sniff(f.read(16))


# ---- deep header checks (run in a child) --------------------------------------------------------------
def validate(path: Path) -> str:
    """Check the header of a .gguf/.pte/.onnx file without running it; returns its suffix.
    Raises EdgeError naming what is wrong."""
    suffix = sniff_file(path)
    size = path.stat().st_size
    if suffix == ".gguf":
        from gguf import GGUFReader

        try:  # gguf-py walks every key and tensor header and maps the tensor data within the file
            reader = GGUFReader(path, "r")
        except Exception as e:  # noqa: BLE001 - any parse failure is "not a valid GGUF"
            raise EdgeError(f"not a valid GGUF file: {type(e).__name__}: {str(e)[:200]}") from None
        if "general.architecture" not in reader.fields or not reader.tensors:
            raise EdgeError("not a usable GGUF file: no general.architecture key or no tensors")
    elif suffix == ".pte":
        # ExecuTorch's extended header (docs: "pte file format"): magic eh00, header length, program size,
        # segment base offset; the flatbuffer's root table offset (bytes 0-4) must fall inside the file
        with open(path, "rb") as f:
            head = f.read(32)
        root = struct.unpack_from("<I", head)[0] if len(head) >= 8 else size
        if not 8 <= root < size:  # the root table follows the 8-byte flatbuffer header, inside the file
            raise EdgeError("not a valid .pte file: its root table offset points outside the file")
        if head[8:12] == b"eh00":
            length, program, segments = struct.unpack_from("<IQQ", head, 12)
            if length < 24 or program > size or segments > size:
                raise EdgeError("not a valid .pte file: its extended header's sizes exceed the file")
    elif suffix == ".onnx":
        import onnx
        from onnx.external_data_helper import _get_all_tensors, uses_external_data

        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # noqa: BLE001
            raise EdgeError(f"not a valid ONNX file: {type(e).__name__}: {str(e)[:200]}") from None
        if not model.graph.node:
            raise EdgeError("not a usable ONNX file: its graph has no nodes")
        # external data names a file path inside the model: the device would open a path it was sent
        if any(uses_external_data(t) for t in _get_all_tensors(model)):
            raise EdgeError("ONNX files with external data are not accepted by the agent; send one self-contained .onnx")
    else:
        raise EdgeError("not a .gguf, .pte or .onnx file (its first bytes match none of the three formats)")
    return suffix


def main(argv=None) -> int:
    """`python -m device.artifacts PATH`: validate one file; prints its suffix, or the reason on stderr."""
    from runtime.isolate import child_main

    return child_main(lambda: print(validate(Path((argv or sys.argv[1:])[0]))))


# ---- the store ---------------------------------------------------------------------------------------
class ArtifactStore:
    """cache/artifacts/<sha256> (validated files only); cache/incoming/ holds uploads in progress."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.files = self.root / "artifacts"
        self.incoming = self.root / "incoming"
        self.work = self.root / "work"
        for d in (self.files, self.incoming, self.work):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.incoming, self.work):  # left by a killed agent: never trusted, never served
            for p in d.iterdir():
                _remove(p)

    def path(self, sha: str) -> Path | None:
        if not SHA256.fullmatch(sha):
            return None
        p = self.files / sha
        return p if p.is_file() else None

    def count(self) -> int:
        return sum(1 for p in self.files.iterdir() if SHA256.fullmatch(p.name))

    def new_upload(self) -> Path:
        return self.incoming / f"{uuid.uuid4().hex}.partial"

    def commit(self, tmp: Path, sha: str) -> None:
        """Validate the (already hashed) upload in a child, then rename it into the cache."""
        from runtime.isolate import MeasureFailed, run_child

        try:
            run_child("device.artifacts", [str(tmp)], VALIDATE_TIMEOUT_S, "header check")
        except MeasureFailed as e:
            raise EdgeError(str(e).removeprefix("header check failed: ")) from None
        os.chmod(tmp, 0o444)
        os.replace(tmp, self.files / sha)

    def workdir(self) -> Path:
        d = self.work / uuid.uuid4().hex
        d.mkdir()
        return d

    @staticmethod
    def link(src: Path, dst: Path) -> None:
        """Give a measurement its own name for a cached file: a hard link, else a copy."""
        try:
            os.link(src, dst)
        except OSError:
            import shutil
            shutil.copyfile(src, dst)


def _remove(p: Path) -> None:
    import shutil

    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
