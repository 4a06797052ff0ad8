"""JSON Schema validation of documents and strict JSON parsing (no duplicate keys)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema

from .errors import FormatError


@cache
def schema(name: str) -> dict[str, Any]:
    text = (resources.files("ckptrepo") / "schemas" / f"{name}.schema.json").read_text()
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@cache
def _validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(name))


def validate(document: Any, name: str, what: str) -> None:
    """Raise FormatError naming the path of the first bad field of ``document``."""
    validator = _validator(name)
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(document))
    except RecursionError:
        raise FormatError(f"{what}: nested too deeply") from None
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise FormatError(f"{what}: field {where}: {error.message}")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise FormatError(f"duplicate key {key!r} in document")
        out[key] = value
    return out


def parse_json(raw: bytes | str, what: str) -> Any:
    try:
        return json.loads(raw, object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"{what} is not valid JSON: {exc}") from None
