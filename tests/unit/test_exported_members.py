"""The packages' public surface is pinned: a change to it is a deliberate edit here."""

from __future__ import annotations

import armguard.daemon
import armguard.detectors


def test_detectors_exports_resolve():
    for name in armguard.detectors.__all__:
        assert getattr(armguard.detectors, name) is not None, name
    assert sorted(armguard.detectors.__all__) == list(armguard.detectors.__all__)


def test_detectors_exports_are_pinned():
    assert set(armguard.detectors.__all__) == {
        "AlphaSplit",
        "CalibrationDrift",
        "LogHistogram",
        "MeanDifferenceTest",
        "ProportionDifferenceTest",
        "RankCUSUM",
        "SRMResult",
        "SampleRatioMismatch",
        "SeasonalZScore",
        "Summary",
        "TestResult",
        "TwoSampleDrift",
        "WindowDrift",
        "split_alpha",
    }


def test_daemon_exports_are_pinned():
    assert set(armguard.daemon.__all__) == set()
