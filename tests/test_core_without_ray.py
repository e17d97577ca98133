"""The core (src/spatialrl outside its CLI layer) never imports Ray: it must run on a GPU
machine or in a process without Ray, so Ray lives only in actors/, learners/ and the CLI."""

import ast
import subprocess
import sys
from pathlib import Path

import spatialrl

CORE = Path(spatialrl.__file__).parent
CLI_LAYER = {CORE / "cli.py", CORE / "commands"}


def core_modules() -> list[Path]:
    return [path for path in sorted(CORE.rglob("*.py"))
            if not any(path == p or p in path.parents for p in CLI_LAYER)]


def ray_imports(path: Path) -> list[int]:
    """Lines that import ray or a ray submodule, at module level or inside a function."""
    lines = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name == "ray" or name.startswith("ray.") for name in names):
            lines.append(node.lineno)
    return lines


def test_no_core_module_imports_ray_anywhere_in_its_code():
    modules = core_modules()
    assert len(modules) > 30  # the walk found the core, not an empty folder
    offenders = {str(p.relative_to(CORE)): lines for p in modules if (lines := ray_imports(p))}
    assert offenders == {}


def test_the_checker_sees_an_import_inside_a_function(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from ray import serve\n    import ray.data\n")
    assert ray_imports(module) == [2, 3]


def test_importing_every_core_module_leaves_ray_unloaded():
    names = [".".join(("spatialrl", *p.relative_to(CORE).with_suffix("").parts))
             for p in core_modules()]
    names = [n.removesuffix(".__init__") for n in names]
    code = ("import importlib, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print('ray' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == "False"
