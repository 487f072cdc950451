"""Real Prometheus and Alertmanager for integration tests, with configs derived from deploy/.

The configs are the project's own, changed only where a test must: targets point at the test's
processes, the receivers' URLs at a webhook the test serves, and the timings (scrape and evaluation
interval, the rules' ``for:``, Alertmanager's group waits) are shortened so a test takes seconds.
Everything else (expressions, labels, routes, inhibitions) is exactly what ships.

The binaries come from the Debian packages ``prometheus`` and ``prometheus-alertmanager``, which
``scripts/ops-tests`` installs where missing; a missing binary fails the test.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import yaml
from prometheus_client import CollectorRegistry

from armguard.daemon.health import Health
from armguard.daemon.http import HttpServer, Request, Response
from armguard.daemon.settings import HttpSettings
from tests.support.daemon import free_port

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise AssertionError(
            f"{name} is not installed: run scripts/ops-tests (it installs the Debian packages "
            "prometheus and prometheus-alertmanager), or apt-get install them"
        )
    return path


# Rules about the target itself being scraped: Prometheus evaluates rules from its start, before
# its first scrape of the daemon has landed, so with a 2 s ``for:`` these page about the test's
# own startup on a loaded machine. Their timing is promtool's to test (deploy/prometheus/tests).
_TARGET_RULES = {"ArmguardAbsent", "ArmguardDown"}


def derived_rules(out_dir: Path, for_s: float = 2.0, target_for_s: float = 120.0) -> Path:
    """The project's alert rules with every ``for:`` shortened to ``for_s`` seconds (those about
    the scrape target itself to ``target_for_s``)."""
    doc = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "armguard.rules.yml").read_text())
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "for" in rule:
                wait = target_for_s if rule.get("alert") in _TARGET_RULES else for_s
                rule["for"] = f"{wait:g}s"
    path = out_dir / "armguard.rules.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def derived_prometheus_config(
    out_dir: Path, *, armguard: str, alertmanager: str, interval_s: float = 1.0
) -> Path:
    """deploy/prometheus/prometheus.yml scraping ``armguard`` and alerting ``alertmanager``."""
    doc = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    doc["global"]["scrape_interval"] = f"{interval_s:g}s"
    doc["global"]["evaluation_interval"] = f"{interval_s:g}s"
    doc["global"]["scrape_timeout"] = f"{interval_s:g}s"
    rules = derived_rules(out_dir)
    doc["rule_files"] = [str(rules)]
    doc["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    jobs = [j for j in doc["scrape_configs"] if j["job_name"] == "armguard"]
    assert len(jobs) == 1, "deploy/prometheus/prometheus.yml must have one `armguard` job"
    job = jobs[0]
    job["static_configs"] = [{"targets": [armguard]}]
    job["scrape_interval"] = f"{interval_s:g}s"
    job["scrape_timeout"] = f"{interval_s:g}s"
    doc["scrape_configs"] = [job]
    path = out_dir / "prometheus.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def derived_alertmanager_config(out_dir: Path, *, webhook_base: str) -> Path:
    """deploy/alertmanager/alertmanager.yml posting to ``webhook_base`` + the URL's path."""
    doc = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())

    def shorten(route: dict[str, Any]) -> None:
        for key in ("group_wait", "group_interval"):
            if key in route:
                route[key] = "1s"
        for child in route.get("routes", []):
            shorten(child)

    shorten(doc["route"])
    doc["route"]["group_wait"] = "1s"
    doc["route"]["group_interval"] = "1s"
    for receiver in doc["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            path = "/" + hook["url"].split("/", 3)[3]
            hook["url"] = webhook_base + path
    path = out_dir / "alertmanager.yml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


class Webhook:
    """An HTTP server that records the JSON bodies Alertmanager posts, by path."""

    def __init__(self, paths: tuple[str, ...] = ("/page", "/ticket")):
        self.received: dict[str, list[dict[str, Any]]] = {p: [] for p in paths}
        self.server = HttpServer(
            HttpSettings(port=0), CollectorRegistry(), Health(), max_request_bytes=1 << 20
        )
        for p in paths:
            self.server.add_route(p, self._record, methods=("POST",))

    def _record(self, request: Request) -> Response:
        self.received[request.path].append(orjson.loads(request.body))
        return Response.text("ok\n")

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def alerts(self, path: str) -> list[dict[str, Any]]:
        return [a for body in self.received[path] for a in body["alerts"]]

    async def __aenter__(self) -> Webhook:
        await self.server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop()


class Process:
    """A background binary with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, args: list[str], log: Path, ready_url: str):
        self.args = args
        self.log = log
        self.ready_url = ready_url
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(self.args, stdout=fh, stderr=subprocess.STDOUT)
        return self

    async def wait_ready(self, limit_s: float = 30.0) -> None:
        deadline = asyncio.get_running_loop().time() + limit_s
        while asyncio.get_running_loop().time() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.args[0]} exited:\n{self.log.read_text()[-3000:]}")
            if await asyncio.to_thread(get_status, self.ready_url) == 200:
                return
            await asyncio.sleep(0.2)  # polling interval of an observable condition
        raise AssertionError(f"{self.args[0]} not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


def get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except OSError:
        return 0


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return orjson.loads(r.read())


def post_json(url: str, body: Any) -> int:
    req = urllib.request.Request(
        url, data=orjson.dumps(body), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def alertmanager(tmp: Path, webhook_base: str) -> tuple[Process, int]:
    """Alertmanager with the project's config (webhooks redirected), not clustered."""
    port = free_port()
    config = derived_alertmanager_config(tmp, webhook_base=webhook_base)
    (tmp / "am-data").mkdir(exist_ok=True)
    proc = Process(
        [
            binary("prometheus-alertmanager"),
            f"--config.file={config}",
            f"--storage.path={tmp / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        tmp / "alertmanager.log",
        f"http://127.0.0.1:{port}/-/ready",
    )
    return proc.start(), port


def prometheus(tmp: Path, *, armguard: str, alertmanager: str) -> tuple[Process, int]:
    """Prometheus with the project's scrape config and rules (timings shortened)."""
    port = free_port()
    config = derived_prometheus_config(tmp, armguard=armguard, alertmanager=alertmanager)
    (tmp / "prom-data").mkdir(exist_ok=True)
    proc = Process(
        [
            binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--rules.alert.resend-delay=1s",
        ],
        tmp / "prometheus.log",
        f"http://127.0.0.1:{port}/-/ready",
    )
    return proc.start(), port
