import pkgutil
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
