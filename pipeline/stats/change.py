"""Reliable change and clinical significance (Jacobson & Truax 1991), and the fixed-point
rule of NHS Talking Therapies.

References
----------
.. [1] Jacobson NS, Truax P. Clinical significance: a statistical approach to defining
       meaningful change in psychotherapy research. J Consult Clin Psychol.
       1991;59(1):12-19.
.. [2] NHS England. NHS Talking Therapies for anxiety and depression manual (reliable
       change: PHQ-9 >= 6 points, GAD-7 >= 4 points).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy import special  # not scipy.stats: 0.15 s to load instead of 0.7 s

from pipeline.errors import UsageError
from pipeline.scales import Scale

__all__ = [
    "ClinicalCutoffs",
    "ReliableChangeResult",
    "clinical_cutoff",
    "CATEGORY_BY_CODE",
    "DIRECTION_BY_CODE",
    "clinical_significance",
    "clinical_significance_codes",
    "fixed_point_change",
    "fixed_point_codes",
    "jt_cutoffs",
    "reliable_change",
]

CATEGORIES = ("recovered", "improved", "unchanged", "deteriorated", "harmed")
DIRECTIONS = ("improved", "unchanged", "deteriorated")


@dataclass(frozen=True)
class ClinicalCutoffs:
    """Jacobson & Truax cut-offs ``a``, ``b``, ``c`` (None where norms are missing).

    ``recommended`` is ``c`` when both norms exist, else ``a`` (SPEC §4).
    """

    a: float | None
    b: float | None
    c: float | None

    @property
    def recommended(self) -> float | None:
        return self.c if self.c is not None else self.a


def jt_cutoffs(m_clinical: float, sd_clinical: float, m_functional: float | None = None,
               sd_functional: float | None = None, *,
               higher_is_better: bool = False) -> ClinicalCutoffs:
    """Cut-offs for clinically significant change.

    Parameters
    ----------
    m_clinical, sd_clinical
        Mean and SD of a clinical population.
    m_functional, sd_functional
        Mean and SD of a functional (general) population, when known.
    higher_is_better
        Mirror ``a`` and ``b`` for scales on which a higher score is better.

    Returns
    -------
    ClinicalCutoffs
        For lower-is-better scales ``a = M_c - 2 SD_c`` (two SDs beyond the clinical
        mean toward health), ``b = M_f + 2 SD_f`` and
        ``c = (SD_c M_f + SD_f M_c) / (SD_c + SD_f)``.

    Notes
    -----
    ``b`` uses the *functional* SD as Jacobson & Truax (1991) define it; the R package
    clinicalsignificance uses the clinical SD there, so its ``b`` differs. ``c`` is
    symmetric in direction.

    References
    ----------
    .. [1] Jacobson NS, Truax P. J Consult Clin Psychol. 1991;59(1):12-19, p. 13.

    Examples
    --------
    >>> cut = jt_cutoffs(19.7, 7.7, 4.7, 4.8)   # CORE-10 manual norms
    >>> round(cut.a, 2), round(cut.b, 2), round(cut.c, 3)
    (4.3, 14.3, 10.46)
    """
    if sd_clinical is None or sd_clinical <= 0:
        raise UsageError("sd_clinical must be positive", value=sd_clinical)
    sign = -1.0 if higher_is_better else 1.0
    a = m_clinical - sign * 2 * sd_clinical
    b = c = None
    if m_functional is not None and sd_functional is not None:
        if sd_functional <= 0:
            raise UsageError("sd_functional must be positive", value=sd_functional)
        b = m_functional + sign * 2 * sd_functional
        c = (sd_clinical * m_functional + sd_functional * m_clinical) / (
            sd_clinical + sd_functional)
    return ClinicalCutoffs(a=a, b=b, c=c)


@dataclass(frozen=True)
class ReliableChangeResult:
    """Result of :func:`reliable_change`."""

    rci: npt.NDArray[np.float64]
    s_diff: float
    standard_error: float
    critical_value: float
    direction: npt.NDArray[np.object_]


def reliable_change(pre: npt.ArrayLike, post: npt.ArrayLike, *, sd: float,
                    reliability: float, higher_is_better: bool = False,
                    alpha: float = 0.05) -> ReliableChangeResult:
    """Jacobson & Truax reliable change index.

    Parameters
    ----------
    pre, post
        Scores before and after (NaN where missing).
    sd
        SD of pre-treatment scores (a norm, or the sample's baseline SD with n-1).
    reliability
        Reliability of the scale (internal consistency or test-retest; say which).
    higher_is_better
        Whether a rising score is improvement.
    alpha
        Two-sided significance level; the critical value is ``Phi^-1(1 - alpha/2)``
        (1.959964 for .05, not the rounded 1.96).

    Returns
    -------
    ReliableChangeResult
        ``rci = (post - pre) / S_diff`` with ``SE = sd sqrt(1 - r)`` and
        ``S_diff = sqrt(2) SE``; ``direction`` is ``"improved"`` when the change in the
        better direction exceeds the critical value strictly, ``"deteriorated"`` when the
        change in the worse direction does, else ``"unchanged"`` (None where a score is
        missing).

    References
    ----------
    .. [1] Jacobson NS, Truax P. J Consult Clin Psychol. 1991;59(1):12-19, p. 14.

    Examples
    --------
    >>> res = reliable_change([20, 20], [12, 28], sd=5, reliability=0.8)
    >>> round(res.s_diff, 4), [round(float(x), 4) for x in res.rci], list(res.direction)
    (3.1623, [-2.5298, 2.5298], ['improved', 'deteriorated'])
    """
    return _reliable_change(pre, post, sd=sd, reliability=reliability,
                            higher_is_better=higher_is_better, alpha=alpha)[0]


def _reliable_change(pre: npt.ArrayLike, post: npt.ArrayLike, *, sd: float,
                     reliability: float, higher_is_better: bool, alpha: float
                     ) -> tuple[ReliableChangeResult, np.ndarray]:
    """:func:`reliable_change`, and its directions as codes into :data:`DIRECTION_BY_CODE`
    (for callers that classify further without comparing text)."""
    if not sd > 0:
        raise UsageError("sd must be positive", value=sd)
    if not 0 <= reliability < 1:
        raise UsageError("reliability must be in [0, 1)", value=reliability)
    if not 0 < alpha < 1:
        raise UsageError("alpha must be in (0, 1)", value=alpha)
    pre_a = np.asarray(pre, dtype=float)
    post_a = np.asarray(post, dtype=float)
    se = sd * np.sqrt(1 - reliability)
    s_diff = float(np.sqrt(2) * se)
    rci = (post_a - pre_a) / s_diff
    z = float(special.ndtri(1 - alpha / 2))  # scipy.stats.norm.ppf's kernel
    better = rci if higher_is_better else -rci
    code = _direction_codes(better > z, -better > z, np.isnan(rci))
    return ReliableChangeResult(rci=rci, s_diff=s_diff, standard_error=float(se),
                                critical_value=z,
                                direction=np.asarray(DIRECTION_BY_CODE[code], dtype=object)
                                ), code


def fixed_point_change(pre: npt.ArrayLike, post: npt.ArrayLike, *, points: float,
                       higher_is_better: bool = False) -> npt.NDArray[np.object_]:
    """Reliable change by a fixed number of points (inclusive), as NHS Talking Therapies.

    A change of at least ``points`` in the better direction is ``"improved"``, in the
    worse direction ``"deteriorated"``, otherwise ``"unchanged"`` (None if missing).

    References
    ----------
    .. [1] NHS England. NHS Talking Therapies for anxiety and depression manual.

    Examples
    --------
    >>> list(fixed_point_change([15, 15, 15], [9, 10, 21], points=6))
    ['improved', 'unchanged', 'deteriorated']
    """
    return np.asarray(DIRECTION_BY_CODE[fixed_point_codes(pre, post, points=points,
                                                   higher_is_better=higher_is_better)],
                      dtype=object)


def fixed_point_codes(pre: npt.ArrayLike, post: npt.ArrayLike, *, points: float,
                      higher_is_better: bool = False) -> npt.NDArray[np.int64]:
    """:func:`fixed_point_change` as codes into :data:`DIRECTION_BY_CODE` (for callers that
    classify further, or build a text column once, without handling text per row).

    References
    ----------
    .. [1] NHS England. NHS Talking Therapies for anxiety and depression manual.
    """
    pre_a = np.asarray(pre, dtype=float)
    post_a = np.asarray(post, dtype=float)
    gain = (post_a - pre_a) if higher_is_better else (pre_a - post_a)
    return _direction_codes(gain >= points, -gain >= points, np.isnan(gain))


# Labels picked by integer code: a gather of shared objects rather than a text array
# converted value by value to objects (and compared as text).
#: Reliable-change directions by code (None: a score is missing).
DIRECTION_BY_CODE = np.array(["unchanged", "improved", "deteriorated", None], dtype=object)
#: Jacobson & Truax categories by code (None: a score is missing).
CATEGORY_BY_CODE = np.array([None, "recovered", "improved", "unchanged", "harmed",
                             "deteriorated"], dtype=object)


def _direction_codes(improved: np.ndarray, deteriorated: np.ndarray, missing: np.ndarray
                     ) -> np.ndarray:
    """Codes into :data:`DIRECTION_BY_CODE`: improved wins over deteriorated (as the nested
    ``np.where`` it replaces), missing over both."""
    code = np.asarray(np.where(improved, 1, np.where(deteriorated, 2, 0)))
    code[np.asarray(missing)] = 3
    return code


def clinical_significance(pre: npt.ArrayLike, post: npt.ArrayLike, *, sd: float,
                          reliability: float, cutoff: float, higher_is_better: bool = False,
                          alpha: float = 0.05) -> pd.DataFrame:
    """Jacobson & Truax categories of clinically significant change.

    Parameters
    ----------
    pre, post, sd, reliability, higher_is_better, alpha
        As :func:`reliable_change`.
    cutoff
        The clinical cut-off (``c``, ``a``, or a caseness threshold).

    Returns
    -------
    DataFrame
        Columns ``pre``, ``post``, ``change``, ``rci``, ``direction``, ``clinical_pre``
        (pre beyond the cut-off on the clinical side, strict), ``functional_post`` (post
        beyond it on the functional side, strict) and ``category``, in this precedence:
        ``recovered`` (reliable improvement, clinical at pre, functional at post),
        ``improved`` (reliable improvement otherwise), ``unchanged``, ``harmed``
        (reliable deterioration, functional at pre, clinical at post) and
        ``deteriorated`` (reliable deterioration otherwise).

    References
    ----------
    .. [1] Jacobson NS, Truax P. J Consult Clin Psychol. 1991;59(1):12-19.

    Examples
    --------
    >>> clinical_significance([20, 20, 8], [8, 12, 20], sd=5, reliability=0.8,
    ...                       cutoff=10)["category"].tolist()
    ['recovered', 'improved', 'harmed']
    """
    rc, dc, code, clinical_pre, functional_post, missing = _jacobson_truax(
        pre, post, sd=sd, reliability=reliability, cutoff=cutoff,
        higher_is_better=higher_is_better, alpha=alpha)
    pre_a = np.asarray(pre, dtype=float)
    post_a = np.asarray(post, dtype=float)
    return pd.DataFrame({
        "pre": pre_a, "post": post_a, "change": post_a - pre_a, "rci": rc.rci,
        "direction": rc.direction,
        "clinical_pre": pd.Series(clinical_pre, dtype="boolean").mask(missing),
        "functional_post": pd.Series(functional_post, dtype="boolean").mask(missing),
        "category": CATEGORY_BY_CODE[code],
    })


def clinical_significance_codes(pre: npt.ArrayLike, post: npt.ArrayLike, *, sd: float,
                                reliability: float, cutoff: float,
                                higher_is_better: bool = False, alpha: float = 0.05
                                ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64],
                                           npt.NDArray[np.int64]]:
    """:func:`clinical_significance`'s ``rci``, and its ``direction`` and ``category``
    as codes into :data:`DIRECTION_BY_CODE` and :data:`CATEGORY_BY_CODE`: the same
    classification, for callers that build a text column once (or none), not a frame.

    References
    ----------
    .. [1] Jacobson NS, Truax P. J Consult Clin Psychol. 1991;59(1):12-19.
    """
    rc, dc, code, *_ = _jacobson_truax(pre, post, sd=sd, reliability=reliability,
                                       cutoff=cutoff, higher_is_better=higher_is_better,
                                       alpha=alpha)
    return rc.rci, dc, code


def _jacobson_truax(pre: npt.ArrayLike, post: npt.ArrayLike, *, sd: float,
                    reliability: float, cutoff: float, higher_is_better: bool,
                    alpha: float) -> tuple[ReliableChangeResult, np.ndarray, np.ndarray,
                                           np.ndarray, np.ndarray, np.ndarray]:
    """Reliable change, its direction codes, the category codes, and the clinical-pre,
    functional-post and missing masks behind them (see :func:`clinical_significance`)."""
    rc, dc = _reliable_change(pre, post, sd=sd, reliability=reliability,
                              higher_is_better=higher_is_better, alpha=alpha)
    pre_a = np.asarray(pre, dtype=float)
    post_a = np.asarray(post, dtype=float)
    if higher_is_better:
        clinical_pre = pre_a < cutoff
        functional_post = post_a > cutoff
    else:
        clinical_pre = pre_a > cutoff
        functional_post = post_a < cutoff
    improved, unchanged, deteriorated = dc == 1, dc == 0, dc == 2
    code = np.select(
        [improved & clinical_pre & functional_post, improved, unchanged,
         deteriorated & ~clinical_pre & ~functional_post, deteriorated],
        [1, 2, 3, 4, 5], default=0)
    missing = np.isnan(pre_a) | np.isnan(post_a)
    code[missing] = 0
    return rc, dc, code, clinical_pre, functional_post, missing


def clinical_cutoff(scale: Scale, caseness: int | None = None) -> float | None:
    """The clinical cut-off of a registry scale (SPEC §4).

    ``c`` when both clinical and functional norms exist, ``a`` when only clinical norms
    exist (:func:`jt_cutoffs`); otherwise the caseness cut-off serves (as NHS Talking
    Therapies does), moved half a point toward health so that the strict tests of
    :func:`clinical_significance` agree with ``score >= caseness`` on integer scores
    (PHQ-9 caseness >= 10 -> cut-off 9.5; ORS <= 25 -> 25.5).

    Examples
    --------
    >>> from pipeline.scales import load_registry
    >>> reg = load_registry()
    >>> clinical_cutoff(reg["PHQ-9"]), round(clinical_cutoff(reg["CORE-10"]), 2)
    (9.5, 10.46)
    """
    if scale.norms_clinical is not None:
        nf = scale.norms_functional
        cut = jt_cutoffs(scale.norms_clinical.mean, scale.norms_clinical.sd,
                         nf.mean if nf else None, nf.sd if nf else None,
                         higher_is_better=scale.higher_is_better)
        return cut.recommended
    cut_case = scale.caseness_cutoff if caseness is None else caseness
    if cut_case is None:
        return None
    return cut_case + (0.5 if scale.higher_is_better else -0.5)
