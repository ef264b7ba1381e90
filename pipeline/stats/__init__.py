"""Outcome statistics: reliable and clinically significant change, service metrics,
trends, expected recovery curves and sudden gains.

Public functions take arrays or DataFrame columns; every statistic is vectorised
(grouped sums, closed forms), never a Python loop over clients or episodes.
"""

from pipeline.stats.change import (
    ClinicalCutoffs,
    ReliableChangeResult,
    clinical_significance,
    fixed_point_change,
    jt_cutoffs,
    reliable_change,
)
from pipeline.stats.gains import sudden_gains
from pipeline.stats.service import service_metrics, wilson_interval
from pipeline.stats.trend import grouped_trend

__all__ = [
    "ClinicalCutoffs",
    "ReliableChangeResult",
    "clinical_significance",
    "fixed_point_change",
    "grouped_trend",
    "jt_cutoffs",
    "reliable_change",
    "service_metrics",
    "sudden_gains",
    "wilson_interval",
]
