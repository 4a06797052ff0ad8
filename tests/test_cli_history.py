"""`ckpt log`, `ckpt diff` and `ckpt du`: exit codes, tables, charts and the --json forms."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from history_fixtures import FROZEN, TRAINED, fine_tune, objects_on_disk, small_chunk_repo

import ckptrepo
from ckptrepo.accounting import CommitShare, Usage
from ckptrepo.cli import main
from ckptrepo.cli.history import MAX_BAR_ROWS, _commit_chart, bar, column_chart, sort_rows
from ckptrepo.ids import ObjectId

DIFF_KEYS = {"a", "b", "numeric", "prefix", "entries", "totals"}
ENTRY_KEYS = {"path", "status", "changes", "kind_a", "kind_b", "dtype_a", "dtype_b", "shape_a", "shape_b",
              "bytes_a", "bytes_b", "chunks_a", "chunks_b", "shared_chunks", "shared_bytes", "numeric"}
NUMERIC_KEYS = {"elements", "changed", "frac_changed", "l2", "rel_l2", "max_abs", "norm_a", "norm_b"}
USAGE_KEYS = {"objects", "logical_bytes", "stored_bytes"}


@pytest.fixture(scope="module")
def repo_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "repo"
    repo = small_chunk_repo(path)
    fine_tune(repo, steps=3)
    repo.close()
    return path


def run(repo: Path, *argv: str) -> int:
    return main(["-C", str(repo), *argv])


def output(capsys: pytest.CaptureFixture[str], repo: Path, *argv: str) -> str:
    assert run(repo, *argv) == 0
    return capsys.readouterr().out


# --- log -----------------------------------------------------------------------------------


def test_log(repo_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = output(capsys, repo_path, "log")
    lines = [line for line in text.splitlines() if "logical" in line]
    assert [line.split()[2] for line in lines] == ["3", "2", "1"]  # newest first
    assert all("loss=" in line and " new " in line for line in lines)
    assert "    step 2" in text  # the message
    assert len([line for line in output(capsys, repo_path, "log", "-n", "2").splitlines() if "logical" in line]) == 2

    commits = json.loads(output(capsys, repo_path, "log", "--json"))
    assert [c["step"] for c in commits] == [3, 2, 1]
    assert commits[0]["parents"] == [commits[1]["id"]]
    assert set(commits[0]["stats"]) == {"logical_bytes", "stored_bytes", "new_chunks", "reused_chunks"}


def test_log_metric_chart(repo_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = output(capsys, repo_path, "log", "--metric", "loss")
    assert "loss over 3 steps" in text
    assert "█" in text and "step 1" in text and "step 3" in text
    assert run(repo_path, "log", "--metric", "accuracy") == 1
    err = capsys.readouterr().err
    assert err.startswith("ckpt: error:") and "loss" in err and len(err.strip().splitlines()) == 1


def test_log_usage_errors(repo_path: Path) -> None:
    for argv in (["log", "-n", "0"], ["log", "-n", "x"], ["diff", "steps/1"], ["du", "a", "b"]):
        with pytest.raises(SystemExit) as exc:
            run(repo_path, *argv)
        assert exc.value.code == 2


# --- diff ----------------------------------------------------------------------------------


def test_diff_table(repo_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = output(capsys, repo_path, "diff", "steps/1", "steps/3")
    rows = {line.split()[1]: line.split()[0] for line in text.splitlines() if line[:2] in ("M ", "A ", "R ", "= ")}
    assert {p for p in rows if p.startswith("model/")} == TRAINED
    assert all(rows[p] == "M" for p in TRAINED)
    assert "modified" in text.splitlines()[-2] and "unchanged" in text.splitlines()[-2]
    everything = output(capsys, repo_path, "diff", "steps/1", "steps/3", "--all")
    for path in FROZEN:
        assert any(line.startswith(f"= {path} ") for line in everything.splitlines())


def test_diff_numeric_is_sorted_largest_first(repo_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = output(capsys, repo_path, "diff", "steps/1", "steps/2", "--numeric", "--prefix", "model/")
    shown = [line.split()[1] for line in text.splitlines() if line.startswith("M ")]
    assert set(shown) == TRAINED
    with ckptrepo.open(repo_path) as repo:
        diff = repo.diff("steps/1", "steps/2", numeric=True)
    rel = {p: diff[p].numeric.rel_l2 for p in TRAINED}
    assert shown == sorted(TRAINED, key=lambda p: -rel[p])
    assert [e.path for e in sort_rows(diff.modified) if e.path in TRAINED] == shown
    assert "█" in text and "overall rel_l2" in text


def test_diff_stat(repo_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = output(capsys, repo_path, "diff", "steps/1", "steps/2", "--stat")
    keys = [line.split()[0] for line in text.splitlines() if line.startswith("  ")]
    assert keys == ["model", "optimizer", "step"]
    assert not any(line.startswith("M ") for line in text.splitlines())


def test_diff_json(repo_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(output(capsys, repo_path, "diff", "steps/1", "steps/2", "--json", "--numeric"))
    assert set(doc) == DIFF_KEYS
    assert doc["a"]["step"] == 1 and doc["b"]["step"] == 2 and doc["numeric"] is True
    entries = {e["path"]: e for e in doc["entries"]}
    for entry in entries.values():
        assert set(entry) == ENTRY_KEYS
    for path in TRAINED:
        assert entries[path]["status"] == "modified"
        assert set(entries[path]["numeric"]) == NUMERIC_KEYS
    for path in FROZEN:
        assert entries[path]["status"] == "unchanged" and entries[path]["numeric"] is None
    assert doc["totals"]["counts"]["unchanged"] == sum(e["status"] == "unchanged" for e in doc["entries"])
    plain = json.loads(output(capsys, repo_path, "diff", "steps/1", "steps/2", "--json", "--prefix", "model/"))
    assert plain["numeric"] is False and plain["prefix"] == "model/"
    assert {e["path"] for e in plain["entries"]} == FROZEN | TRAINED


def test_diff_json_writes_infinity_as_a_string(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = small_chunk_repo(tmp_path / "repo")
    repo.commit({"z": np.zeros(10)}, step=1)
    repo.commit({"z": np.ones(10)}, step=2)
    text = output(capsys, tmp_path / "repo", "diff", "steps/1", "steps/2", "--json", "--numeric")
    numeric = json.loads(text)["entries"][0]["numeric"]
    assert numeric["rel_l2"] == "inf" and numeric["l2"] == pytest.approx(math.sqrt(10))
    assert "Infinity" not in text


def test_diff_errors(repo_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(repo_path, "diff", "steps/1", "steps/99") == 1
    err = capsys.readouterr().err
    assert err.startswith("ckpt: error:") and len(err.strip().splitlines()) == 1


# --- du ------------------------------------------------------------------------------------


def test_du(repo_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = output(capsys, repo_path, "du", "--by-key")
    assert "on disk" in text and "stored bytes per commit" in text and "█" in text
    assert "optimizer" in text
    doc = json.loads(output(capsys, repo_path, "du", "--json"))
    assert doc["scope"] == "repository"
    assert doc["stored_bytes"] == objects_on_disk(repo_path)
    assert sum(c["stored"]["stored_bytes"] for c in doc["commits"]) + doc["unreferenced"]["stored_bytes"] == doc["stored_bytes"]
    assert set(doc["chunks"]) == USAGE_KEYS and doc["keys"] is None
    assert [c["step"] for c in doc["commits"]] == [1, 2, 3]


def test_du_commit(repo_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = output(capsys, repo_path, "du", "steps/2", "--by-key")
    assert "unique" in text and "not in the parent" in text and "model" in text
    doc = json.loads(output(capsys, repo_path, "du", "steps/2", "--by-key", "--json"))
    assert doc["scope"] == "commit" and doc["step"] == 2
    assert doc["stored_bytes"] == sum(doc[k]["stored_bytes"] for k in ("chunks", "delta_bases", "metadata"))
    assert set(doc["keys"]) == {"model", "optimizer", "step"}
    assert set(doc["keys"]["model"]) == {"entries", "logical_bytes", "chunks", "not_in_parent", "unique"}
    assert run(repo_path, "du", "steps/99") == 1
    assert capsys.readouterr().err.startswith("ckpt: error:")


# --- charts --------------------------------------------------------------------------------


def test_bars() -> None:
    assert bar(0.5, 8) == "████    "
    assert bar(1.0, 4) == "████" and bar(2.0, 4) == "████"
    assert bar(0.0, 4) == "    "
    assert bar(1e-9, 4) == "▏   "  # anything at all shows
    assert bar(0.5 + 1 / 32, 4) == "██▏ "  # 17 eighths of 32
    assert bar(math.nan, 2) == "██"


def test_column_chart() -> None:
    assert column_chart([0, 1], width=10, height=2) == [" █", "▁█"]
    assert column_chart([5, 5, 5], width=10, height=1) == ["▄▄▄"]
    assert column_chart([1, math.nan, 2], width=10, height=1) == ["▁ █"]
    many = column_chart(list(range(100)), width=10, height=4)
    assert all(len(row) == 10 for row in many)
    assert many[0][-1] == "█" and many[-1][0] != " "


def test_many_commits_are_drawn_as_columns() -> None:
    def share(i: int) -> CommitShare:
        commit = ObjectId(f"{i:064x}")
        return CommitShare(commit, i, "main", datetime.now(timezone.utc), True, 100, Usage(1, 100, 10 * i), 0)

    few = _commit_chart([share(i) for i in range(1, 4)])
    assert len(few) == 3 and few[-1].rstrip().endswith("█" * 24)
    many = _commit_chart([share(i) for i in range(1, MAX_BAR_ROWS + 10)])
    assert any("└" in line for line in many) and "step 1" in many[-1]
