"""Edge-triggered alarm state shared by the drift and anomaly detectors (private).

Users' top complaint about drift tools is an alert that repeats every interval. These detectors
report an *onset* (``alarm`` is True on the one update where the condition starts) and a *level*
(``in_alarm`` stays True until the condition clears), so one incident raises one alert.
"""

from __future__ import annotations


class _EdgeAlarm:
    """Mixin holding ``alarm`` (onset), ``in_alarm`` (level) and ``n_alarms`` (onsets so far)."""

    _alarm: bool = False
    _in_alarm: bool = False
    _n_alarms: int = 0

    def _set_level(self, level: bool) -> None:
        self._alarm = level and not self._in_alarm
        self._in_alarm = level
        if self._alarm:
            self._n_alarms += 1

    def _edge_state(self) -> dict:
        return {"alarm": self._alarm, "in_alarm": self._in_alarm, "n_alarms": self._n_alarms}

    def _load_edge_state(self, state: dict) -> None:
        self._alarm = bool(state["alarm"])
        self._in_alarm = bool(state["in_alarm"])
        self._n_alarms = int(state["n_alarms"])

    @property
    def alarm(self) -> bool:
        """True on the update where an alarm starts (an onset), False otherwise."""
        return self._alarm

    @property
    def in_alarm(self) -> bool:
        """True from an onset until the condition clears."""
        return self._in_alarm

    @property
    def n_alarms(self) -> int:
        """Number of alarm onsets so far."""
        return self._n_alarms
