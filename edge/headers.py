"""Bounded header readers: what is read of a .gguf, .pte or .onnx before any engine sees it
(docs/design.md §9, §14). Shared by `runtime.load` (so `edge info`, `edge run`, `edge bench`) and the
device agent's check of an upload.

A file declares counts (GGUF: keys, array items, tensors; ONNX: nested messages and fields) that a
naive reader trusts: gguf-py's reader walks an array of 2^60 declared items without reading a byte for
each and grows to gigabytes, and a protobuf of empty sub-messages costs an engine ~100 bytes of memory per
wire byte. These readers check every declared count against the bytes the file still has before
acting on it, and stop at a `Budget` of items, metadata bytes and seconds that no count in the file can
raise. Their memory is bounded by the budget, never by what the file claims.

    header = read_gguf_header(path)      # fields (key -> value), tensors; HeaderError when refused
    check_pte(path); check_onnx(path)    # structure only; check_onnx returns what it counted
    check(path) -> ".gguf"               # by the magic bytes, whatever the file is called

Messages never name the file (the agent names uploads by their sha256): callers add the path they know.
Standard library only (and gguf-py's table of quantized block sizes), so a light install reads them.
"""
from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from edge.errors import EdgeError


class HeaderError(EdgeError):
    """A header that is malformed, or that would take more than the budget to read."""


@dataclass(frozen=True)
class Budget:
    # array items (GGUF) or fields (ONNX) in all: a 262k-token vocabulary with scores, types and 500k
    # merges is ~1.3M; each item costs a reader ~60 bytes, so this bounds the reader near 130 MB
    items: int = 1 << 21
    metadata_bytes: int = 64 << 20  # GGUF key/value bytes (the largest embedded tokenizer.json is ~30 MB)
    tensors: int = 1 << 16
    depth: int = 32                 # ONNX message nesting (graphs inside attributes inside nodes)
    seconds: float = 30.0


BUDGET = Budget()


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


def check(path: Path, budget: Budget = BUDGET, external_data: bool = True) -> str:
    """The structural check of whichever format the file's first bytes name; returns its suffix.
    external_data=False refuses an ONNX file whose tensors live in other files (paths it names)."""
    suffix = sniff_file(path)
    if suffix == ".gguf":
        header = read_gguf_header(path, budget)
        if "general.architecture" not in header.fields or not header.tensors:
            raise HeaderError("not a usable GGUF file: no general.architecture key or no tensors")
    elif suffix == ".pte":
        check_pte(path, budget)
    elif suffix == ".onnx":
        counted = check_onnx(path, budget)
        if not counted.nodes:
            raise HeaderError("not a usable ONNX file: its graph has no nodes")
        if counted.external and not external_data:
            raise HeaderError("an ONNX file with external data (tensors in other files it names) is not "
                              "accepted here; send one self-contained .onnx")
    else:
        raise HeaderError("not a .gguf, .pte or .onnx file (its first bytes match none of the three formats)")
    return suffix


class _Limits:
    """The budget being spent: items, and the clock (checked every few thousand items)."""

    def __init__(self, budget: Budget, what: str):
        self.budget, self.what = budget, what
        self.items = 0
        self.end = time.monotonic() + budget.seconds

    def spend(self, n: int = 1) -> None:
        before, self.items = self.items, self.items + n
        if self.items > self.budget.items:
            raise HeaderError(f"not a readable {self.what} file: it declares more than {self.budget.items} "
                              "metadata items, over the reader's budget")
        if before >> 12 != self.items >> 12 and time.monotonic() > self.end:
            raise HeaderError(f"not a readable {self.what} file: its header took over {self.budget.seconds:g} s "
                              "to read, over the reader's budget")


class _File:
    """Sequential little-endian reads that never go past the end (or `limit`) of the file."""

    def __init__(self, f, size: int, what: str):
        self.f, self.size, self.what = f, size, what
        self.pos = 0

    def left(self) -> int:
        return self.size - self.pos

    def read(self, n: int) -> bytes:
        if n > self.left():
            raise HeaderError(f"not a readable {self.what} file: it ends {n - self.left()} bytes short of what "
                              "its header declares (truncated or corrupt)")
        data = self.f.read(n)
        self.pos += n
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt)))


