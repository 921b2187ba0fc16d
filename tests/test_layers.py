"""The package's layers point one way: no module imports one of a higher layer, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import furnitype

ROOT = Path(furnitype.__file__).parent
#: Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS = (
    ("errors", "faults", "keras_loader", "outputs"),
    ("features",),
    ("extract",),
    ("classify",),
    ("reports",),
    ("engines",),
    ("extraction", "training", "predict", "similar", "suggest", "duplicates", "labels"),
    ("serve",),
    ("cli",),
    ("__main__", "demo"),
)


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "furnitype":
        return -1
    if len(parts) == 1 or parts[1] == "__version__":
        return 0
    for level, names in enumerate(LAYERS):
        if parts[1] in names:
            return level
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in found if name.startswith("furnitype")]


def _module_name(path: Path) -> str:
    relative = path.relative_to(ROOT.parent).with_suffix("")
    parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
    return ".".join(parts)


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(ROOT.rglob("*.py")):
        module = _module_name(path)
        own = _layer(module)
        for imported in _imports(path):
            target = ".".join(imported.split(".")[:2])
            if _layer(target) > own:
                upward.append(f"{module} imports {imported}")
    assert upward == []
