"""The layers of the package, checked rather than kept by hand.

- Nothing outside ``gpu/`` and ``store/`` imports torch (or diffusers) when imported: each layer is imported in a
  fresh interpreter and ``sys.modules`` is looked at.
- ``http/``, ``adapters/`` and ``core/`` reach the GPU only through the scheduler's interface (``gpu/scheduler.py``)
  and never import the model store; the shared modules import no layer at all. Every import counts, those inside
  functions too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "sdxl_bento"
LAYERS = ("http", "adapters", "core", "gpu", "store", "cli")
WIRING = "runtime"  # builds the parts from the settings: it may import every layer (torch only inside a function)
SHARED = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", WIRING))


def modules(layer: str | None) -> list[str]:
    if layer is None:
        return [f"sdxl_bento.{name}" for name in SHARED]
    return [f"sdxl_bento.{layer}.{p.stem}" for p in sorted((PACKAGE / layer).glob("*.py"))
            if p.stem not in ("__init__", "__main__")]


def imports_of(path: Path) -> set[str]:
    """Every sdxl_bento module a file imports, as absolute dotted names."""
    package = ["sdxl_bento", *path.relative_to(PACKAGE).parent.parts]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.startswith("sdxl_bento"):
                found.add(target)
                found.update(f"{target}.{alias.name}" for alias in node.names)  # `from . import x`
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("sdxl_bento"))
    return {name for name in found if _is_module(name)}


def _is_module(dotted: str) -> bool:
    parts = dotted.split(".")[1:]
    return (PACKAGE.joinpath(*parts).with_suffix(".py").is_file() or PACKAGE.joinpath(*parts).is_dir()) if parts \
        else True


@pytest.mark.parametrize("layer", [None, "http", "adapters", "core", "cli", WIRING])
def test_layers_above_the_gpu_import_no_torch(layer):
    names = [f"sdxl_bento.{WIRING}"] if layer == WIRING else modules(layer)
    script = ("import importlib, json, sys\n"
              f"for name in {names!r}: importlib.import_module(name)\n"
              "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == [], f"{layer or 'shared'} imports torch"


def test_http_adapters_and_core_reach_the_gpu_only_through_the_scheduler():
    allowed = {"sdxl_bento.gpu", "sdxl_bento.gpu.scheduler"}
    for layer in ("http", "adapters", "core"):
        for path in sorted((PACKAGE / layer).glob("*.py")):
            reaching = {name for name in imports_of(path)
                        if name.startswith(("sdxl_bento.gpu", "sdxl_bento.store")) and name not in allowed}
            assert not reaching, f"{path.relative_to(PACKAGE)} imports {sorted(reaching)}"


def test_shared_modules_import_no_layer():
    for name in SHARED:
        layered = {m for m in imports_of(PACKAGE / f"{name}.py") if m.count(".") and m.split(".")[1] in LAYERS}
        assert not layered, f"{name}.py imports {sorted(layered)}"


def test_the_core_does_not_import_the_http_layer_or_the_adapters():
    for path in sorted((PACKAGE / "core").glob("*.py")):
        upward = {m for m in imports_of(path) if m.startswith(("sdxl_bento.http", "sdxl_bento.adapters"))}
        assert not upward, f"{path.relative_to(PACKAGE)} imports {sorted(upward)}"
