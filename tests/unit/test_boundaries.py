import ast
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import retrieval_core

REPO = Path(__file__).resolve().parents[2]


def test_library_imports_neither_ray_nor_torch_at_import_time():
    modules = [m.name for m in pkgutil.walk_packages(retrieval_core.__path__, "retrieval_core.")]
    assert "retrieval_core.encode.encoding" in modules and len(modules) >= 30
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print(sorted(m for m in ('ray', 'torch', 'sentence_transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"


def test_no_library_source_mentions_ray_imports():
    for path in (REPO / "retrieval_core").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("import ray", "from ray")), f"{path}: {line}"


def _imports_ray(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip().startswith(("import ray", "from ray"))]


def test_only_jobs_ray_imports_ray():
    """The stage drivers say what to run; jobs/ray (the session, dispatch, actors, Ray Train) alone speaks Ray."""
    speaking = {path.relative_to(REPO).as_posix() for path in (REPO / "jobs").rglob("*.py") if _imports_ray(path)}
    assert speaking and all(p.startswith("jobs/ray/") for p in speaking), sorted(speaking)
    assert {"jobs/ray/dispatch.py", "jobs/ray/cluster.py"} <= speaking


LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS)], capture_output=True, text=True, cwd=cwd)


def _copy_of_the_house(tmp_path: Path) -> Path:
    for name in ("retrieval_core", "jobs"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_import_contracts_hold():
    result = _lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def test_a_planted_layer_violation_breaks_the_lint(tmp_path):
    """io is below mine: storage importing the mining stage is refused, naming both ends."""
    house = _copy_of_the_house(tmp_path)
    with open(house / "retrieval_core" / "io" / "storage.py", "a") as handle:
        handle.write("\nfrom retrieval_core.mine import mining  # planted\n")
    result = _lint_imports(house)
    assert result.returncode != 0
    assert "retrieval_core.io is not allowed to import retrieval_core.mine" in result.stdout
    assert "retrieval_core.io.storage -> retrieval_core.mine.mining" in result.stdout


def test_a_planted_ray_import_outside_jobs_ray_breaks_the_lint(tmp_path):
    house = _copy_of_the_house(tmp_path)
    with open(house / "jobs" / "encode.py", "a") as handle:
        handle.write("\nimport ray  # planted\n")
    result = _lint_imports(house)
    assert result.returncode != 0
    assert "only jobs.ray imports ray BROKEN" in result.stdout
    assert "jobs.encode is not allowed to import ray" in result.stdout


MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _sources() -> list[Path]:
    return sorted([*(REPO / "retrieval_core").rglob("*.py"), *(REPO / "jobs").rglob("*.py")])


def test_no_module_is_over_600_lines():
    long = {
        p.relative_to(REPO).as_posix(): n
        for p in _sources()
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, long


def test_no_function_is_over_80_lines_without_its_reason():
    """A longer function says why in a ``# long: <reason>`` comment on its ``def`` line."""
    long = []
    for path in _sources():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1
                if size > MAX_FUNCTION_LINES and "# long:" not in lines[node.lineno - 1]:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({size} lines)")
    assert not long, long
