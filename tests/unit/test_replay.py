"""`armguard replay` on a telemetry file: the regressed arm is killed, deterministically."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "armguard.daemon.cli", *args],
        cwd=cwd,
        capture_output=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def telemetry(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("replay") / "demo.jsonl"
    done = _cli(
        "simulate",
        "--experiments",
        "config/demo.yaml",
        "--scenario",
        "config/simulate-demo.yaml",
        "--records",
        "150000",
        "--start-ts",
        "1764300000",
        "--output",
        str(path),
    )
    assert done.returncode == 0, done.stderr.decode()
    return path


def test_replay_kills_the_regressed_arm_and_nothing_else(telemetry):
    done = _cli("replay", "--config", "config/demo.yaml", "--cut-seconds", "5", str(telemetry))
    assert done.returncode == 0, done.stderr.decode()
    events = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert len(events) == 1
    data = events[0]["data"]
    assert data["arms"] == {"control": "running", "treatment-a": "killed", "treatment-b": "running"}
    assert data["decision"]["arm"] == "treatment-a"
    # The regression starts 20 s into event time; the decision cannot precede it.
    assert events[0]["time"] >= "2025-11-28T03:20:20"
    assert b"150000 records" in done.stderr


@pytest.mark.parametrize("cut", [["--cut-seconds", "5"], ["--cut-records", "7000"]])
def test_replay_is_bit_for_bit_deterministic(telemetry, cut):
    runs = [
        _cli("replay", "--config", "config/demo.yaml", "--decisions", *cut, str(telemetry))
        for _ in range(2)
    ]
    assert all(r.returncode == 0 for r in runs)
    assert runs[0].stdout == runs[1].stdout and runs[0].stdout.count(b"\n") >= 1


def test_replay_reads_stdin_and_reports_missing_files(telemetry):
    with telemetry.open("rb") as fh:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "armguard.daemon.cli",
                "replay",
                "--config",
                "config/demo.yaml",
                "-",
            ],
            cwd=ROOT,
            stdin=fh,
            capture_output=True,
            timeout=300,
        )
    assert done.returncode == 0 and done.stdout.count(b"\n") == 1
    missing = _cli("replay", "--config", "config/demo.yaml", "nowhere.jsonl")
    assert missing.returncode == 2 and b"nowhere.jsonl: file not found" in missing.stderr
