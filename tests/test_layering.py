"""The import layers: a base that knows no tier, the tiers on it (none importing another), the
offline side and the orchestration on top. An arrow that runs back up fails this test.

    base           pipeline.* (config, settings, errors, data, layers, entropy, checkpoint, ...),
                   pipeline.wire.*, pipeline.transport.*
    tiers          devices.*, edge.*, cloud.*   (each may use the base, never another tier)
    offline        pipeline.offline.*           (network assembly, training, evaluation, bench)
    orchestration  pipeline.orchestration.*     (replay, the CLI)

Every import counts, also those inside functions.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "devices", "edge", "cloud")
TIERS = ("devices", "edge", "cloud")
RANKS = {"base": 0, "tier": 1, "offline": 2, "orchestration": 3}


def layer(module: str) -> tuple[str, str] | None:
    """(layer, group) of a module of this project, None for anything else. The group tells the
    tiers apart: a tier may not import another tier."""
    top = module.split(".")[0]
    if top in TIERS:
        return "tier", top
    if top != "pipeline":
        return None
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("offline", "orchestration"):
        return parts[1], parts[1]
    return "base", "base"


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool) -> list[str]:
    """Every module `source` imports (absolute names; relative imports resolved)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            out.append(name)
            out.extend(f"{name}.{a.name}" for a in node.names)  # `from pipeline import offline`
    return out


def violations(root: pathlib.Path) -> list[str]:
    """Every import arrow that runs from a lower layer up, or from one tier to another."""
    bad = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            mod = module_name(path, root)
            src_layer = layer(mod)
            assert src_layer is not None
            for target in imports(path.read_text(), mod, path.name == "__init__.py"):
                dst_layer = layer(target)
                if dst_layer is None or not _exists(root, target):
                    continue
                (src, src_group), (dst, dst_group) = src_layer, dst_layer
                if RANKS[dst] > RANKS[src]:
                    bad.append(f"{mod} ({src}) imports {target} ({dst}): an arrow up")
                elif src == dst == "tier" and src_group != dst_group:
                    bad.append(f"{mod} ({src_group}) imports {target} ({dst_group}): one tier into another")
    return sorted(set(bad))


def _exists(root: pathlib.Path, module: str) -> bool:
    """A module or package of this project (names imported from a module are not modules)."""
    path = root.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_no_import_runs_back_up_or_across_tiers() -> None:
    assert violations(ROOT) == []


def _copy_tree(dst: pathlib.Path) -> None:
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            target = dst / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())


@pytest.mark.parametrize("module, planted, expected", [
    ("pipeline/errors.py", "from edge import aggregator", "pipeline.errors (base) imports edge.aggregator (tier)"),
    ("pipeline/wire/messages.py", "def f():\n    from pipeline.offline import network\n",
     "pipeline.wire.messages (base) imports pipeline.offline.network (offline)"),
    ("devices/camera.py", "import cloud.worker", "devices.camera (devices) imports cloud.worker (cloud)"),
    ("edge/aggregator.py", "from pipeline.orchestration.cli import main",
     "edge.aggregator (tier) imports pipeline.orchestration.cli (orchestration)"),
    ("pipeline/offline/network.py", "from pipeline.orchestration import replay",
     "pipeline.offline.network (offline) imports pipeline.orchestration.replay (orchestration)"),
])
def test_a_planted_reverse_import_is_caught(tmp_path: pathlib.Path, module: str, planted: str, expected: str) -> None:
    _copy_tree(tmp_path)
    assert violations(tmp_path) == []
    path = tmp_path / module
    path.write_text(path.read_text() + "\n" + planted + "\n")
    found = violations(tmp_path)
    assert any(v.startswith(expected) for v in found), found
