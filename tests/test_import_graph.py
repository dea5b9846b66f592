"""The house is one-way: nodes/ -> difflora/, nodes/toy_world.py (only) -> difflora_toyworld/ ->
difflora/, and difflora/ imports none of them, nor ComfyUI, nor names the toy world's modules, sizes
or encoders; no package has an import circle.

Read from the source (every import statement, function-level ones too), so a lazy import
inside a function counts as much as one at the top of a file.
"""

from __future__ import annotations

import ast
import graphlib
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("difflora", "difflora_toyworld", "nodes")
COMFYUI_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "server", "execution", "nodes"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module name `name` imports (absolute), as written: not yet reduced to known modules."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]) if node.level \
                else node.module
            base = base.strip(".")
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def _known(target: str) -> str | None:
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def _edges() -> dict[str, set[str]]:
    edges = {}
    for name, path in MODULES.items():
        targets = {_known(t) for t in _imports(name, path)}
        # A module reading its own package's face (its __init__) is how packages work, not a circle.
        edges[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return edges


EDGES = _edges()


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_import_circle(pkg):
    graph = {m: {t for t in ts if t.split(".")[0] == pkg} for m, ts in EDGES.items() if m.split(".")[0] == pkg}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        pytest.fail(f"import circle in {pkg}/: {' -> '.join(e.args[1])}")


def test_the_core_imports_neither_the_toy_world_nor_comfyui():
    bad = {}
    for name, path in MODULES.items():
        if name.split(".")[0] != "difflora":
            continue
        raw = {t.split(".")[0] for t in _imports(name, path)}
        hits = sorted(raw & (COMFYUI_MODULES | {"difflora_toyworld", "devtools"}))
        if hits:
            bad[name] = hits
    assert not bad, f"difflora/ must stand alone; these modules import outside it: {bad}"


def test_the_toy_world_depends_on_the_core_one_way():
    bad = {m: sorted({t.split(".")[0] for t in _imports(m, p)} & (COMFYUI_MODULES | {"devtools"}))
           for m, p in MODULES.items() if m.startswith("difflora_toyworld")}
    assert not {m: v for m, v in bad.items() if v}
    assert any(t.startswith("difflora.") for m, ts in EDGES.items() if m.startswith("difflora_toyworld") for t in ts)


def test_only_the_toy_world_nodes_import_the_toy_world():
    importers = sorted(m for m, p in MODULES.items() if m.startswith("nodes")
                       and any(t.split(".")[0] == "difflora_toyworld" for t in _imports(m, p)))
    assert importers == ["nodes.toy_world"]


# What the core must not name: the toy world's package, its LAE / DiT sizes and its encoders (kinds,
# classes, files). Comments may still cite docs/TOYWORLD.md for a measurement. The one exception is
# the metadata key files already shipped carry (encoders/carried.py MODEL_KEY).
TOY_NAMES = re.compile(r"difflora_toyworld|\"toy\"|toy-\d+x|lae_toy|dit_toy|toy-face|toy-image|toy-encoder|"
                       r"Toy[A-Z]\w*|toy_(face|image|sdxl|classifier)|EmbeddingNet|edge_share")
SHIPPED_KEY = 'MODEL_KEY = "toyworld_model"'


def test_the_core_names_no_toy_module_size_or_encoder():
    hits = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
            for path in sorted((ROOT / "difflora").rglob("*.py"))
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if TOY_NAMES.search(line) and SHIPPED_KEY not in line]
    assert not hits, "the toy world belongs in difflora_toyworld/:\n" + "\n".join(hits)


def test_the_toy_name_check_sees_a_toy_name():
    for line in ('LAE_CONFIGS = {"toy": lae_toy}', 'kind = "toy-face"', "from difflora_toyworld import x",
                 "class ToyFaceEncoder:"):
        assert TOY_NAMES.search(line), line
    assert not TOY_NAMES.search("Measured in the toy world (docs/TOYWORLD.md)")


def test_the_checker_sees_a_circle(tmp_path, monkeypatch):
    """The walk above is only worth something if it finds a circle when there is one."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from .b import g\n")
    b.write_text("from .a import f\n")
    mods = {"difflora.a": a, "difflora.b": b}
    monkeypatch.setattr(sys.modules[__name__], "MODULES", mods)
    edges = {n: {_known(t) for t in _imports(n, p)} - {None, n} for n, p in mods.items()}
    assert edges == {"difflora.a": {"difflora.b"}, "difflora.b": {"difflora.a"}}
    with pytest.raises(graphlib.CycleError):
        graphlib.TopologicalSorter(edges).prepare()
