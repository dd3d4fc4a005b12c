"""The repository's layout cannot break an installed environment, and the runtime imports no tooling.

Python puts the repository root on `sys.path` whenever it runs there (`python -m pytest`, `python -c`, a REPL), so a
top-level folder that is a regular package would be imported in place of any installed distribution of the same
name; transformers >= 5.25 imports Hugging Face's `kernels`, and our `kernels/` folder once shadowed it.
"""

from __future__ import annotations

import ast
import importlib.metadata
import subprocess
import sys

import pytest
from conftest import REPO

PACKAGE = REPO / "oscar_hf"
# Folders installed inside the package (pyproject.toml), linked into it as oscar_hf/<name> -> ../<name>.
SUBPACKAGE_FOLDERS = ("kernels", "calibrate", "hub_cards")


def run_in_repo_root(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)


def test_no_top_level_folder_but_the_package_is_a_regular_package():
    regular = sorted(p.name for p in REPO.iterdir() if p.is_dir() and (p / "__init__.py").exists())
    assert regular == ["oscar_hf"], f"{regular}: a top-level folder with __init__.py shadows installed packages"


@pytest.mark.parametrize("name", SUBPACKAGE_FOLDERS)
def test_tooling_folders_are_linked_into_the_package(name):
    link = PACKAGE / name
    assert link.is_symlink() and link.resolve() == (REPO / name).resolve()


def test_installed_distributions_win_over_top_level_folders_from_the_repository_root():
    """Every top-level folder whose name is also an installed top-level module imports the installed one."""
    installed = importlib.metadata.packages_distributions()
    clashes = [p.name for p in REPO.iterdir() if p.is_dir() and p.name in installed and p.name != "oscar_hf"]
    code = "import importlib, sys\n" + "".join(
        f"m = importlib.import_module({name!r}); assert {str(REPO)!r} not in str(getattr(m, '__file__', None) or "
        f"list(m.__path__)), ({name!r}, m)\n"
        for name in clashes
    )
    result = run_in_repo_root(code)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(
    "kernels" not in importlib.metadata.packages_distributions(),
    reason="Hugging Face `kernels` is not installed (transformers < 5.25 does not require it)",
)
def test_transformers_hub_kernels_and_the_package_import_from_the_repository_root():
    result = run_in_repo_root(
        "import transformers.integrations.hub_kernels, transformers.modeling_utils, oscar_hf, kernels\n"
        "import oscar_hf.kernels.decode_attention, oscar_hf.kernels.quantize, oscar_hf.calibrate.core\n"
        f"assert {str(REPO)!r} not in (kernels.__file__ or ''), kernels.__file__\n"
    )
    assert result.returncode == 0, result.stderr


def test_importing_the_package_imports_no_tooling():
    result = run_in_repo_root(
        "import sys, oscar_hf\n"
        "tooling = sorted(m for m in sys.modules if m.startswith(('oscar_hf.evaluation', 'oscar_hf.calibrate',"
        " 'matplotlib', 'optimum')))\n"
        "assert not tooling, tooling\n"
    )
    assert result.returncode == 0, result.stderr


def _package_modules() -> dict[str, ast.Module]:
    """Module name -> syntax tree of every module of the installed package (the linked folders included)."""
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("oscar_hf", *parts))
        modules[name.removesuffix(".__init__")] = ast.parse(path.read_text(), str(path))
    return modules


def _imports(name: str, tree: ast.Module, is_package: bool, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its body (function-level imports count: they are cycles too)."""
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                module = ".".join(anchor + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known and t != name)
    return found


def test_no_import_cycle_among_the_package_modules():
    modules = _package_modules()
    known = set(modules)
    packages = {n for n in known if (PACKAGE / n.removeprefix("oscar_hf").lstrip(".").replace(".", "/")).is_dir()}
    graph = {n: _imports(n, tree, n in packages, known) for n, tree in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle of modules; edges into a package stand for its
    # __init__, which a submodule importing a sibling never runs again.
    graph = {n: {d for d in deps if not d.startswith(n + ".")} for n, deps in graph.items()}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_quickstart_runs_from_the_repository_root(tmp_path):
    result = subprocess.run(
        [sys.executable, "examples/quickstart.py", "--prompt-tokens", "400", "--max-new-tokens", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
