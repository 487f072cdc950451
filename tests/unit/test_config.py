"""Settings and experiment files: realistic mistakes get errors that name the file, the
experiment, the field and what is allowed; `armguard check-config` exits 2 on them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from armguard.daemon.errors import ConfigError
from armguard.daemon.experiments import load_experiments, parse_experiments
from armguard.daemon.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]

OK_ARMS = "control: c, arms: {c: 0.5, t: 0.5}"

MISTAKES = [
    (
        "unknown test",
        f"experiments:\n  - {{id: a, {OK_ARMS}, guardrails: [{{metric: x, test: ttest}}]}}",
        "x.yaml: experiment 'a': guardrails[0].test: unknown test 'ttest'; allowed: proportion, "
        "mean, srm, drift, change, anomaly",
    ),
    (
        "arms not summing to 1",
        "experiments:\n  - {id: a, control: c, arms: {c: 0.5, t: 0.6}}",
        "x.yaml: experiment 'a': arms: allocations must sum to 1, they sum to 1.1",
    ),
    (
        "control not among arms",
        "experiments:\n  - {id: a, control: ctrl, arms: {c: 0.5, t: 0.5}}",
        "x.yaml: experiment 'a': control: 'ctrl' is not among the arms (c, t)",
    ),
    (
        "margin abc",
        f"experiments:\n  - {{id: a, {OK_ARMS}, guardrails: [{{metric: x, test: mean, margin: abc}}]}}",
        "x.yaml: experiment 'a': guardrails[0].margin: 'abc' is not a number; use an absolute "
        "value like 0.002 or a relative one like '2%'",
    ),
    (
        "duplicate experiment id",
        f"experiments:\n  - {{id: a, {OK_ARMS}}}\n  - {{id: a, {OK_ARMS}}}",
        "x.yaml: experiments: duplicate experiment id 'a'; ids must be unique",
    ),
    (
        "negative min_samples",
        f"experiments:\n  - {{id: a, {OK_ARMS}, guardrails: [{{metric: x, test: mean, min_samples: -5}}]}}",
        "x.yaml: experiment 'a': guardrails[0].min_samples: must be >= 0 (got -5)",
    ),
    ("empty file", "", "x.yaml: the file is empty; it needs an `experiments:` list"),
    (
        "unknown action",
        f"experiments:\n  - {{id: a, {OK_ARMS}, guardrails: [{{metric: x, test: mean, action: explode}}]}}",
        "x.yaml: experiment 'a': guardrails[0].action: got 'explode'; allowed: 'alert', 'pause' or 'kill'",
    ),
    (
        "misspelled key",
        f"experiments:\n  - {{id: a, {OK_ARMS}, guardrail: []}}",
        "x.yaml: experiment 'a': guardrail: unknown key; remove it or check its spelling",
    ),
    (
        "alpha above 0.5",
        f"experiments:\n  - {{id: a, {OK_ARMS}, alpha: 2}}",
        "x.yaml: experiment 'a': alpha: must be <= 0.5 (got 2)",
    ),
    (
        "guardrail without metric",
        f"experiments:\n  - {{id: a, {OK_ARMS}, guardrails: [{{test: proportion}}]}}",
        "x.yaml: experiment 'a': guardrails[0].metric: required for test 'proportion'",
    ),
    (
        "single arm",
        "experiments:\n  - {id: a, control: c, arms: {c: 1.0}}",
        "x.yaml: experiment 'a': arms: at least two arms are needed (a control and a treatment)",
    ),
    (
        "missing id",
        f"experiments:\n  - {{{OK_ARMS}}}",
        "x.yaml: experiment '#1': id: required field is missing",
    ),
    (
        "negative margin",
        f"experiments:\n  - {{id: a, {OK_ARMS}, guardrails: [{{metric: x, test: mean, margin: -1}}]}}",
        "x.yaml: experiment 'a': guardrails[0].margin: must be >= 0; it is the harm tolerated "
        "before the guardrail breaches (the harmful direction is set by `harmful`)",
    ),
    (
        "top level is a list",
        "- id: a",
        "x.yaml: the top level must be a mapping with an `experiments:` list",
    ),
    (
        "id ending in a newline",
        f'experiments:\n  - {{id: "a\\n", {OK_ARMS}}}',
        "x.yaml: experiment 'a\\n': id: 'a\\n' is not a valid id: use 1-100 letters, digits, "
        "'.', '_' or '-', starting with a letter or digit",
    ),
    (
        "arm name ending in a newline",
        'experiments:\n  - {id: a, control: c, arms: {c: 0.5, "t\\n": 0.5}}',
        "x.yaml: experiment 'a': arms: arm name 't\\n' is not valid: letters, digits, '.', '_', '-'",
    ),
    (
        "reference mode on a mean test",
        f"experiments:\n  - {{id: a, {OK_ARMS}, guardrails: [{{metric: x, test: mean, mode: reference}}]}}",
        "x.yaml: experiment 'a': guardrails[0].mode: only drift guardrails have a mode (control or reference)",
    ),
    (
        "metric range beyond what the summaries hold",
        f"experiments:\n  - {{id: a, {OK_ARMS}, metrics: {{spend: {{min: -1e120}}}}}}",
        "x.yaml: experiment 'a': metrics.spend: min must be within [-1e100, 1e100] (the default "
        "range), got -1e+120: rescale the metric (e.g. another unit)",
    ),
]


@pytest.mark.parametrize("name, text, message", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_mistake_gets_a_precise_error(name, text, message):
    with pytest.raises(ConfigError) as err:
        parse_experiments(text, where="x.yaml")
    assert str(err.value) == message


def test_every_problem_is_reported_at_once():
    text = (
        "experiments:\n"
        "  - {id: a, control: ctrl, arms: {c: 0.5, t: 0.5}}\n"
        "  - {id: b, control: c, arms: {c: 0.5, t: 0.5}, guardrails: [{metric: x, test: nope}]}\n"
    )
    with pytest.raises(ConfigError) as err:
        parse_experiments(text, where="x.yaml")
    assert [p.experiment for p in err.value.problems] == ["a", "b"]


def test_example_configs_are_valid():
    for name in ("experiments.yaml", "demo.yaml"):
        cfg = load_experiments(ROOT / "config" / name)
        assert cfg.experiments and len(cfg.version) == 16
    settings = load_settings(ROOT / "config" / "daemon.yaml")
    assert settings.topics.killswitch == "armguard.killswitch"


def test_config_version_changes_with_the_content():
    base = f"experiments:\n  - {{id: a, {OK_ARMS}, alpha: 0.05}}"
    assert parse_experiments(base, where="x").version == parse_experiments(base, where="y").version
    other = base.replace("0.05", "0.01")
    assert parse_experiments(base, where="x").version != parse_experiments(other, where="x").version


def test_settings_from_file_and_environment(tmp_path, monkeypatch):
    f = tmp_path / "s.yaml"
    f.write_text("kafka:\n  bootstrap_servers: file:9092\ningest:\n  flush_interval_s: 2\n")
    monkeypatch.setenv("ARMGUARD_INGEST__FLUSH_INTERVAL_S", "3")
    s = load_settings(f)
    assert s.kafka.bootstrap_servers == "file:9092"  # from the file
    assert s.ingest.flush_interval_s == 3.0  # the environment wins


def test_settings_unknown_key_names_the_field(tmp_path):
    f = tmp_path / "s.yaml"
    f.write_text("kafka:\n  bootstrap: x\n")
    with pytest.raises(ConfigError) as err:
        load_settings(f)
    assert str(err.value) == f"{f}: kafka.bootstrap: unknown key; remove it or check its spelling"


def test_settings_bad_value_from_environment(monkeypatch):
    monkeypatch.setenv("ARMGUARD_EVALUATE__EVALUATION_INTERVAL_S", "-1")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert "evaluate.evaluation_interval_s: must be > 0" in str(err.value)


def test_sasl_needs_credentials():
    with pytest.raises(Exception, match="needs sasl_mechanism, sasl_username and sasl_password"):
        Settings(kafka={"security_protocol": "SASL_SSL"})


def test_secrets_are_never_printed():
    s = Settings(
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "PLAIN",
            "sasl_username": "u",
            "sasl_password": "hunter2",
        },
        commands={"hmac_key": "topsecret"},
        http={"bearer_token": "tok3n"},
    )
    text = repr(s) + str(s) + s.model_dump_json()
    for secret in ("hunter2", "topsecret", "tok3n"):
        assert secret not in text


def test_check_config_cli_exit_codes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("experiments:\n  - {id: a, control: c, arms: {c: 0.5, t: 0.6}}\n")
    run = [sys.executable, "-m", "armguard.daemon.cli", "check-config"]
    good = subprocess.run(
        [*run, str(ROOT / "config" / "experiments.yaml")], capture_output=True, text=True
    )
    assert good.returncode == 0 and "ok: 2 experiment(s)" in good.stdout
    failed = subprocess.run(
        [*run, str(bad), str(tmp_path / "missing.yaml")], capture_output=True, text=True
    )
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f"error: {bad}: experiment 'a': arms: allocations must sum to 1, they sum to 1.1",
        f"error: {tmp_path / 'missing.yaml'}: file not found",
    ]


def test_version_and_help():
    run = [sys.executable, "-m", "armguard.daemon.cli"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("armguard 0.")
    helptext = subprocess.run([*run, "--help"], capture_output=True, text=True).stdout
    for command in ("run", "check-config", "replay", "simulate", "kill", "status", "watch"):
        assert f"    {command}" in helptext, command
