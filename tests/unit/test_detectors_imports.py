"""detectors/ is pure: it may import only the standard library, numpy and river."""

import ast
import sys
from pathlib import Path

DETECTORS = Path(__file__).resolve().parents[2] / "detectors"
ALLOWED_THIRD_PARTY = {"numpy", "river"}
# Modules of the standard library that reach a clock, the environment, files or the network.
FORBIDDEN_STDLIB = {
    "time",
    "datetime",
    "os",
    "socket",
    "asyncio",
    "subprocess",
    "pathlib",
    "io",
    "shutil",
    "urllib",
    "http",
    "threading",
    "multiprocessing",
    "tempfile",
    "glob",
    "signal",
    "sys",
    "ssl",
    "select",
    "selectors",
    "logging",
}


def _imported_roots(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_detectors_exist():
    assert sorted(DETECTORS.glob("*.py")), "detectors/ has no modules"


def test_detectors_import_only_stdlib_numpy_river():
    offenders = {}
    for path in sorted(DETECTORS.rglob("*.py")):
        roots = _imported_roots(path)
        bad = {
            r
            for r in roots
            if r not in ALLOWED_THIRD_PARTY
            and (r not in sys.stdlib_module_names or r in FORBIDDEN_STDLIB)
            and r not in {"__future__"}
        }
        if bad:
            offenders[path.name] = sorted(bad)
    assert offenders == {}, (
        f"detectors/ must import only stdlib (no clock/I/O), numpy, river: {offenders}"
    )


def test_the_rule_catches_a_violation(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom aiokafka import AIOKafkaProducer\nimport numpy as np\n")
    assert _imported_roots(bad) == {"time", "aiokafka", "numpy"}
