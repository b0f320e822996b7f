"""The layer order of docs/design.md, read from the code: every import inside fastdae (at module
level, inside functions and under TYPE_CHECKING alike) points to its own unit or to a lower layer,
and no two units import each other."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastdae"

# lowest first; a unit is a subpackage or a top-level module of fastdae
LAYERS: list[tuple[str, ...]] = [
    ("files", "_ext", "_lazy", "precision", "threads"),
    ("kernels",),
    ("nn",),
    ("models",),
    ("data", "cache", "pretrained"),
    ("config",),
    ("measure", "sampler", "plan"),
    ("training",),
    ("evaluation", "sampling"),
    ("cli", "__main__"),
    ("__init__", "integrations", "kernel_report"),  # the public facade and the leaves
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """fastdae.training.run -> training; fastdae -> __init__ (the lazy public facade)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """The fastdae modules `path` imports; `from fastdae import x` counts as fastdae.x when x is a
    submodule or subpackage, else as the facade fastdae."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "fastdae"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "fastdae":
                for a in node.names:
                    sub = PACKAGE / a.name
                    out.add(f"fastdae.{a.name}" if sub.is_dir() or sub.with_suffix(".py").is_file() else "fastdae")
            elif node.module.split(".")[0] == "fastdae":
                out.add(node.module)
    return out


def edges() -> set[tuple[str, str, str]]:
    """(importing unit, imported unit, importing file) for every import between two units."""
    out = set()
    for path in sorted(PACKAGE.rglob("*.py")):
        src = unit_of(module_name(path))
        for mod in imported_modules(path):
            dst = unit_of(mod)
            if dst != src:
                out.add((src, dst, str(path.relative_to(PACKAGE.parent))))
    return out


def test_every_unit_of_the_package_has_a_layer():
    units = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if p.suffix == ".py" or (p / "__init__.py").exists()
    }
    assert units == set(RANK), f"add to LAYERS: {sorted(units - set(RANK))}; gone: {sorted(set(RANK) - units)}"


def test_imports_point_down_only():
    up = sorted(
        f"{f}: {src} (layer {RANK[src]}) imports {dst} (layer {RANK[dst]})"
        for src, dst, f in edges()
        if RANK[dst] > RANK[src]
    )
    assert not up, "\n".join(up)


def test_no_two_units_import_each_other():
    pairs = {(s, d) for s, d, _ in edges()}
    cycles = sorted(f"{s} <-> {d}" for s, d in pairs if (d, s) in pairs and s < d)
    assert not cycles, cycles


def test_the_reader_sees_function_level_imports(tmp_path):
    """The test itself can fail: an import inside a function is an edge too."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from fastdae.training.run import Run\n    from fastdae import measure, train\n")
    assert imported_modules(f) == {"fastdae.training.run", "fastdae.measure", "fastdae"}
