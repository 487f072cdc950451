"""One contract for every public detector in ``armguard.detectors.__all__``.

A *detector* is a public class with ``update``, ``to_state`` and ``from_state`` that is not one of
the data types the detectors consume (``Summary``, ``LogHistogram``); result dataclasses and
helpers have no ``update`` and are skipped by that rule. New detectors are picked up
automatically; if one has an ``update`` signature not seen before, add a feeder to ``FEEDERS``
(and an example value to ``REQUIRED`` for a constructor parameter without a default).

Checked for each: keyword-only constructor parameters stored under their own names,
construction with defaults, determinism, exact state round trip (through JSON) mid-stream with
equal behaviour afterwards, JSON-safe state and results, and a numpydoc docstring with a doctest
in Examples and a References section.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterator

import numpy as np
import orjson
import pytest

import armguard.detectors as detectors
from armguard.detectors import LogHistogram, Summary

DATA_TYPES = (Summary, LogHistogram)
STEPS = 80
ARMS = {"control": 0.5, "treatment": 0.5}

# Example values for constructor parameters that have no default.
REQUIRED = {"allocation": ARMS}


def _is_detector(obj: object) -> bool:
    return (
        inspect.isclass(obj)
        and all(callable(getattr(obj, m, None)) for m in ("update", "to_state", "from_state"))
        and not issubclass(obj, DATA_TYPES)
    )


DETECTORS = sorted(
    (
        getattr(detectors, name)
        for name in detectors.__all__
        if _is_detector(getattr(detectors, name))
    ),
    key=lambda cls: cls.__name__,
)


# -- feeders: one stream of update(**kwargs) per update signature ---------------------------------


def _two_arms(rng, det) -> Iterator[dict]:
    control, treatment = Summary(), Summary()
    while True:
        control.update_many((rng.random(50) < 0.30).astype(float))
        treatment.update_many((rng.random(50) < 0.34).astype(float))
        yield {"control": control, "treatment": treatment}


def _arm_counts(rng, det) -> Iterator[dict]:
    counts = dict.fromkeys(ARMS, 0)
    while True:
        for arm, x in zip(ARMS, rng.multinomial(100, [0.47, 0.53]), strict=True):
            counts[arm] += int(x)
        yield {"counts": dict(counts)}


def _scalar(rng, det) -> Iterator[dict]:
    i = 0
    while True:
        yield {"x": float(rng.normal(1.0 if i > STEPS // 2 else 0.0, 1.0))}
        i += 1


def _scalar_at_time(rng, det) -> Iterator[dict]:
    i = 0
    while True:
        yield {"x": float(rng.normal(10.0, 1.0)), "t": 3600.0 * i}
        i += 1


def _interval_histogram(rng, det) -> Iterator[dict]:
    i = 0
    while True:
        yield {"histogram": Summary.from_values(rng.lognormal(0.3 * (i > STEPS // 2), 1.0, 200))}
        i += 1


def _calibration_bins(rng, det) -> Iterator[dict]:
    k = det.n_bins
    centres = (np.arange(k) + 0.5) / k
    while True:
        counts = rng.integers(20, 60, size=k)
        yield {
            "counts": counts.tolist(),
            "prediction_sums": (counts * centres).tolist(),
            "outcome_sums": rng.binomial(counts, centres).astype(float).tolist(),
        }


FEEDERS: dict[tuple[str, ...], Callable] = {
    ("control", "treatment"): _two_arms,
    ("treatment", "control"): _two_arms,
    ("counts",): _arm_counts,
    ("x",): _scalar,
    ("x", "t"): _scalar_at_time,
    ("histogram",): _interval_histogram,
    ("counts", "prediction_sums", "outcome_sums"): _calibration_bins,
}


def _update_params(cls) -> tuple[str, ...]:
    params = list(inspect.signature(cls.update).parameters)[1:]
    return tuple(params)


def _make(cls):
    sig = inspect.signature(cls.__init__)
    kwargs = {}
    for name, p in list(sig.parameters.items())[1:]:
        if p.default is inspect.Parameter.empty and p.kind is p.KEYWORD_ONLY:
            assert name in REQUIRED, (
                f"add an example value for {cls.__name__}({name}=...) to REQUIRED"
            )
            kwargs[name] = REQUIRED[name]
    return cls(**kwargs)


def _stream(cls, det, seed: int = 0) -> list[dict]:
    key = _update_params(cls)
    if key not in FEEDERS:
        pytest.fail(f"no feeder for {cls.__name__}.update{key}: add one to FEEDERS")
    gen = FEEDERS[key](np.random.default_rng(seed), det)
    return [next(gen) for _ in range(STEPS)]


def _json_safe(obj) -> None:
    # allow_nan=False: NaN and inf are not JSON (orjson would silently write null)
    json.dumps(obj, allow_nan=False)


def _output(value):
    if value is None:
        return None
    assert hasattr(value, "to_dict"), "update() returns None or a result with to_dict()"
    d = value.to_dict()
    _json_safe(d)
    return d


# -- the contract --------------------------------------------------------------------------------


def test_the_rule_finds_the_detectors():
    names = {cls.__name__ for cls in DETECTORS}
    assert {"MeanDifferenceTest", "ProportionDifferenceTest", "SampleRatioMismatch"} <= names
    assert not names & {"Summary", "LogHistogram", "TestResult", "SRMResult", "AlphaSplit"}


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_constructor_is_keyword_only_and_stores_parameters(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    assert params, "a detector has parameters"
    for p in params:
        assert p.kind is p.KEYWORD_ONLY, f"{cls.__name__}({p.name}) must be keyword-only"
    det = _make(cls)
    for p in params:
        assert hasattr(det, p.name), f"{cls.__name__} must store {p.name} under its own name"


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_deterministic(cls):
    a, b = _make(cls), _make(cls)
    for kwargs in _stream(cls, a):
        assert _output(a.update(**kwargs)) == _output(b.update(**kwargs))
        assert a.to_state() == b.to_state()


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("cut", [0, STEPS // 3, STEPS - 1])
def test_state_round_trip_mid_stream(cls, cut):
    det = _make(cls)
    stream = _stream(cls, det, seed=cut)
    for kwargs in stream[:cut]:
        det.update(**kwargs)
    state = det.to_state()
    _json_safe(state)
    back = cls.from_state(orjson.loads(orjson.dumps(state)))
    assert type(back) is cls
    assert back.to_state() == state
    for kwargs in stream[cut:]:
        assert _output(back.update(**kwargs)) == _output(det.update(**kwargs))
        assert back.to_state() == det.to_state()
    _json_safe(det.to_state())


@pytest.mark.parametrize("cls", DETECTORS, ids=lambda c: c.__name__)
def test_docstring_has_examples_and_references(cls):
    doc = inspect.getdoc(cls) or ""
    for section in ("Parameters", "Examples", "References"):
        assert f"\n{section}\n" in doc, f"{cls.__name__} docstring lacks a {section} section"
    examples = doc.split("\nExamples\n", 1)[1]
    assert ">>>" in examples, f"{cls.__name__} Examples has no doctest"
    assert "default_rng(42)" in examples or "rng" not in examples, "seed examples with 42"
