"""A dict checkpoint as a directory: tensors in safetensors files, structure in JSON.

Layout::

    ckptrepo-checkpoint.json     {"format": "ckptrepo.dict", "version": 1, "tree": ..., "entries": ...}
    <top-level key>.safetensors  the chunked leaves under that key, named by their full path
    data.safetensors             chunked leaves whose top-level key is not a plain file name

``entries`` holds each manifest entry without its chunk list, plus ``file``: the safetensors
file that holds its bytes. A tensor whose dtype safetensors lacks (complex, some float8) and
every ``str``/``bytes`` leaf is stored there as ``U8`` bytes; its real dtype is in the JSON.
Committing such a directory gives back the dict checkpoint's manifest, byte for byte.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .errors import FormatError
from .objects import Manifest
from .validation import parse_json

MARKER = "ckptrepo-checkpoint.json"
FORMAT_NAME = "ckptrepo.dict"
_FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,100}$")
_MAX_HEADER = 100 << 20
SAFETENSORS_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}


def file_for(path: str) -> str:
    top = path.split("/", 1)[0]
    if _FILE_RE.match(top) and f"{top}.safetensors" != MARKER:
        return f"{top}.safetensors"
    return "data.safetensors"


def _tensor_header(entry: Mapping[str, Any], size: int) -> tuple[str, list[int]]:
    if entry.get("kind") == "tensor" and entry.get("byteorder") is None:
        code = SAFETENSORS_DTYPES.get(entry["dtype"])
        if code is not None:
            return code, list(entry["shape"])
    return "U8", [size]


def layout(manifest: Manifest) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The marker document and, per safetensors file, the entry paths it holds in order."""
    files: dict[str, list[str]] = {}
    entries: dict[str, Any] = {}
    for path, entry in manifest.entries.items():
        raw = entry.fields()
        if entry.chunked:
            name = file_for(path)
            raw["file"] = name
            files.setdefault(name, []).append(path)
        entries[path] = raw
    marker = {"format": FORMAT_NAME, "version": 1, "tree": manifest.tree, "entries": entries}
    return marker, files


def safetensors_header(manifest: Manifest, paths: list[str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt", "writer": "ckptrepo"}}
    offset = 0
    for path in paths:
        entry = manifest.entries[path]
        code, shape = _tensor_header(entry.fields(), entry.size)
        header[path] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + entry.size]}
        offset += entry.size
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)  # safetensors aligns the data to 8 bytes
    return struct.pack("<Q", len(body)) + body


def export(
    manifest: Manifest,
    target: Any,
    read_entry: Callable[[str], Iterator[bytes | memoryview]],
) -> None:
    marker, files = layout(manifest)
    for name, paths in files.items():
        header = safetensors_header(manifest, paths)

        def parts(header: bytes = header, paths: list[str] = paths) -> Iterator[bytes | memoryview]:
            yield header
            for path in paths:
                yield from read_entry(path)

        target.write_file(name, parts())
    target.write_file(MARKER, iter([json.dumps(marker, sort_keys=True, indent=1).encode()]))
    target.finish()


def read_marker(raw: bytes) -> dict[str, Any]:
    doc = parse_json(raw, MARKER)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME or doc.get("version") != 1:
        raise FormatError(f"{MARKER}: not a ckptrepo dict checkpoint (format {FORMAT_NAME}, version 1)")
    if not isinstance(doc.get("entries"), dict):
        raise FormatError(f"{MARKER}: field entries must be an object")
    return doc


def parse_safetensors_header(data: memoryview, name: str) -> tuple[dict[str, Any], int]:
    """The header of a safetensors file and where its data starts."""
    if len(data) < 8:
        raise FormatError(f"{name}: too short for a safetensors file")
    (length,) = struct.unpack_from("<Q", data, 0)
    if length > _MAX_HEADER or 8 + length > len(data):
        raise FormatError(f"{name}: safetensors header claims {length} bytes")
    header = parse_json(bytes(data[8 : 8 + length]), f"{name} header")
    if not isinstance(header, dict):
        raise FormatError(f"{name}: safetensors header is not an object")
    return header, 8 + length


def entry_slice(header: Mapping[str, Any], start: int, data_len: int, path: str, name: str) -> tuple[int, int]:
    info = header.get(path)
    if not isinstance(info, dict) or not isinstance(info.get("data_offsets"), list):
        raise FormatError(f"{name}: no tensor named {path!r}")
    begin, end = info["data_offsets"]
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_len - start):
        raise FormatError(f"{name}: tensor {path!r} has offsets outside the file")
    return start + begin, start + end
