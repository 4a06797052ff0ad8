"""The core `ckpt` commands: init, commit, show, checkout, tag, branch, switch, steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ckptrepo.cli import main


def run(*argv: str) -> int:
    return main(list(argv))


@pytest.fixture
def cli_repo(tmp_path: Path) -> Path:
    path = tmp_path / "repo"
    assert run("init", str(path)) == 0
    return path


def test_commit_directory_and_torch_file(cli_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "weights.bin").write_bytes(os.urandom(5000))
    assert run("-C", str(cli_repo), "commit", str(src), "--step", "1", "--metric", "loss=0.5", "-m", "first") == 0
    torch.save({"w": torch.arange(2000.0), "step": 2}, tmp_path / "ckpt.pt")  # 8 KB: an object
    assert run("-C", str(cli_repo), "commit", str(tmp_path / "ckpt.pt"), "--step", "2", "--tag", "best", "--json") == 0
    out = capsys.readouterr().out
    doc = json.loads(out[out.index("{"):])
    assert doc["step"] == 2 and doc["stats"]["new_chunks"] >= 1 and len(doc["id"]) == 64

    capsys.readouterr()
    assert run("-C", str(cli_repo), "show", "best", "--json") == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["entries"]["w"]["dtype"] == "float32" and shown["entries"]["step"]["value"] == "2"

    assert run("-C", str(cli_repo), "checkout", "steps/1", str(tmp_path / "out")) == 0
    assert (tmp_path / "out" / "weights.bin").read_bytes() == (src / "weights.bin").read_bytes()

    capsys.readouterr()
    assert run("-C", str(cli_repo), "steps", "--json") == 0
    assert [s["step"] for s in json.loads(capsys.readouterr().out)] == [1, 2]


def test_tags_and_branches(cli_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"w": torch.ones(3)}, tmp_path / "a.pt")
    run("-C", str(cli_repo), "commit", str(tmp_path / "a.pt"), "--step", "1")
    assert run("-C", str(cli_repo), "tag", "v1") == 0
    assert run("-C", str(cli_repo), "tag", "v1") == 1  # immutable
    assert run("-C", str(cli_repo), "tag", "-f", "v1") == 0
    assert run("-C", str(cli_repo), "branch", "exp", "steps/1") == 0
    assert run("-C", str(cli_repo), "switch", "exp") == 0
    capsys.readouterr()
    assert run("-C", str(cli_repo), "branch") == 0
    assert "* exp" in capsys.readouterr().out
    assert run("-C", str(cli_repo), "tag", "-d", "v1") == 0
    capsys.readouterr()
    run("-C", str(cli_repo), "tag")
    assert capsys.readouterr().out == ""


def test_user_errors_are_one_line_exit_1(cli_repo: Path, tmp_path: Path) -> None:
    env = {**os.environ, "CKPT_REPO": str(cli_repo)}
    env.pop("CKPT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "ckptrepo", "show", "nope"], capture_output=True, text=True, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "unknown revision" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ckptrepo", "commit", str(tmp_path / "missing")],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 1 and "no such file" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ckptrepo", "-C", str(tmp_path / "none"), "show"],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "no ckptrepo repository" in proc.stderr


def test_usage_errors_exit_2(cli_repo: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        run("-C", str(cli_repo), "commit")
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        run("frobnicate")
    assert exc.value.code == 2


def test_bad_metric_is_a_user_error(cli_repo: Path, tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    assert run("-C", str(cli_repo), "commit", str(tmp_path / "d"), "--metric", "loss") == 1
    assert run("-C", str(cli_repo), "commit", str(tmp_path / "d"), "--metric", "loss=abc") == 1
