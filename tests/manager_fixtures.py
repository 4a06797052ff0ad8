"""Test doubles for CheckpointManager tests: a backend whose object writes can be held back
or made to fail, and a repository over it."""

from __future__ import annotations

import threading
from pathlib import Path

import ckptrepo
from ckptrepo.backends.base import Backend, BackendWrapper
from ckptrepo.errors import BackendError
from ckptrepo.repository import Repository


class GatedBackend(BackendWrapper):
    """Delegates to a real backend; writes under ``objects/`` wait while the gate is closed
    and raise BackendError while ``fail`` is set. Everything else passes straight through."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.blocked = threading.Event()  # set once a write has waited at the closed gate

    def write(self, key: str, data: bytes | memoryview, *, create_only: bool = False) -> None:
        if key.startswith("objects/"):
            if not self.gate.is_set():
                self.blocked.set()
                self.gate.wait(timeout=60)
            if self.fail:
                raise BackendError(f"injected failure writing {key}")
        self.inner.write(key, data, create_only=create_only)


def gated_repository(path: Path) -> tuple[Repository, GatedBackend]:
    """A new repository at ``path`` whose object writes go through a :class:`GatedBackend`
    (no local index, so every presence check asks the gated backend)."""
    plain = ckptrepo.init(path)
    config = plain.config
    backend = GatedBackend(plain.backend)
    return Repository(backend, config, cache_dir=None), backend  # type: ignore[arg-type]


# --- a training process to kill ------------------------------------------------------------


def expected_state(step: int) -> dict[str, object]:
    """The state a deterministic "training run" holds after ``step`` (about 12 MiB)."""
    import torch

    return {
        "model": {"w": torch.full((1024, 1024), float(step)), "b": torch.arange(4096, dtype=torch.int64) + step},
        "optimizer": {"m": torch.full((512, 1024), step * 0.5, dtype=torch.float64)},
        "step": step,
    }


def train(repo_path: str, steps: int, resume: bool) -> None:
    """Save a step after each "training step"; the tensors change in place right after each
    save returns, as an optimizer would change them."""
    with ckptrepo.CheckpointManager(repo_path, max_to_keep=3, item_max_to_keep={"optimizer": 2}) as manager:
        start = 0
        state = expected_state(0)
        if resume:
            latest = manager.latest_step()
            assert latest is not None
            restored = manager.restore(latest)
            state = {"model": restored["model"], "optimizer": restored["optimizer"], "step": restored["step"]}
            start = latest + 1
            print(f"resumed {latest}", flush=True)
        for step in range(start, start + steps):
            target = expected_state(step)
            for name in ("model", "optimizer"):
                for key, tensor in state[name].items():  # type: ignore[attr-defined]
                    tensor.copy_(target[name][key])  # type: ignore[index]
            state["step"] = step
            manager.save(step, state)
            # The loop goes on at once: scribble over the tensors the save was handed.
            for name in ("model", "optimizer"):
                for tensor in state[name].values():  # type: ignore[attr-defined]
                    tensor.fill_(-1)
            print(f"saved {step}", flush=True)


if __name__ == "__main__":
    import sys

    train(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume")