# ---- GGUF --------------------------------------------------------------------------------------------
# GGUF value types (ggml/include/gguf.h): id -> struct format; 8 string, 9 array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64
DEFAULT_ALIGNMENT = 32


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    type: int
    offset: int   # absolute, in the file
    n_bytes: int


@dataclass
class GGUFHeader:
    version: int
    fields: dict = field(default_factory=dict)   # key -> int | float | bool | str | list
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    size: int = 0


def read_gguf_header(path: Path, budget: Budget = BUDGET) -> GGUFHeader:
    """Every key and tensor description of a GGUF file, read within `budget`; HeaderError if malformed.
    Checks what llama.cpp's loader trusts: declared counts fit the file, tensor data lies inside it."""
    from gguf.constants import GGML_QUANT_SIZES

    sizes = {int(t): s for t, s in GGML_QUANT_SIZES.items()}
    size = Path(path).stat().st_size
    limits = _Limits(budget, "GGUF")
    meta_left = budget.metadata_bytes
    with open(path, "rb") as f:
        r = _File(f, size, "GGUF")
        magic, version = r.read(4), r.unpack("I")[0]
        if magic != b"GGUF":
            raise HeaderError("not a readable GGUF file: it does not start with the GGUF magic")
        if version not in (2, 3):
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            raise HeaderError(f"not a readable GGUF file: version {version} " + (
                "(a big-endian GGUF; convert it on a little-endian machine)" if swapped in (2, 3) else
                "is not 2 or 3, the versions llama.cpp reads"))
        n_tensors, n_kv = r.unpack("QQ")
        # every key takes at least 12 bytes and every tensor at least 24: counts the file cannot hold
        # are refused before a loop runs on them
        if n_kv * 12 > r.left() or n_tensors * 24 > r.left():
            raise HeaderError(f"not a readable GGUF file: it declares {n_kv} keys and {n_tensors} tensors, more "
                              "than its size can hold (truncated or corrupt)")
        if n_tensors > budget.tensors:
            raise HeaderError(f"not a readable GGUF file: {n_tensors} tensors, over the reader's budget of "
                              f"{budget.tensors}")

        def string(what: str) -> str:
            nonlocal meta_left
            (n,) = r.unpack("Q")
            if n > meta_left:
                raise HeaderError(f"not a readable GGUF file: a string of {n} bytes in {what}, over the reader's "
                                  f"budget of {budget.metadata_bytes >> 20} MiB of metadata")
            meta_left -= n + 8
            data = r.read(n)
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HeaderError(f"the GGUF key {what} is unreadable ({e.reason} at byte {e.start}); the file is "
                                  "corrupt, re-export it") from None

        def value(kind: int, key: str):
            nonlocal meta_left
            if kind == _STRING:
                return string(key)
            if kind in _SCALARS:
                n = struct.calcsize(_SCALARS[kind])
                meta_left -= n
                return r.unpack(_SCALARS[kind])[0]
            if kind != _ARRAY:
                raise HeaderError(f"not a readable GGUF file: the key {key} has unknown value type {kind}")
            item, count = r.unpack("IQ")
            limits.spend(count)  # before any item is read: 2^60 items stop here
            if item == _STRING:
                if count * 8 > r.left():
                    raise HeaderError(f"not a readable GGUF file: the key {key} declares {count} strings, more "
                                      "than the file can hold (truncated or corrupt)")
                return [string(key) for _ in range(count)]
            if item not in _SCALARS:
                raise HeaderError(f"not a readable GGUF file: the key {key} is an array of type {item}, which "
                                  "no model uses")
            fmt = _SCALARS[item]
            n = count * struct.calcsize(fmt)
            if n > meta_left:
                raise HeaderError(f"not a readable GGUF file: the key {key} holds {n} bytes, over the reader's "
                                  f"budget of {budget.metadata_bytes >> 20} MiB of metadata")
            meta_left -= n
            return list(struct.unpack(f"<{count}{fmt}", r.read(n)))

        header = GGUFHeader(version=version, size=size)
        for _ in range(n_kv):
            limits.spend()
            key = string("a key name")
            (kind,) = r.unpack("I")
            if key in header.fields:
                raise HeaderError(f"not a readable GGUF file: the key {key} appears twice")
            header.fields[key] = value(kind, key)
        alignment = header.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise HeaderError(f"not a readable GGUF file: general.alignment {alignment!r} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            limits.spend()
            name = string("a tensor name")
            (n_dims,) = r.unpack("I")
            if len(name.encode()) >= GGML_MAX_NAME or not 1 <= n_dims <= GGML_MAX_DIMS:
                raise HeaderError(f"not a readable GGUF file: tensor {name[:64]!r} has a name over {GGML_MAX_NAME - 1} "
                                  f"bytes or {n_dims} dimensions (1-{GGML_MAX_DIMS})")
            shape = r.unpack(f"{n_dims}Q")
            kind, offset = r.unpack("IQ")
            if kind not in sizes:
                raise HeaderError(f"not a readable GGUF file: tensor {name} has unknown ggml type {kind}")
            block, block_bytes = sizes[kind]
            elements = 1
            for d in shape:
                elements *= d
            if shape[0] % block or offset % alignment:
                raise HeaderError(f"not a readable GGUF file: tensor {name} is misaligned (rows of {shape[0]} in "
                                  f"blocks of {block}, offset {offset} in steps of {alignment})")
            infos.append((name, tuple(shape), kind, offset, elements // block * block_bytes))
        header.data_offset = -(-r.pos // alignment) * alignment
        for name, shape, kind, offset, n_bytes in infos:
            start = header.data_offset + offset
            if start + n_bytes > size:
                raise HeaderError(f"not a readable GGUF file: tensor {name} needs bytes up to {start + n_bytes} but "
                                  f"the file has {size} (truncated or corrupt)")
            header.tensors.append(TensorInfo(name, shape, kind, start, n_bytes))
    return header


# ---- .pte --------------------------------------------------------------------------------------------
PTE_PLANS, PTE_PLAN_NAME, PTE_PLAN_BUFFERS = 1, 0, 8  # program.fbs: Program.execution_plan, ExecutionPlan fields


def check_pte(path: Path, budget: Budget = BUDGET) -> dict[str, int]:
    """ExecuTorch's extended header ("pte file format": magic eh00, header length, program size, segment
    base offset) and the flatbuffer's root within the file; then what each method's memory plan asks for
    (ExecutionPlan.non_const_buffer_sizes), which the runtime allocates when the method loads: more than
    this machine's memory is refused. Returns method name -> planned bytes. ExecuTorch's loader verifies
    the rest of the flatbuffer itself."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(32)
    root = struct.unpack_from("<I", head)[0] if len(head) >= 8 else size
    if not 8 <= root < size:  # the root table follows the 8-byte flatbuffer header, inside the file
        raise HeaderError("not a valid .pte file: its root table offset points outside the file")
    program = size
    if head[8:12] == b"eh00":
        if len(head) < 32:
            raise HeaderError("not a valid .pte file: its extended header is cut short")
        length, program, segments = struct.unpack_from("<IQQ", head, 12)
        if length < 24 or not root < program <= size or segments > size:
            raise HeaderError("not a valid .pte file: its extended header's sizes exceed the file")
    import mmap

    planned = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), program, access=mmap.ACCESS_READ) as buf:
        fb = _Flatbuffer(buf)  # the flatbuffer, mapped (segments, the weights, follow it), never copied
        plans = fb.field(root, PTE_PLANS)
        for plan in fb.tables(plans, budget.items) if plans is not None else []:
            name = fb.string(fb.field(plan, PTE_PLAN_NAME))
            sizes = fb.field(plan, PTE_PLAN_BUFFERS)
            planned[name] = sum(fb.int64s(sizes, budget.items)) if sizes is not None else 0
    memory = _physical_memory()
    for name, n in planned.items():
        if n < 0 or memory and n > memory:
            raise HeaderError(f"not a usable .pte file: its method {name!r} plans {n / 2**30:.1f} GiB of memory, "
                              f"more than this machine's {memory / 2**30:.1f} GiB")
    return planned


def _physical_memory() -> int | None:
    try:
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


class _Flatbuffer:
    """The few flatbuffer reads check_pte needs, each bounds-checked (a bad offset is a HeaderError)."""

    def __init__(self, buf: bytes):
        self.buf = buf

    def _u(self, fmt: str, pos: int):
        if not 0 <= pos <= len(self.buf) - struct.calcsize("<" + fmt):
            raise HeaderError("not a valid .pte file: an offset in its program points outside it")
        return struct.unpack_from("<" + fmt, self.buf, pos)[0]

    def field(self, table: int, index: int) -> int | None:
        """The position of a table's field `index`, None when absent."""
        vtable = table - self._u("i", table)
        if 4 + 2 * index >= self._u("H", vtable):
            return None
        offset = self._u("H", vtable + 4 + 2 * index)
        return table + offset if offset else None

    def _vector(self, pos: int, item: int, limit: int) -> tuple[int, int]:
        start = pos + self._u("I", pos)
        n = self._u("I", start)
        if n > limit or start + 4 + n * item > len(self.buf):
            raise HeaderError("not a valid .pte file: a vector in its program runs past it")
        return start + 4, n

    def tables(self, pos: int, limit: int) -> list[int]:
        start, n = self._vector(pos, 4, limit)
        return [start + 4 * i + self._u("I", start + 4 * i) for i in range(n)]

    def int64s(self, pos: int, limit: int) -> tuple[int, ...]:
        start, n = self._vector(pos, 8, limit)
        return struct.unpack_from(f"<{n}q", self.buf, start)

    def string(self, pos: int | None) -> str:
        if pos is None:
            return "?"
        start, n = self._vector(pos, 1, 1 << 16)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")


# ---- ONNX --------------------------------------------------------------------------------------------
# Every message-typed field of onnx-ml.proto (onnx 1.23): message -> {field number: message}. All of them
# are walked, so every sub-message an engine would build is counted; any other length-delimited field
# (strings, bytes, packed numbers) is skipped by its length.
_MESSAGES = {
    "Model": {7: "Graph", 8: "Entry", 14: "Entry", 20: "Training", 25: "Function", 26: "Entry"},
    "Graph": {1: "Node", 5: "Tensor", 11: "ValueInfo", 12: "ValueInfo", 13: "ValueInfo", 14: "Annotation",
              15: "Sparse", 16: "Entry"},
    "Node": {5: "Attribute", 9: "Entry", 10: "DeviceConfig"},
    "Attribute": {5: "Tensor", 6: "Graph", 10: "Tensor", 11: "Graph", 14: "Type", 15: "Type", 22: "Sparse",
                  23: "Sparse"},
    "Tensor": {3: "Entry", 13: "Entry", 16: "Entry"},
    "Sparse": {1: "Tensor", 2: "Tensor"},
    "ValueInfo": {2: "Type", 4: "Entry"},
    "Type": {1: "TensorType", 4: "ElemType", 5: "MapType", 7: "Entry", 8: "TensorType", 9: "ElemType"},
    "TensorType": {2: "Shape"},
    "ElemType": {1: "Type"},
    "MapType": {2: "Type"},
    "Shape": {1: "Entry"},
    "Annotation": {2: "Entry"},
    "Function": {7: "Node", 9: "Entry", 11: "Attribute", 12: "ValueInfo", 14: "Entry"},
    "Training": {1: "Graph", 2: "Graph", 3: "Entry", 4: "Entry"},
    "DeviceConfig": {2: "Sharding"},
    "Sharding": {3: "IntList", 4: "ShardedDim"},
    "ShardedDim": {2: "Entry"},
    "IntList": {},
    "Entry": {},  # messages of scalars and strings only (key/value pairs, opset ids, dimensions, ...)
}
# repeated integer fields, packed on the wire: one byte can become 8 bytes in memory, so every byte is
# charged as an item
_PACKED_VARINTS = {"Tensor": {1, 5, 7, 11}, "Attribute": {8}, "Sparse": {3}, "IntList": {2}, "Sharding": {2}}


@dataclass
class OnnxCount:
    nodes: int = 0
    items: int = 0
    external: list[str] = field(default_factory=list)  # external-data locations the tensors name


class _Wire:
    """Buffered reads of protobuf wire data from a file, never past a message's end."""

    CHUNK = 1 << 16

    def __init__(self, f):
        self.f = f
        self.pos, self.buf, self.buf_pos = 0, b"", 0

    def _byte(self) -> int:
        i = self.pos - self.buf_pos
        if not 0 <= i < len(self.buf):
            self.f.seek(self.pos)
            self.buf, self.buf_pos, i = self.f.read(self.CHUNK), self.pos, 0
            if not self.buf:
                raise HeaderError("not a valid ONNX file: it ends inside a field (truncated or corrupt)")
        self.pos += 1
        return self.buf[i]

    def varint(self) -> int:
        value = 0
        for shift in range(0, 70, 7):
            b = self._byte()
            value |= (b & 0x7F) << shift
            if b < 0x80:
                return value
        raise HeaderError("not a valid ONNX file: a varint runs over 10 bytes (corrupt)")

    def take(self, n: int) -> bytes:
        data = bytes(self._byte() for _ in range(n)) if n <= 64 else None
        if data is None:
            self.f.seek(self.pos)
            data = self.f.read(n)
            self.pos += n
        return data


def check_onnx(path: Path, budget: Budget = BUDGET) -> OnnxCount:
    """Walk an ONNX ModelProto's wire format without building it: every length within its message, nesting
    under budget.depth, fields under budget.items; count the nodes and collect external-data locations."""
    size = Path(path).stat().st_size
    limits = _Limits(budget, "ONNX")
    count = OnnxCount()
    with open(path, "rb") as f:
        w = _Wire(f)

        def walk(kind: str, end: int, depth: int) -> None:
            if depth > budget.depth:
                raise HeaderError(f"not a valid ONNX file: messages nested over {budget.depth} deep")
            sub = _MESSAGES[kind]
            location = None
            external = False
            while w.pos < end:
                limits.spend()
                tag = w.varint()
                number, wire = tag >> 3, tag & 7
                if number == 0:
                    raise HeaderError("not a valid ONNX file: a field numbered 0 (corrupt)")
                if wire == 0:
                    v = w.varint()
                    if kind == "Tensor" and number == 14 and v == 1:  # data_location: EXTERNAL
                        external = True
                elif wire == 1 or wire == 5:
                    w.pos += 8 if wire == 1 else 4
                elif wire == 2:
                    n = w.varint()
                    if n > end - w.pos:
                        raise HeaderError("not a valid ONNX file: a field runs past the end of its message "
                                          "(truncated or corrupt)")
                    if number in sub:
                        if sub[number] == "Node":
                            count.nodes += 1
                        if kind == "Tensor" and number == 13:
                            found = _external_location(w, w.pos + n)
                            location = location or found
                        else:
                            walk(sub[number], w.pos + n, depth + 1)
                    else:
                        if number in _PACKED_VARINTS.get(kind, ()):
                            limits.spend(n)
                        w.pos += n
                else:
                    raise HeaderError(f"not a valid ONNX file: wire type {wire} (groups are not ONNX; corrupt)")
            if w.pos != end:
                raise HeaderError("not a valid ONNX file: a field runs past the end of its message (corrupt)")
            if external or location is not None:
                count.external.append(location or "")

        walk("Model", size, 0)
    count.items = limits.items
    return count


def _external_location(w: _Wire, end: int) -> str | None:
    """The `location` value of one TensorProto.external_data entry (StringStringEntryProto key 1, value 2)."""
    key = value = None
    while w.pos < end:
        tag = w.varint()
        if tag & 7 != 2:
            raise HeaderError("not a valid ONNX file: an external_data entry is not two strings (corrupt)")
        n = w.varint()
        if n > min(end - w.pos, 4096):
            raise HeaderError("not a valid ONNX file: an external_data entry is over 4096 bytes or runs past "
                              "its message")
        text = w.take(n).decode("utf-8", errors="replace")
        key, value = (text, value) if tag >> 3 == 1 else (key, text)
    if w.pos != end:
        raise HeaderError("not a valid ONNX file: an external_data entry runs past its message (corrupt)")
    return value if key == "location" else None
