"""Artifacts of several files (an onnxruntime-genai model folder, an .onnx with external data) travel to
the agent as one content-addressed bundle (docs/design.md §14).

A bundle is an uncompressed tar, made the same way every time (members sorted, no owner, mtime 0), so the
same files always give the same sha256 and the agent's cache finds them again. Its first member,
MANIFEST, names the entry (what runtime.load opens: "." for a model folder, else the .onnx file) and
every other member's size and sha256. The agent unpacks it (in its header-check child) into a folder of
its own and accepts only what the manifest promises, member by member:
- regular files only: no links of either kind, no devices, no directories it did not derive itself;
- relative names without `..` or a leading `/`, at most MAX_DEPTH deep, at most MAX_FILES of them;
- each file's size as declared (a member over the upload's size limit never starts), its sha256 as listed;
- every .onnx passes the bounded ONNX walk, and every external-data location it names is a file of the
  bundle; a genai_config.json names a model file of the bundle.
Files are created with O_EXCL|O_NOFOLLOW under the new folder: nothing is written outside it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import tarfile
from pathlib import Path

from edge.errors import EdgeError
from edge import headers
from edge.formats.onnx import GENAI_CONFIG, is_model_folder

MANIFEST = "hybrid-edge-bundle.json"
MAX_FILES = 64
MAX_DEPTH = 4
CHUNK = 1 << 20


def is_tar(head: bytes) -> bool:
    return len(head) >= 262 and head[257:262] == b"ustar"


# ---- the host side -----------------------------------------------------------------------------------
def needs_bundle(path: Path) -> bool:
    """Whether `path` is more than one file: a model folder, or an .onnx whose tensors live in others."""
    path = Path(path)
    return is_model_folder(path) or (path.suffix == ".onnx" and path.is_file() and bool(headers.check_onnx(path).external))


def members(path: Path) -> tuple[Path, str, dict[str, Path]]:
    """(folder, entry, relative name -> file) of what a bundle of `path` carries."""
    path = Path(path)
    if path.is_dir():
        files = {p.relative_to(path).as_posix(): p for p in sorted(path.rglob("*")) if p.is_file()}
        return path, ".", files
    folder = path.parent
    files = {path.name: path}
    for location in headers.check_onnx(path).external:
        target = (folder / location).resolve()
        if not location or not target.is_relative_to(folder.resolve()) or not target.is_file():
            raise EdgeError(f"{path} names external data {location!r} that is not a file beside it; re-export it")
        files[target.relative_to(folder.resolve()).as_posix()] = target
    return folder, path.name, dict(sorted(files.items()))


def pack(path: Path, out: Path) -> None:
    """Write the bundle of `path` (a model folder or an .onnx with external data) to `out`."""
    _, entry, files = members(path)
    if len(files) > MAX_FILES:
        raise EdgeError(f"{path} has {len(files)} files; a bundle carries at most {MAX_FILES}")
    manifest = {"entry": entry, "files": {}}
    for name, file in files.items():
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        manifest["files"][name] = {"size": file.stat().st_size, "sha256": h.hexdigest()}
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        data = json.dumps(manifest, sort_keys=True).encode()
        tar.addfile(_info(MANIFEST, len(data)), io.BytesIO(data))
        for name, file in files.items():
            with open(file, "rb") as f:
                tar.addfile(_info(name, file.stat().st_size), f)


def _info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, 0o644, 0, tarfile.REGTYPE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


# ---- the agent side (runs in the header-check child) -------------------------------------------------
def unpack(tar_path: Path, into: Path, max_bytes: int) -> dict:
    """Unpack and check a bundle into the new folder `into`; returns its manifest. EdgeError (one line)
    on anything the manifest does not promise; the caller removes `into` then."""
    into.mkdir()
    total = 0
    try:
        tar = tarfile.open(tar_path, "r:")  # uncompressed only: a member's size is what the upload carried
    except (tarfile.TarError, OSError) as e:
        raise EdgeError(f"not a readable bundle: {type(e).__name__}") from None
    with tar:
        first = tar.next()
        if first is None or first.name != MANIFEST or not first.isreg() or first.size > 1 << 20:
            raise EdgeError(f"not a bundle: its first member must be {MANIFEST}")
        manifest = _manifest(tar.extractfile(first).read())
        seen = set()
        while (member := tar.next()) is not None:
            name = _safe_name(member.name)
            if not member.isreg():
                kind = "link" if member.issym() or member.islnk() else "special file"
                raise EdgeError(f"bundle member {name!r} is a {kind};"
                                " a bundle carries regular files only")
            promised = manifest["files"].get(name)
            if promised is None or name in seen:
                raise EdgeError(f"bundle member {name!r} is not in its manifest (or appears twice)")
            if member.size != promised["size"] or member.size > max_bytes - total:
                raise EdgeError(f"bundle member {name!r} is {member.size} bytes, not the {promised['size']} its manifest "
                                f"lists, or over the upload limit")
            total += member.size
            seen.add(name)
            try:
                _write(tar.extractfile(member), into, name, promised["sha256"])
            except OSError as e:  # e.g. "a/b" after a file "a": refused, never resolved
                raise EdgeError(f"bundle member {name!r} cannot be written as named ({e.strerror})") from None
        missing = set(manifest["files"]) - seen
        if missing:
            raise EdgeError(f"bundle lacks {sorted(missing)[0]!r}, which its manifest lists")
    _check_contents(into, manifest)
    (into / MANIFEST).write_text(json.dumps(manifest))  # the agent reads the entry from it
    return manifest


def _manifest(data: bytes) -> dict:
    try:
        manifest = json.loads(data)
        files, entry = manifest["files"], manifest["entry"]
        ok = (isinstance(files, dict) and 1 <= len(files) <= MAX_FILES and isinstance(entry, str)
              and all(isinstance(v, dict) and isinstance(v.get("size"), int) and v["size"] >= 0
                      and isinstance(v.get("sha256"), str) and len(v["sha256"]) == 64 for v in files.values()))
    except (ValueError, KeyError, TypeError, RecursionError):
        ok = False
    if not ok:
        raise EdgeError(f"not a bundle: {MANIFEST} is not a manifest of 1-{MAX_FILES} files with sizes and sha256")
    for name in files:
        _safe_name(name)
    if entry != "." and entry not in files:
        raise EdgeError(f"the bundle's entry {entry[:80]!r} is not one of its files")
    return manifest


def _safe_name(name: str) -> str:
    """A member name that stays inside the bundle's folder: relative, no `..`, no empty parts, shallow."""
    parts = name.split("/")
    if (not name or name.startswith("/") or "\\" in name or "\0" in name or len(parts) > MAX_DEPTH
            or any(p in ("", ".", "..") for p in parts) or posixpath.normpath(name) != name or name == MANIFEST):
        raise EdgeError(f"bundle member name {name[:80]!r} is not a plain relative path (absolute, `..`, or "
                        f"deeper than {MAX_DEPTH})")
    return name


