"""AlphaSplit and the result dataclasses."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from armguard.detectors import AlphaSplit, MeanDifferenceTest, Summary, TestResult, split_alpha


def test_bonferroni_split():
    split = split_alpha(0.05, treatments=3, guardrails=4)
    assert split.n_tests == 12 and split.alpha == pytest.approx(0.05 / 12)
    assert AlphaSplit.from_dict(split.to_dict()) == split
    assert split_alpha(0.01).alpha == 0.01


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"family_alpha": 0.0}, "alpha"),
        ({"family_alpha": 0.05, "treatments": 0}, "treatments"),
        ({"family_alpha": 0.05, "guardrails": 1.5}, "guardrails"),
    ],
)
def test_invalid_split(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AlphaSplit(**kwargs)


def test_result_is_frozen_and_json_safe():
    c = Summary.from_values([1.0, 2.0, 3.0, 4.0])
    t = Summary.from_values([2.0, 3.0, 4.0, 5.0])
    r = MeanDifferenceTest(alpha=split_alpha(0.05, guardrails=2)).update(c, t)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.breached = True  # type: ignore[misc]
    d = orjson.loads(orjson.dumps(r.to_dict()))
    assert TestResult.from_dict(d) == r
    assert set(d) >= {
        "method", "breached", "p_value", "e_value", "estimate", "confidence_interval",
        "relative_estimate", "relative_interval", "n_control", "n_treatment", "alpha",
        "min_samples_reached", "alpha_split",
    }  # fmt: skip
    assert d["alpha"] == 0.025 and d["alpha_split"]["family_alpha"] == 0.05
