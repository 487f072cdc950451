"""Pure statistics for armguard."""

from .rank_cusum import RankCUSUM
from .summary import LogHistogram, Summary

__all__: list[str] = [
    "LogHistogram",
    "RankCUSUM",
    "Summary",
]
