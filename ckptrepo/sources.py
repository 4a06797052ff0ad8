"""What the command line can commit: a directory or URI as it is, or a single checkpoint
file loaded into a dict (torch files with ``weights_only=True``: no pickle runs)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import RepositoryError

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")


def load_source(location: str) -> Any:
    if "://" in location and not location.startswith("file://"):
        return location
    path = Path(location.removeprefix("file://"))
    if path.is_dir():
        return str(path)
    if not path.exists():
        raise RepositoryError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        try:
            import torch
        except ImportError:
            raise RepositoryError(f"{path}: reading torch files needs torch (pip install 'ckptrepo[torch]')") from None
        # weights_only refuses arbitrary pickled objects: loading a file runs no code.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        return loaded if isinstance(loaded, dict) else {"value": loaded}
    if suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError:
            raise RepositoryError(f"{path}: reading safetensors files needs the safetensors package") from None
        return dict(load_file(os.fspath(path)))
    if suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    raise RepositoryError(
        f"{path}: not a directory, and {suffix or 'no suffix'} is not a checkpoint file ckpt can read "
        f"({', '.join(TORCH_SUFFIXES)}, .safetensors, .npz)"
    )
