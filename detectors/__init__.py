"""Pure statistics for armguard."""

from .alpha import AlphaSplit, split_alpha
from .calibration_drift import CalibrationDrift
from .mean_difference import MeanDifferenceTest
from .proportion_difference import ProportionDifferenceTest
from .rank_cusum import RankCUSUM
from .result import SRMResult, TestResult
from .seasonal_zscore import SeasonalZScore
from .srm import SampleRatioMismatch
from .summary import LogHistogram, Summary
from .two_sample_drift import TwoSampleDrift
from .window_drift import WindowDrift

__all__: list[str] = [
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
]
