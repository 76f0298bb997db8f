"""The layout docs/architecture.md draws: which package may import which (imports point down only), and modules
short enough to read whole."""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "pmrlhf"

# What each package (or top-level module) may import besides itself: the layers of docs/architecture.md.
BASE = {"config", "io"}
MAY_IMPORT = {
    "io": set(),
    "config": {"io"},
    "objectives": set(),
    "data": BASE,
    "models": BASE | {"data"},
    "training": BASE,
    "evaluation": BASE | {"data", "models", "objectives"},
    "stages": BASE | {"data", "models", "objectives", "training", "evaluation"},
    "cli": BASE | {"pmrlhf", "data", "models", "objectives", "training", "evaluation", "stages"},
    "__main__": {"cli"},
    "pmrlhf": set(),
}
MAX_LINES = 400


def modules():
    for path in sorted(SOURCE.rglob("*.py")):
        yield path, ".".join(path.relative_to(SOURCE.parent).with_suffix("").parts)


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__init__" else "pmrlhf"


def imported(path: Path, module: str = ""):
    """Every pmrlhf module ``path`` (the module ``module``) imports, at its top or inside a function; a relative
    import is resolved against ``module`` (``a.b.c`` or ``a.b.__init__``: level 1 is ``a.b``)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            yield ".".join([*module.split(".")[: -node.level], *([node.module] if node.module else [])])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pmrlhf"):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("pmrlhf"))


def test_every_package_has_a_place_in_the_layers():
    assert {package(m) for _, m in modules()} == set(MAY_IMPORT)


@pytest.mark.parametrize("path,module", list(modules()), ids=[m for _, m in modules()])
def test_imports_point_down_only(path, module):
    own = package(module)
    upward = [m for m in imported(path, module) if package(m) != own and package(m) not in MAY_IMPORT[own]]
    assert not upward, f"{module} ({own}) imports {upward}"


@pytest.mark.parametrize("path,module", list(modules()), ids=[m for _, m in modules()])
def test_a_stage_package_is_entered_by_its_front_door(path, module):
    """``stages/ppo`` is a package: other modules import what its ``__init__`` exports, not its modules."""
    packages = {p.name for p in (SOURCE / "stages").iterdir() if (p / "__init__.py").is_file()}
    own = module.split(".")[2] if module.startswith("pmrlhf.stages.") else None
    inside = [
        m
        for m in imported(path, module)
        if m.startswith("pmrlhf.stages.") and len(m.split(".")) > 3 and m.split(".")[2] in packages - {own}
    ]
    assert not inside, f"{module} imports the insides of {inside}"


def test_no_module_is_longer_than_a_reader_holds():
    long = {m: n for path, m in modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long
