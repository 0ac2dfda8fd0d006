"""The layer order, enforced by reading every module's imports (ast: also lazy imports inside functions).

    0 core         edge.* (model, config, checkpoint, tokenizer, chat, files, errors, train, headers)
    1 contracts    edge.formats.*: the registry and each format's contract
    2 engines      export.* and runtime.*, which never import each other
    3 tools        arch_search.* and device.*: the search measures through device's transports
                   (arch_search -> device); device never imports the search (it starts the search's
                   timing child by module name, and shares the runner and the work folder through
                   runtime.isolate)
    4 CLI          edge.cli

A module may import its own layer (but for export <-> runtime and device -> arch_search) and the layers
below, never above. The
registry names exporters and backends as "module:attr" strings, resolved on use, so it stays in layer 1.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("edge", "export", "runtime", "arch_search", "device")
# same layer, never these directions: no circle between the engines, none between the tools
FORBIDDEN_PAIRS = {("export", "runtime"), ("runtime", "export"), ("device", "arch_search")}


def group(module: str) -> str | None:
    """The layer group of a project module ("edge.formats.gguf" -> "edge.formats"), None if not ours."""
    top = module.split(".")[0]
    if top not in PACKAGES:
        return None
    if top == "edge":
        for sub in ("edge.cli", "edge.formats"):
            if module == sub or module.startswith(sub + "."):
                return sub
        return "edge"
    return top


LAYER = {"edge": 0, "edge.formats": 1, "export": 2, "runtime": 2, "arch_search": 3, "device": 3, "edge.cli": 4}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import in `source`, anywhere in it, relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from pkg import sub` may import a submodule: count pkg.sub where that is one of ours
            found += [(node.lineno, target)]
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names
                      if (ROOT / (target.replace(".", "/") + f"/{alias.name}.py")).exists()
                      or (ROOT / (target.replace(".", "/") + f"/{alias.name}")).is_dir()]
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    mine = group(module)
    out = []
    for line, target in imported(module, source, is_package):
        theirs = group(target)
        if theirs is None or theirs == mine:
            continue
        if LAYER[theirs] > LAYER[mine] or (mine, theirs) in FORBIDDEN_PAIRS:
            out.append(f"{module}:{line} imports {target} ({mine}, layer {LAYER[mine]} -> "
                       f"{theirs}, layer {LAYER[theirs]})")
    return out


def project_modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield module_name(path), path


def test_every_module_imports_down_the_layers():
    found = []
    for module, path in project_modules():
        found += violations(module, path.read_text(), is_package=path.name == "__init__.py")
    assert not found, "layer order broken:\n" + "\n".join(found)


def test_every_module_has_a_layer():
    assert all(group(module) in LAYER for module, _ in project_modules())


@pytest.mark.parametrize("module, source, broken", [
    ("export.gguf", "def f():\n    from runtime.llamacpp import llama_log\n", True),   # lazy, sideways
    ("runtime.executorch", "import export.executorch\n", True),
    ("runtime", "from .llamacpp import LlamaCppSession\nfrom export import genai\n", True),
    ("edge.formats.gguf", "from runtime import load\n", True),                          # upward
    ("edge.model", "from edge.formats import FORMATS\n", True),
    ("edge.model", "from . import cli\n", True),                                         # relative
    ("device.client", "from arch_search.measure import MeasureFailed\n", True),         # tools, wrong way
    ("device.agent", "def f():\n    import arch_search.measure\n", True),
    ("device.client", "from runtime.isolate import MeasureFailed\n", False),
    ("arch_search.search", "from device.transport import transports\n", False),
    ("runtime.llamacpp", "from edge.formats.gguf import ARCH\nfrom .session import Session\n", False),
    ("edge.cli", "import runtime, export, arch_search.cli, device.agent\n", False),
])
def test_the_check_catches_a_planted_violation(module, source, broken):
    assert bool(violations(module, source, is_package=module == "runtime")) == broken
