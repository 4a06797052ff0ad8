"""The import layers run one way (docs/architecture.md): a module imports, at module level,
only modules of its own or a lower layer. Repository's convenience methods reach upward
through function-level imports by design; those are not module-level imports."""

from __future__ import annotations

import ast
from pathlib import Path

import ckptrepo

PACKAGE = Path(ckptrepo.__file__).parent

LAYERS: dict[str, int] = {
    "errors": 0, "ids": 0, "frames": 0, "compiled": 0, "entropy": 0, "ans_kernels": 0,
    "_elements": 0, "gcpause": 0,
    "codec": 1, "validation": 1, "paths": 1, "values": 1,
    "backends": 2, "index": 2, "basecache": 2,
    "store": 3, "refs": 3, "objects": 3, "config": 3, "locking": 3,
    "datapath": 4, "trees": 4, "dictdir": 4, "revisions": 4, "sources": 4, "reachability": 4,
    "repository": 5,
    "snapshot": 6, "diff": 6, "accounting": 6, "maintenance": 6, "fsck": 6, "gc": 6,
    "sync": 6, "remote": 6, "manager": 7, "checkpoint": 7, "integrations": 7,
    "cli": 8, "__main__": 9, "__init__": 9,
}


def _layer(module: str) -> int | None:
    head = module.split(".")[0]
    return LAYERS.get(head)


def _module_level_imports(tree: ast.Module, package_parts: list[str]) -> list[str]:
    found = []
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in [node] if not isinstance(node, (ast.Try, ast.If)) else ast.walk(node):
            if isinstance(sub, ast.ImportFrom) and sub.level > 0:
                base = package_parts[: len(package_parts) - sub.level]
                target = ".".join(base[1:] + ([sub.module] if sub.module else []))
                if sub.module is None:
                    found.extend(f"{target}.{alias.name}".lstrip(".") for alias in sub.names)
                else:
                    found.append(target)
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.module.startswith("ckptrepo"):
                found.append(sub.module.removeprefix("ckptrepo").lstrip("."))
    return [f for f in found if f]


def test_every_module_has_a_layer() -> None:
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        assert _layer(".".join(rel.parts)) is not None, f"{rel} has no layer in LAYERS"


def test_imports_only_go_down() -> None:
    problems = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).with_suffix("")
        module = ".".join(rel.parts)
        own = _layer(module)
        parts = ["ckptrepo", *rel.parts]
        if rel.name == "__init__":
            parts = parts[:-1] + ["__init__"]
        for target in _module_level_imports(ast.parse(path.read_text()), parts):
            target_layer = _layer(target)
            if target_layer is None or own is None:
                continue
            same_package = target.split(".")[0] == module.split(".")[0]
            if target_layer > own and not same_package:
                problems.append(f"{module} (layer {own}) imports {target} (layer {target_layer})")
    assert not problems, "\n".join(problems)


def test_public_api_is_pinned() -> None:
    expected = {"init", "open", "clone", "Repository", "Snapshot", "Commit", "CommitStats", "CkptRepoError"}
    assert expected <= set(ckptrepo.__all__)
    for name in ckptrepo.__all__:
        assert hasattr(ckptrepo, name), name