def _write(src, into: Path, name: str, sha256: str) -> None:
    target = into.joinpath(*name.split("/"))
    target.parent.mkdir(parents=True, exist_ok=True)  # parents are plain names made here: no link to follow
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o444)
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as f:
        while block := src.read(CHUNK):
            h.update(block)
            f.write(block)
    if h.hexdigest() != sha256:
        raise EdgeError(f"bundle member {name!r} does not hash to the sha256 its manifest lists")


def _check_contents(folder: Path, manifest: dict) -> None:
    """The headers a bundle carries: every .onnx walked, its external data inside the bundle; the entry loadable."""
    files = set(manifest["files"])
    for name in files:
        if name.endswith(".onnx"):
            path = folder / name
            for location in headers.check_onnx(path).external:
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), location))
                if resolved not in files:
                    raise EdgeError(f"{name} names external data {location[:80]!r} that is not a file of the bundle")
    entry = manifest["entry"]
    if entry == ".":
        if GENAI_CONFIG not in files:
            raise EdgeError(f"a folder bundle needs {GENAI_CONFIG} (an onnxruntime-genai model folder)")
        from edge.formats.onnx import model_file

        graph = model_file(folder)
        if not graph.resolve().is_relative_to(folder.resolve()) or graph.relative_to(folder).as_posix() not in files:
            raise EdgeError(f"{GENAI_CONFIG} names a model file that is not in the bundle")
    elif not entry.endswith(".onnx"):
        raise EdgeError("a bundle's entry is a model folder or an .onnx file")
