"""Daemon settings: one typed tree, built once at the entry point.

Sources, strongest first: keyword arguments, environment variables (prefix ``ARMGUARD_``, nested
sections joined by ``__``, e.g. ``ARMGUARD_KAFKA__BOOTSTRAP_SERVERS``), then an optional YAML
settings file. Unknown keys are errors everywhere, secrets are ``SecretStr`` and never printed, and
every duration or size carries its unit in its name.

Examples
--------
>>> s = Settings(kafka={"bootstrap_servers": "127.0.0.1:9092"})
>>> s.topics.killswitch, s.ingest.flush_interval_s, s.http.port
('armguard.killswitch', 5.0, 9464)
>>> Settings(commands={"hmac_key": "s3cret"}).commands.hmac_key
SecretStr('**********')
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from .errors import ConfigError, ConfigProblem

__all__ = [
    "CommandSettings",
    "EvaluateSettings",
    "HttpSettings",
    "IngestSettings",
    "IntegrationsSettings",
    "KafkaSettings",
    "Settings",
    "TopicSettings",
    "load_settings",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KafkaSettings(_Section):
    """How to reach the Kafka cluster."""

    bootstrap_servers: str = "127.0.0.1:19092"
    client_id: str = "armguard"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    request_timeout_ms: int = Field(30_000, gt=0)
    metadata_max_age_ms: int = Field(10_000, gt=0)
    session_timeout_ms: int = Field(10_000, gt=0)
    heartbeat_interval_ms: int = Field(3_000, gt=0)
    max_poll_interval_ms: int = Field(300_000, gt=0)
    transaction_timeout_ms: int = Field(60_000, gt=0)

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_"):
            if (
                self.sasl_mechanism is None
                or self.sasl_username is None
                or self.sasl_password is None
            ):
                raise ValueError(
                    f"security_protocol {self.security_protocol} needs sasl_mechanism, "
                    "sasl_username and sasl_password"
                )
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be smaller than session_timeout_ms")
        return self


class TopicSettings(_Section):
    """Names of the topics armguard reads and writes."""

    telemetry: list[str] = Field(default_factory=lambda: ["telemetry"])
    telemetry_pattern: str | None = None
    summaries: str = "armguard.summaries"
    deadletter: str = "armguard.deadletter"
    killswitch: str = "armguard.killswitch"
    decisions: str = "armguard.decisions"
    state: str = "armguard.state"
    commands: str = "armguard.commands"
    create: bool = True
    partitions: int = Field(6, ge=1, le=10_000)
    replication_factor: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _some_telemetry(self) -> TopicSettings:
        if not self.telemetry and not self.telemetry_pattern:
            raise ValueError("give telemetry topic names or a telemetry_pattern")
        return self


class IngestSettings(_Section):
    """Stage 1: telemetry to summaries."""

    enabled: bool = True
    group_id: str = "armguard-ingest"
    flush_interval_s: float = Field(5.0, gt=0)
    max_pending_records: int = Field(500_000, gt=0)
    max_batch_records: int = Field(50_000, gt=0)
    poll_timeout_ms: int = Field(200, ge=0)
    fetch_max_bytes: int = Field(64 * 1024 * 1024, gt=0)
    max_partition_fetch_bytes: int = Field(16 * 1024 * 1024, gt=0)
    max_record_bytes: int = Field(1_048_576, gt=0)
    max_lateness_s: float = Field(86_400.0, gt=0)
    max_future_skew_s: float = Field(300.0, ge=0)
    experiment_field: str = "experiment"
    arm_field: str = "arm"
    ts_field: str = "ts"
    unit_field: str = "unit"
    metrics_field: str = "metrics"
    features_field: str = "features"


class EvaluateSettings(_Section):
    """Stage 2: summaries to decisions."""

    enabled: bool = True
    group_id: str = "armguard-evaluate"
    evaluation_interval_s: float = Field(10.0, gt=0)
    poll_timeout_ms: int = Field(200, ge=0)


class HttpSettings(_Section):
    """The metrics, health and status HTTP server."""

    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)
    bearer_token: SecretStr | None = None


class IntegrationsSettings(_Section):
    """The kill-switch follower behind the status API, OFREP and the rollout gates."""

    enabled: bool = True
    fail_open: bool = True
    follow_state: bool = True
    poll_timeout_ms: int = Field(200, ge=0)
    gate_public: bool = False  # Flagger webhooks cannot send http.bearer_token


class CommandSettings(_Section):
    """Operator commands on the commands topic."""

    hmac_key: SecretStr | None = None
    max_age_s: float = Field(300.0, gt=0)


class Settings(BaseSettings):
    """Every setting of the daemon. Build it once, with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="ARMGUARD_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    experiments_file: Path = Path("config/experiments.yaml")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    shutdown_timeout_s: float = Field(10.0, gt=0)
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    ingest: IngestSettings = IngestSettings()
    evaluate: EvaluateSettings = EvaluateSettings()
    http: HttpSettings = HttpSettings()
    commands: CommandSettings = CommandSettings()
    integrations: IntegrationsSettings = IntegrationsSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file (if load_settings was given one) is weakest: the environment overrides it.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from ``overrides``, the environment and the YAML file at ``path``.

    Raises :class:`ConfigError` naming the source and the field on any problem.
    """
    where = str(path) if path is not None else "settings (environment)"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([ConfigProblem(where, "", "file not found")])
        import yaml

        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError([ConfigProblem(where, "", f"not valid YAML: {exc}")]) from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                [ConfigProblem(where, "", "a settings file must be a mapping of sections")]
            )
    cls: type[Settings] = Settings
    if path is not None:
        config = {**Settings.model_config, "yaml_file": str(path)}
        cls = type("Settings", (Settings,), {"model_config": config, "__module__": __name__})
    try:
        return cls(**overrides)
    except ValidationError as exc:
        raise ConfigError(problems_from_validation(exc, where)) from exc


def problems_from_validation(
    exc: ValidationError, where: str, experiment_of: Any = None
) -> list[ConfigProblem]:
    """Turn a pydantic error into problems that name the field and what is allowed."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        experiment = experiment_of(loc) if experiment_of else None
        problems.append(ConfigProblem(where, _dotted(loc), _message(err), experiment=experiment))
    return problems


def _dotted(loc: list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith("function-"):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out


def _message(err: dict[str, Any]) -> str:
    kind = err["type"]
    msg = err["msg"]
    if kind == "extra_forbidden":
        return "unknown key; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"got {err.get('input')!r}; allowed: {expected}"
    ctx = err.get("ctx", {})
    bounds = {
        "greater_than": ">",
        "greater_than_equal": ">=",
        "less_than": "<",
        "less_than_equal": "<=",
    }
    if kind in bounds:
        limit = next(iter(ctx.values()), "")
        return f"must be {bounds[kind]} {limit} (got {err.get('input')!r})"
    if kind in ("float_parsing", "int_parsing", "float_type", "int_type", "bool_parsing"):
        want = {"f": "a number", "i": "a whole number", "b": "true or false"}[kind[0]]
        return f"must be {want} (got {err.get('input')!r})"
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    return msg
