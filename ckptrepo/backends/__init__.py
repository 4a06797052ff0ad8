"""Backends move bytes under relative keys and know nothing of objects or refs."""

from .base import Backend, Capabilities, KeyStat, validate_key
from .local import LocalBackend

__all__ = ["Backend", "Capabilities", "KeyStat", "LocalBackend", "validate_key"]
