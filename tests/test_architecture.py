"""Dependency rules of docs/design.md §3, checked on the source, and import-time isolation."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import REPO

PKG = REPO / "erasepro_hub"
HEAVY = ("diffusers", "transformers", "huggingface_hub", "peft", "accelerate", "datasets")


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in a file (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def files(sub: str) -> list[Path]:
    return sorted((PKG / sub).rglob("*.py")) if (PKG / sub).is_dir() else [PKG / f"{sub}.py"]


def uses(path: Path, prefix: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for name in imports_of(path))


def test_solver_imports_only_torch_and_itself():
    for path in files("solver"):
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top in {"torch", "__future__", "dataclasses", "typing", "math", "erasepro_hub"} or name.startswith(
                ("erasepro_hub.solver", "erasepro_hub.errors")
            ), f"{path.name} imports {name}"
            if top == "erasepro_hub":
                assert name.startswith(("erasepro_hub.solver", "erasepro_hub.errors")), f"{path.name} imports {name}"


def test_only_models_imports_diffusers_and_transformers():
    for path in PKG.rglob("*.py"):
        if "models" in path.relative_to(PKG).parts:
            continue
        for lib in ("diffusers", "transformers"):
            assert not uses(path, lib), f"{path.relative_to(REPO)} imports {lib}"


def test_only_hub_imports_huggingface_hub():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).parts
        if rel[0] == "hub":
            continue
        assert not uses(path, "huggingface_hub"), f"{path.relative_to(REPO)} imports huggingface_hub"


def test_one_way_dependencies():
    forbidden = {
        "solver": ("models", "erase", "cli", "manifest", "adapters", "cards", "hub", "metrics"),
        "manifest": ("models", "erase", "cli", "adapters", "cards", "hub", "metrics"),
        "models": ("erase", "cli", "adapters", "cards", "hub", "metrics", "manifest"),
        "adapters": ("models", "erase", "cli", "cards", "metrics", "hub", "api"),
        "cards": ("models", "erase", "cli", "adapters", "metrics", "hub.publish", "hub.pull", "hub.client", "hub.download", "api"),
        "hub": ("models", "erase", "cli", "metrics", "cards", "api"),
        "metrics": ("erase", "cli", "api", "models.progressive"),
        "layout": ("models", "erase", "cli", "adapters", "cards", "hub", "metrics", "manifest", "solver", "api"),
        "testing": ("models", "erase", "cli", "adapters", "cards", "hub", "metrics", "manifest", "solver"),
        "erase": ("cli", "verification", "evaluation", "api"),
        "recipe": ("erase", "output", "verification", "evaluation", "cli", "api", "adapters", "hub", "cards"),
        "computation": ("erase", "output", "verification", "recipe", "models", "cli", "api"),
        "output": ("erase", "verification", "evaluation", "cli", "api", "hub"),
    }
    for sub, banned in forbidden.items():
        for path in files(sub):
            for other in banned:
                assert not uses(path, f"erasepro_hub.{other}"), f"{path.relative_to(REPO)} imports erasepro_hub.{other}"


def _modules_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return set(out.split())


def test_importing_the_solver_imports_no_model_library():
    loaded = _modules_after("import erasepro_hub.solver")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY]


def test_cli_start_up_is_lazy():
    loaded = _modules_after("import erasepro_hub.cli, erasepro_hub.manifest")
    assert not [m for m in loaded if m.split(".")[0] in HEAVY + ("torch",)]


def test_no_pickle_loading_anywhere():
    """No torch.load, pickle or .bin reading: safetensors only."""
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        for banned in ("torch.load(", "import pickle", "pickle.load", "joblib", "weights_only"):
            assert banned not in text, f"{path.relative_to(REPO)} contains {banned}"


def test_the_test_hub_uses_only_the_standard_library_and_pyyaml():
    allowed = set(sys.stdlib_module_names) | {"yaml", "erasepro_hub"}
    for path in files("testing"):
        for name in imports_of(path):
            assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_no_import_cycles_between_packages():
    """The package-level import graph (lazy imports included) has no cycle."""
    graph: dict[str, set[str]] = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("").parts
        node = rel[0]
        for name in imports_of(path):
            parts = name.split(".")
            if parts[0] == "erasepro_hub" and len(parts) > 1 and parts[1] != node:
                target = parts[1]
                if (PKG / target).is_dir() or (PKG / f"{target}.py").is_file():
                    graph.setdefault(node, set()).add(target)

    def reach(start: str, seen: set[str]) -> set[str]:
        for nxt in graph.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reach(nxt, seen)
        return seen

    cycles = sorted(f"{a} -> {b} -> … -> {a}" for a in graph for b in graph[a] if a in reach(b, set()))
    assert not cycles, cycles


def test_long_modules_say_why_they_are_one_module():
    """No module over ~300 lines without a reason written at its top (``Why one module ...``)."""
    for path in PKG.rglob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > 320:
            docstring = ast.get_docstring(ast.parse("\n".join(lines))) or ""
            assert "Why one module" in docstring, f"{path.relative_to(REPO)} has {len(lines)} lines and no reason at its top"
