"""Pure statistics for armguard."""

from .rank_cusum import RankCUSUM
from .seasonal_zscore import SeasonalZScore
from .summary import LogHistogram, Summary

__all__: list[str] = [
    "LogHistogram",
    "RankCUSUM",
    "SeasonalZScore",
    "Summary",
]
