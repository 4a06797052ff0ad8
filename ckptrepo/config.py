"""config.yaml: format version, chunking, compression, retention defaults and remotes."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from .codec import CodingPolicy
from .errors import ConfigError, FormatError
from .validation import validate

CONFIG_KEY = "config.yaml"


@dataclass(frozen=True, slots=True)
class Chunking:
    # Fixed boundaries inside each tensor: 16 MiB keeps object counts low for large models
    # while a small tensor (bias, norm) stays one chunk (docs/format.md, "Chunk sizes").
    tensor_chunk_size: int = 16 << 20
    # Content-defined chunking of files in directory checkpoints.
    file_min_size: int = 256 << 10
    file_avg_size: int = 1 << 20
    file_max_size: int = 4 << 20
    # Entries of at most this many bytes (biases, norms, small files) are held inline in the
    # manifest instead of one object file each: on a 1 GiB state they are 0.1% of the bytes
    # and most of the files. 0 stores every entry as objects (docs/format.md, "Inline chunks").
    inline_max_size: int = 4096


@dataclass(frozen=True, slots=True)
class Remote:
    uri: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    chunking: Chunking = Chunking()
    compression: CodingPolicy = CodingPolicy()
    retention: dict[str, Any] = field(default_factory=dict)
    remotes: dict[str, Remote] = field(default_factory=dict)

    def to_document(self) -> dict[str, Any]:
        c, z = self.chunking, self.compression
        doc: dict[str, Any] = {
            "format": 1,
            "chunking": {
                "tensor_chunk_size": c.tensor_chunk_size,
                "file_min_size": c.file_min_size,
                "file_avg_size": c.file_avg_size,
                "file_max_size": c.file_max_size,
                "inline_max_size": c.inline_max_size,
            },
            "compression": {
                "level": z.level,
                "planes": z.planes,
                "fast_planes": z.fast_planes,
                "delta": z.delta,
                "context_coding": z.context_coding,
                "max_delta_chain": z.max_delta_chain,
                "min_saving": z.min_saving,
            },
        }
        if self.retention:
            doc["retention"] = dict(self.retention)
        if self.remotes:
            doc["remotes"] = {
                name: ({"uri": r.uri, "options": r.options} if r.options else {"uri": r.uri})
                for name, r in sorted(self.remotes.items())
            }
        return doc

    def dump(self) -> bytes:
        header = "# ckptrepo repository config; see docs/format.md\n"
        body: str = yaml.safe_dump(self.to_document(), sort_keys=False)
        return (header + body).encode()

    @classmethod
    def load(cls, raw: bytes, where: str) -> Config:
        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: not valid YAML: {exc}") from None
        try:
            validate(doc, "config", where)
        except FormatError as exc:
            raise ConfigError(str(exc)) from None
        c, z = doc["chunking"], doc["compression"]
        if not c["file_min_size"] <= c["file_avg_size"] <= c["file_max_size"]:
            raise ConfigError(f"{where}: chunking needs file_min_size <= file_avg_size <= file_max_size")
        defaults = CodingPolicy()
        policy = CodingPolicy(
            level=z["level"], planes=z["planes"], fast_planes=z.get("fast_planes", defaults.fast_planes),
            delta=z["delta"], max_delta_chain=z["max_delta_chain"], min_saving=z.get("min_saving", defaults.min_saving),
            context_coding=z.get("context_coding", defaults.context_coding),
        )
        remotes = {
            name: Remote(uri=r["uri"], options=dict(r.get("options", {})))
            for name, r in doc.get("remotes", {}).items()
        }
        return cls(Chunking(**c), policy, dict(doc.get("retention", {})), remotes)

    def with_remote(self, name: str, remote: Remote | None) -> Config:
        remotes = dict(self.remotes)
        if remote is None:
            remotes.pop(name, None)
        else:
            remotes[name] = remote
        return replace(self, remotes=remotes)
