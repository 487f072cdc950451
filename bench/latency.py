"""Latency of armguard's decisions, end to end, on the local broker: one entry point for both.

* **Decision latency and state restore** (``bench/decision_latency.py``): at a steady 50,000
  events/s, the wall time from producing the record a kill rests on to the kill-switch event being
  readable (read_committed), p50/p99 over repeated regressions, against flush interval +
  evaluation interval + 1 s; and the time to restore the evaluate stage's state for 1,000 and
  10,000 experiments, against 5 s.
* **Follower latency** (``bench/follower_latency.py``): from the commit of a kill-switch event to
  ``KillSwitchFollower.allowed()`` turning false, p50/p99 over many kills, against 500 ms.

Usage: ``.venv/bin/python bench/latency.py [--only decisions|restore|follower]``; each script
also runs on its own with its own options (``--help``). Figures: bench/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"armguard_bench_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("decisions", "restore", "follower"))
    args = parser.parse_args()
    bootstrap = os.environ.get("ARMGUARD_TEST_BOOTSTRAP", "127.0.0.1:19092")
    if args.only in (None, "decisions", "restore"):
        sys.argv = [str(HERE / "decision_latency.py")] + (
            ["--only", args.only] if args.only else []
        )
        _load("decision_latency").main()
    if args.only in (None, "follower"):
        print("\n## Follower latency")
        sys.argv = [str(HERE / "follower_latency.py"), "--bootstrap", bootstrap]
        _load("follower_latency").main()


if __name__ == "__main__":
    main()
