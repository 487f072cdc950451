"""The deployment files agree with the code and with each other.

There is no Docker engine or Kubernetes cluster here, so these tests read the files: every file
docker-compose mounts exists, every host and port it references is a service that listens there,
every ARMGUARD_* variable is a real setting (derived from the Settings model, so renaming a setting
breaks this test), every metric the rules and the dashboard use is exported by daemon/metrics.py,
and every alert has its runbook section and a promtool test.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import BaseModel

from armguard.daemon.cli import build_parser
from armguard.daemon.experiments import load_experiments, parse_experiments
from armguard.daemon.health import Health
from armguard.daemon.http import HttpServer, _HealthCollector
from armguard.daemon.kafka import topic_configs
from armguard.daemon.metrics import GuardrailSample, Metrics
from armguard.daemon.settings import HttpSettings, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "armguard.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "armguard.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "armguard.json"
K8S = DEPLOY / "kubernetes"


# -- helpers ---------------------------------------------------------------------------------------


def env_names(model: type[BaseModel] = Settings, prefix: str = "ARMGUARD_") -> set[str]:
    """Every environment variable the settings read, derived from the model."""
    names = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= env_names(ann, f"{prefix}{name.upper()}__")
        else:
            names.add(f"{prefix}{name.upper()}")
    return names


def secret_env_names(model: type[BaseModel] = Settings, prefix: str = "ARMGUARD_") -> set[str]:
    from pydantic import SecretStr

    names = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names |= secret_env_names(ann, f"{prefix}{name.upper()}__")
        elif "SecretStr" in repr(ann) or ann is SecretStr:
            names.add(f"{prefix}{name.upper()}")
    return names


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def k8s(kind: str) -> dict[str, Any]:
    found = [
        d for p in sorted(K8S.glob("*.yaml")) for d in load_yaml_docs(p) if d.get("kind") == kind
    ]
    found = [d for d in found if d["metadata"].get("name") == "armguard" or kind == "ConfigMap"]
    assert len(found) == 1, f"expected one {kind} in deploy/kubernetes, found {len(found)}"
    return found[0]


def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def interpolate(value: str) -> str:
    # ${VAR:-default} -> default (the engine would use the environment; the test uses defaults)
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", str(value))


def exported_metric_names() -> set[str]:
    """Sample names armguard exports, with every metric family populated."""
    registry = CollectorRegistry()
    m = Metrics(registry)
    for attr in vars(m).values():
        labelnames = getattr(attr, "labelnames", None)
        if labelnames:
            child = attr.labels(**{n: "x" for n in labelnames})
            (getattr(child, "inc", None) or child.observe)(1)
    m.state_restore_duration.observe(1)
    m.label_sets_dropped.labels(metric="x").inc()
    m.summaries_written.inc()
    m.set_guardrail_provider(
        lambda: [
            GuardrailSample(
                experiment="e",
                arm=a,
                guardrail=f"g-{t}",
                test=t,
                state="ok",
                estimate=1,
                lower=0,
                upper=2,
                p_value=0.5,
                score=1,
                threshold=2,
            )
            for a in ("b",)
            for t in ("mean", "srm", "drift", "anomaly")
        ]
    )
    health = Health()
    health.beat("loop")
    health.set_ready("c", True)
    registry.register(_HealthCollector(health))
    text = generate_latest(registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    names.discard("")
    return names


METRIC_TOKEN = re.compile(r"\barmguard_[a-z0-9_]+\b")


# -- metric names ----------------------------------------------------------------------------------


def test_every_metric_in_rules_tests_and_dashboard_is_exported():
    exported = exported_metric_names()
    sources = {
        "rules": RULES.read_text(),
        "dashboard": DASHBOARD.read_text(),
        "rule tests": RULE_TESTS.read_text(),
    }
    for where, text in sources.items():
        used = {
            t
            for t in METRIC_TOKEN.findall(text)
            if not t.startswith(
                ("armguard_guardrail_state_", "armguard_ingest", "armguard_evaluate")
            )
        }
        assert used, where
        missing = sorted(used - exported)
        assert not missing, f"{where} uses metrics armguard does not export: {missing}"


def test_dashboard_covers_the_issue():
    board = json.loads(DASHBOARD.read_text())
    exprs = " ".join(
        t["expr"] for p in board["panels"] for t in p.get("targets", []) if "expr" in t
    )
    for name in (
        "armguard_guardrail_estimate",
        "armguard_guardrail_lower",
        "armguard_guardrail_upper",
        "armguard_srm_p_value",
        "armguard_drift_score",
        "armguard_anomaly_score",
        "armguard_records_consumed_total",
        "armguard_consumer_lag_records",
        "armguard_records_deadlettered_total",
    ):
        assert name in exprs, name
    annotations = [a for a in board["annotations"]["list"] if "expr" in a]
    assert any("armguard_killswitch_events_total" in a["expr"] for a in annotations)
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for p in board["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "prometheus"


# -- alert rules, their tests and the runbook ------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_every_alert_is_complete_and_has_a_runbook_section():
    runbook = (DEPLOY / "RUNBOOK.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", runbook, flags=re.M)
    }
    alerts = alert_rules()
    assert len(alerts) >= 10
    for r in alerts:
        name = r["alert"]
        assert r.get("for"), f"{name} has no for:"
        assert r["labels"]["severity"] in ("page", "ticket"), name
        for key in ("summary", "description", "runbook_url"):
            assert r["annotations"].get(key), f"{name} lacks {key}"
        path, _, anchor = r["annotations"]["runbook_url"].partition("#")
        assert path == "deploy/RUNBOOK.md", name
        assert anchor in anchors, f"{name}: RUNBOOK.md has no section #{anchor}"


def test_alerts_the_issue_asks_for():
    by_name = {r["alert"]: r for r in alert_rules()}
    assert by_name["ArmguardGuardrailBreach"]["labels"]["severity"] == "page"
    for name in ("ArmguardSampleRatioMismatch", "ArmguardDrift", "ArmguardAnomaly"):
        assert by_name[name]["labels"]["severity"] == "ticket"
    for name in (
        "ArmguardConsumerLagGrowing",
        "ArmguardDeadLetterRate",
        "ArmguardDown",
        "ArmguardNotReady",
        "ArmguardTransactionsFailing",
    ):
        assert name in by_name


def test_every_alert_has_a_firing_promtool_test():
    tests = yaml.safe_load(RULE_TESTS.read_text())
    assert tests["rule_files"] == ["../rules/armguard.rules.yml"]
    fired = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    silent = {
        case["alertname"]
        for t in tests["tests"]
        for case in t.get("alert_rule_test", [])
        if not case.get("exp_alerts")
    }
    names = {r["alert"] for r in alert_rules()}
    assert names <= fired, f"no firing test for {sorted(names - fired)}"
    assert names <= silent, f"no not-firing test for {sorted(names - silent)}"


def test_prometheus_rule_for_the_operator_equals_the_rules_file():
    rule = k8s("PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]


def test_alertmanager_routes_and_inhibits_as_the_issue_says():
    am = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    assert am["route"]["group_by"] == ["experiment"]
    receivers = {r["name"] for r in am["receivers"]}
    by_severity = {m: r["receiver"] for r in am["route"]["routes"] for m in r["matchers"]}
    assert by_severity['severity="page"'] in receivers
    assert by_severity['severity="ticket"'] in receivers
    assert by_severity['severity="page"'] != by_severity['severity="ticket"']
    inhibit = am["inhibit_rules"][0]
    assert 'alertname="ArmguardGuardrailBreach"' in inhibit["source_matchers"]
    assert inhibit["target_matchers"] == ['severity="ticket"']
    assert inhibit["equal"] == ["experiment"]


# -- docker-compose --------------------------------------------------------------------------------


def test_compose_has_every_component():
    services = compose()["services"]
    for name in (
        "kafka",
        "kafka-init",
        "armguard",
        "simulator",
        "prometheus",
        "alertmanager",
        "grafana",
    ):
        assert name in services, name
    kafka = services["kafka"]
    assert re.fullmatch(r"apache/kafka:3\.9\.\d+", kafka["image"])
    env = kafka["environment"]
    assert "controller" in env["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    assert not any("ZOOKEEPER" in k for k in env)
    for name, svc in services.items():
        image = svc.get("image", "")
        assert ":" in image and not image.endswith(":latest"), f"{name}: pin the image tag"


def test_compose_mounts_exist_and_references_resolve():
    doc = compose()
    services = doc["services"]
    named = set(doc.get("volumes", {}))
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in named, f"{name}: volume {source} is not declared"
        deps = svc.get("depends_on", [])
        for dep in deps:  # a list, or a mapping of service -> condition
            assert dep in services, f"{name} depends on unknown service {dep}"
        build = svc.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def mounted(service: dict[str, Any], target: str) -> Path:
    """The host path docker-compose mounts at ``target`` (or under a mounted parent)."""
    for vol in service.get("volumes", []):
        parts = vol.split(":")
        src, dst = parts[0], parts[1]
        if target == dst or target.startswith(dst.rstrip("/") + "/"):
            return ROOT / src / target[len(dst) :].lstrip("/")
    raise AssertionError(f"{target} is not mounted")


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.split("//")[-1], int(port)


def container_ports(svc: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1].split("/")[0]) for p in svc.get("ports", [])}


def test_compose_armguard_settings_are_valid_and_consistent(monkeypatch):
    services = compose()["services"]
    valid = env_names()
    for name in ("armguard", "simulator"):
        svc = services[name]
        for key, value in svc["environment"].items():
            if key.startswith("ARMGUARD_"):
                assert key in valid, f"{name}: {key} is not a setting"
                monkeypatch.setenv(key, interpolate(value))
        args = build_parser().parse_args(svc["command"])
        assert args.command == svc["command"][0]
        for arg in svc["command"]:
            if arg.startswith("/"):
                assert mounted(svc, arg).is_file(), f"{name}: {arg} is not in a mounted directory"
    arm = services["armguard"]
    cmd = arm["command"]
    settings_file = mounted(arm, cmd[cmd.index("--settings") + 1])
    settings = load_settings(settings_file)
    experiments = mounted(arm, str(settings.experiments_file))
    assert load_experiments(experiments).experiments
    # Kafka: the bootstrap address is the kafka service's advertised in-network listener.
    host, port = host_port(settings.kafka.bootstrap_servers)
    assert host == "kafka"
    advertised = services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"//kafka:{port}" in advertised
    # HTTP: bound on all interfaces at the published port, which Prometheus scrapes.
    assert settings.http.host == "0.0.0.0"
    assert settings.http.port in container_ports(arm)
    prom_cfg = yaml.safe_load(
        mounted(services["prometheus"], "/etc/prometheus/prometheus.yml").read_text()
    )
    job = next(j for j in prom_cfg["scrape_configs"] if j["job_name"] == "armguard")
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"armguard:{settings.http.port}"]


def test_compose_prometheus_alertmanager_grafana_wiring():
    services = compose()["services"]
    prom = services["prometheus"]
    config_arg = next(a for a in prom["command"] if a.startswith("--config.file="))
    prom_file = mounted(prom, config_arg.split("=", 1)[1])
    prom_cfg = yaml.safe_load(prom_file.read_text())
    for pattern in prom_cfg["rule_files"]:
        assert list(prom_file.parent.glob(pattern)), f"rule_files {pattern} matches nothing"
    for am in prom_cfg["alerting"]["alertmanagers"]:
        for target in am["static_configs"][0]["targets"]:
            host, port = host_port(target)
            assert host in services and port in container_ports(services[host])
    am_svc = services["alertmanager"]
    am_arg = next(a for a in am_svc["command"] if a.startswith("--config.file="))
    am_cfg = yaml.safe_load(mounted(am_svc, am_arg.split("=", 1)[1]).read_text())
    for receiver in am_cfg["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            host, port = host_port(hook["url"].split("/")[2])
            assert host in services, f"receiver {receiver['name']} posts to unknown host {host}"
            assert int(services[host]["environment"]["HTTP_PORT"]) == port
    graf = services["grafana"]
    ds_file = mounted(graf, "/etc/grafana/provisioning/datasources/prometheus.yml")
    ds = yaml.safe_load(ds_file.read_text())["datasources"][0]
    host, port = host_port(ds["url"])
    assert host == "prometheus" and port in container_ports(prom)
    board = json.loads(DASHBOARD.read_text())
    assert board["panels"][1]["datasource"]["uid"] == ds["uid"]
    providers = yaml.safe_load(
        mounted(graf, "/etc/grafana/provisioning/dashboards/armguard.yml").read_text()
    )["providers"]
    dash_dir = mounted(graf, providers[0]["options"]["path"])
    assert (dash_dir / "armguard.json").is_file()


def test_compose_topics_match_what_armguard_wants():
    services = compose()["services"]
    init = services["kafka-init"]
    script = mounted(init, init["entrypoint"][-1])
    created: dict[str, tuple[str, dict[str, str]]] = {}
    for line in script.read_text().splitlines():
        if line.startswith("create "):
            _, name, partitions, configs = shlex.split(line)
            created[name] = (partitions, dict(c.split("=", 1) for c in configs.split(",")))
    settings = Settings()
    for topic, wanted in topic_configs(settings).items():
        assert topic in created, f"kafka-init does not create {topic}"
        assert created[topic][1] == wanted, topic
    for topic in settings.topics.telemetry:
        assert topic in created
    t = settings.topics
    # Keyed by experiment and co-partitioned: one partition count.
    assert len({created[n][0] for n in (t.summaries, t.commands, t.state, t.killswitch)}) == 1


# -- Dockerfile ------------------------------------------------------------------------------------


def test_dockerfile_small_pinned_non_root_with_healthcheck():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M).group(1)
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base)
    user = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    assert "HEALTHCHECK" in text and "/healthz" in text
    expose = int(re.search(r"^EXPOSE (\d+)$", text, flags=re.M).group(1))
    assert expose == HttpSettings().port
    for name in re.findall(r"\b(ARMGUARD_[A-Z0-9_]+)=", text):
        assert name in env_names(), name
    for src in re.findall(r"^COPY (?!--from)(.+) \S+$", text, flags=re.M):
        for part in src.split():
            assert list(ROOT.glob(part)) or "*" in part, f"COPY source {part} missing"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".cache" in ignored


# -- Kubernetes ------------------------------------------------------------------------------------


def pod_spec() -> dict[str, Any]:
    return k8s("Deployment")["spec"]["template"]["spec"]


def container() -> dict[str, Any]:
    (c,) = pod_spec()["containers"]
    return c


def configmap_data() -> dict[str, str]:
    return k8s("ConfigMap")["data"]


def k8s_settings(monkeypatch, tmp_path) -> Settings:
    """Settings as the pod builds them: the ConfigMap's file plus the env (secrets as dummies)."""
    for env in container()["env"]:
        if "value" in env:
            monkeypatch.setenv(env["name"], env["value"])
        else:
            monkeypatch.setenv(env["name"], "from-kubernetes")
    path = tmp_path / "daemon.yaml"
    path.write_text(configmap_data()["daemon.yaml"])
    return load_settings(path)


