"""The tree's import rules (docs/architecture.md), read from the source.

Top level: ``trainers`` ← ``analysis`` ← ``study`` ← ``bench``: a package
imports only packages to its left.  Inside ``trainers``: ``config`` at the
bottom, then ``diffusion`` and ``curvature`` (which know nothing of each
other), then ``run``, which assembles a trial from both.  ``config``
validates names against two registries (``diffusion.unet.PRESETS``,
``diffusion.variants.VARIANTS``), modules that import nothing of the project.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TOP = ("trainers", "analysis", "study", "bench")   # each may import those before it
INSIDE_TRAINERS = {
    "trainers.config": ("trainers.config", "trainers.diffusion.unet", "trainers.diffusion.variants"),
    "trainers.diffusion": ("trainers.config", "trainers.diffusion"),
    "trainers.curvature": ("trainers.config", "trainers.curvature"),
    "trainers.run": ("trainers",),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """Absolute names of the project modules ``path`` imports (also inside functions)."""
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in names if n.split(".")[0] in TOP}


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize("package", TOP)
def test_no_package_imports_one_above_it(package):
    allowed = TOP[: TOP.index(package) + 1]
    bad = [(module_name(f), n) for f in sources(package) for n in project_imports(f)
           if n.split(".")[0] not in allowed]
    assert not bad, f"upward imports from {package}: {bad}"


def test_trainers_subsystems_import_one_way():
    bad = []
    for f in sources("trainers"):
        mod = module_name(f)
        rule = next((allowed for prefix, allowed in INSIDE_TRAINERS.items() if within(mod, prefix)), None)
        if rule is None:   # trainers/__init__.py
            continue
        for name in project_imports(f):
            # ``from trainers.diffusion import unet`` names the package and the module
            if name in ("trainers", "trainers.diffusion", "trainers.curvature", "trainers.run") and mod != name:
                continue
            if not any(within(name, ok) for ok in rule):
                bad.append((mod, name))
    assert not bad, f"imports across the trainers subsystems against the rules: {bad}"


def test_the_rules_see_real_imports():
    """The checker itself: it finds the imports a module is known to have."""
    loop = project_imports(ROOT / "trainers" / "run" / "loop.py")
    probing = project_imports(ROOT / "trainers" / "run" / "probing.py")
    assert any(within(n, "trainers.curvature") for n in probing)
    assert any(within(n, "trainers.diffusion") for n in loop)
    assert any(within(n, "trainers") for n in project_imports(ROOT / "study" / "trainable.py"))
