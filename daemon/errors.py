"""armguard's errors, one small tree.

::

    ArmguardError                     base; `retriable` says whether trying again can help
    ├── ConfigError                   a settings or experiment file is wrong (exit code 2)
    ├── RecordRejected                one input record breaks the data contract (dead-lettered)
    ├── CommandRejected               an operator command is unauthenticated or malformed (audited)
    ├── StateError                    a state snapshot cannot be restored
    └── KafkaUnavailable              the broker cannot be reached (retriable)

Data rides on the error: a `ConfigError` carries every problem found, each naming the file, the
experiment, the field and what is allowed; a `RecordRejected` carries the machine-readable reason
that becomes a dead-letter header and a metric label.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ArmguardError",
    "CommandRejected",
    "ConfigError",
    "ConfigProblem",
    "KafkaUnavailable",
    "RecordRejected",
    "StateError",
]


class ArmguardError(Exception):
    """Base of every error armguard raises on purpose."""

    retriable = False
    exit_code = 1


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong in a configuration file.

    ``where`` is the file (or ``environment``), ``experiment`` the experiment id when the problem
    is inside one, ``field`` a dotted path such as ``guardrails[0].margin`` and ``message`` says what
    is wrong and what is allowed.
    """

    where: str
    field: str
    message: str
    experiment: str | None = None

    def __str__(self) -> str:
        exp = f" experiment {self.experiment!r}:" if self.experiment else ""
        field = f" {self.field}:" if self.field else ""
        return f"{self.where}:{exp}{field} {self.message}"


class ConfigError(ArmguardError):
    """A settings or experiment file is invalid; ``problems`` lists every problem found."""

    exit_code = 2

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class RecordRejected(ArmguardError):
    """One telemetry record breaks the data contract; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class CommandRejected(ArmguardError):
    """An operator command failed authentication or validation; it is audited, never applied."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class StateError(ArmguardError):
    """A snapshot from the state topic could not be restored."""


class KafkaUnavailable(ArmguardError):
    """The Kafka cluster cannot be reached; the daemon keeps retrying."""

    retriable = True
