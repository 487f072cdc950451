"""Every example in the README runs: YAML validates, command lines parse, outputs match."""

from __future__ import annotations

import itertools
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from armguard.daemon.cli import build_parser
from armguard.daemon.experiments import parse_experiments

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, flags=re.S)

# Placeholders in command synopses and the values the test substitutes.
PLACEHOLDERS = {
    "EXPERIMENT": "ranker-v2",
    "FILE...": "config/experiments.yaml",
    "FILE": "config/experiments.yaml",
    "ARM": "treatment",
}


def _commands() -> list[str]:
    out = []
    for lang, body in BLOCKS:
        if lang != "console":
            continue
        for line in body.splitlines():
            line = line.removeprefix("$ ").strip()
            if line.startswith("armguard "):
                out.append(line.split("  #", 1)[0].split(" # ", 1)[0].strip())
    return out


def _expand(line: str) -> list[list[str]]:
    """`pause|resume X [--arm ARM]` -> every alternative, with and without the optional part."""
    words = shlex.split(line)[1:]
    choices = [w.split("|") if "|" in w and not w.startswith("-") else [w] for w in words]
    argvs = []
    for combo in itertools.product(*choices):
        argv: list[str] = []
        optional: list[list[str]] = []
        buf: list[str] | None = None
        for w in combo:
            if w.startswith("["):
                buf = [w.strip("[]")]
                if w.endswith("]"):
                    optional.append(buf)
                    buf = None
            elif buf is not None:
                buf.append(w.strip("]"))
                if w.endswith("]"):
                    optional.append(buf)
                    buf = None
            else:
                argv.append(w)
        for opt in [[], *optional]:
            argvs.append([PLACEHOLDERS.get(w, w) for w in argv + opt])
    return argvs


def test_readme_has_examples():
    assert len(_commands()) >= 10
    assert any(lang == "yaml" for lang, _ in BLOCKS)


@pytest.mark.parametrize("line", _commands())
def test_every_command_line_in_the_readme_parses(line):
    parser = build_parser()
    for argv in _expand(line):
        args = parser.parse_args(argv)
        assert callable(args.handler), argv


def test_every_experiments_yaml_block_in_the_readme_validates():
    blocks = [body for lang, body in BLOCKS if lang == "yaml" and "experiments:" in body]
    assert blocks
    for body in blocks:
        cfg = parse_experiments(body, where="README.md")
        assert cfg.experiments


def test_the_check_config_example_output_is_true():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "armguard.daemon.cli",
            "check-config",
            "config/experiments.yaml",
            "config/daemon.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    block = next(
        body for lang, body in BLOCKS if lang == "console" and "check-config config/" in body
    )
    expected = [ln for ln in block.splitlines() if ln and not ln.startswith("$")]
    got = done.stdout.splitlines()
    assert len(got) == len(expected)
    for want, line in zip(expected, got, strict=True):
        assert line.startswith(want.removesuffix("...").rstrip()), (want, line)


def test_the_bad_config_example_error_is_true(tmp_path):
    m = re.search(r"`(config/bad\.yaml: experiment 'ranker-v2': arms: [^`]+)`", README)
    assert m, "the README shows an example error"
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "experiments:\n  - {id: ranker-v2, control: control, arms: {control: 0.5, treatment: 0.6}}\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "armguard.daemon.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: " + m.group(1).replace("config/bad.yaml", str(bad))


def test_the_dead_letter_reasons_in_the_readme_are_the_contracts():
    from armguard.daemon.contract import REASONS

    section = README.split("## Telemetry and dead letters", 1)[1].split("\n## ", 1)[0]
    listed = section.split("The reasons are", 1)[1].split("Records of experiments", 1)[0]
    assert re.findall(r"`([a-z_]+)`", listed.split("(")[0] + listed) and set(REASONS) <= set(
        re.findall(r"`([a-z_]+)`", listed)
    )