def test_kustomization_lists_existing_files():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for res in kust["resources"]:
        assert (K8S / res).is_file(), res
    assert "secret.example.yaml" not in kust["resources"]


def test_k8s_env_names_are_settings_and_secrets_come_from_secrets(monkeypatch, tmp_path):
    valid = env_names()
    secrets = secret_env_names()
    assert "ARMGUARD_COMMANDS__HMAC_KEY" in secrets and "ARMGUARD_KAFKA__SASL_PASSWORD" in secrets
    env = {e["name"]: e for e in container()["env"]}
    for name in env:
        assert name in valid, f"{name} is not a setting (valid: {sorted(valid)})"
    for name in secrets & set(env):
        assert "secretKeyRef" in env[name].get("valueFrom", {}), f"{name} must come from a Secret"
    assert "secretKeyRef" in env["ARMGUARD_COMMANDS__HMAC_KEY"]["valueFrom"]
    assert "secretKeyRef" in env["ARMGUARD_KAFKA__SASL_PASSWORD"]["valueFrom"]
    assert "secretKeyRef" in env["ARMGUARD_KAFKA__SASL_USERNAME"]["valueFrom"]
    settings = k8s_settings(monkeypatch, tmp_path)
    assert settings.kafka.security_protocol == "SASL_SSL"
    assert settings.commands.hmac_key is not None


