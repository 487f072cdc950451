"""Pure statistics for armguard."""

from .rank_cusum import RankCUSUM

__all__: list[str] = [
    "RankCUSUM",
]