def test_k8s_configmap_experiments_equal_the_repo_config():
    text = configmap_data()["experiments.yaml"]
    assert text == (ROOT / "config" / "experiments.yaml").read_text()
    assert parse_experiments(text, where="configmap").experiments


def test_k8s_deployment_probes_ports_and_grace(monkeypatch, tmp_path):
    settings = k8s_settings(monkeypatch, tmp_path)
    spec = pod_spec()
    c = container()
    assert spec["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s + 5
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == settings.http.port
    assert settings.http.host == "0.0.0.0"
    from armguard.daemon.settings import HttpSettings as H

    routes = HttpServer(H(port=0), CollectorRegistry(), Health()).routes
    probes = {k: c[k]["httpGet"] for k in ("livenessProbe", "readinessProbe", "startupProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        assert probe["path"] in routes
        assert probe["port"] in ports
    args = build_parser().parse_args(c["args"])
    assert args.command == "run"
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert args.settings.parent.as_posix() in mounts
    assert str(settings.experiments_file).startswith(args.settings.parent.as_posix())
    assert any(str(settings.kafka.ssl_cafile).startswith(p + "/") for p in mounts)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert set(mounts.values()) <= set(volumes)
    assert (
        volumes[mounts["/etc/armguard"]]["configMap"]["name"]
        == k8s("ConfigMap")["metadata"]["name"]
    )


def test_k8s_deployment_is_locked_down():
    spec = pod_spec()
    c = container()
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert c["resources"]["limits"]["memory"]


def test_k8s_selectors_and_port_names_line_up():
    deploy = k8s("Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    service = k8s("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in container()["ports"]}
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in port_names
    pdb = k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deploy["spec"]["replicas"] > 1
    monitor = k8s("ServiceMonitor")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    service_ports = {p["name"] for p in service["spec"]["ports"]}
    for ep in monitor["spec"]["endpoints"]:
        assert ep["port"] in service_ports and ep["path"] == "/metrics"
    # The alert rules select job="armguard": the job label comes from the Service's name label.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "armguard"


@pytest.mark.parametrize("renamed", ["ARMGUARD_HTTP__PORTS", "ARMGUARD_KAFKA__BOOTSTRAP"])
def test_env_name_derivation_rejects_unknown_names(renamed):
    assert renamed not in env_names()
    assert "ARMGUARD_HTTP__PORT" in env_names()
