"""The calibrated alignment filter (no Beam): folds for out-of-fold scoring, the AUC of matched
vs mismatched scores, and a threshold chosen at a false-reject budget, or no threshold at all
when the model is too weak to meet it (docs/alignment.md, "Out-of-fold scoring and the
calibrated filter").

A row's matched score is its image against its own captions. Its mismatched scores are the
same image against captions drawn from other rows (`mismatch_pairs`): that is what a row whose
caption does not belong to its image looks like to this model, measured on this run's data.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import numpy as np

from pipeline import storage

FOLD_SALT = "alignment-fold:"  # folds must not line up with shard buckets (stable_bucket of the bare key)
# estimate_pi's small-sample choices (chosen by simulation, see its docstring)
PI_LOWEST_QUANTILE = 0.25
PI_SE_WEIGHT = 1.0
PI_REPORT_SE = 0.5
DECISIONS = ("filter", "too_weak", "too_few")


def fold_of(asset_id: str, folds: int) -> int:
    """The fold (0..folds-1) of an asset, by a salted stable hash: the same on every worker and
    run, and independent of the shard an asset lands in."""
    if folds < 1:
        raise ValueError(f"folds must be >= 1, got {folds}")
    return storage.stable_bucket(FOLD_SALT + asset_id, folds)


def auc(matched: np.ndarray, mismatched: np.ndarray) -> float:
    """P(matched score > mismatched score), ties counted half (Mann-Whitney U / (n m)),
    in O((n + m) log(n + m)) by average ranks."""
    a = np.asarray(matched, dtype=np.float64).ravel()
    b = np.asarray(mismatched, dtype=np.float64).ravel()
    if not len(a) or not len(b):
        raise ValueError("auc needs at least one matched and one mismatched score")
    both = np.concatenate([a, b])
    order = np.argsort(both, kind="mergesort")
    ranks = np.empty(len(both), dtype=np.float64)
    sorted_vals = both[order]
    # average rank (1-based) of each run of equal values
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(both)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    u = ranks[: len(a)].sum() - len(a) * (len(a) + 1) / 2.0
    return float(u / (len(a) * len(b)))


def mismatch_pairs(n: int, draws: int, seed: int) -> np.ndarray:
    """`draws` (image row, caption row) pairs per row of a batch of `n`, int64 [n * draws, 2],
    the caption row always another row (uniform over the other n - 1), seeded so a rerun draws
    the same pairs. Empty when n < 2 (a lone row has no other caption)."""
    if n < 2 or draws < 1:
        return np.zeros((0, 2), dtype=np.int64)
    rng = np.random.default_rng(seed)
    images = np.repeat(np.arange(n, dtype=np.int64), draws)
    offsets = rng.integers(1, n, size=n * draws, dtype=np.int64)  # 1..n-1: never the row itself
    return np.stack([images, (images + offsets) % n], axis=1)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What the filter decided and why; `threshold` None means it rejects nothing."""

    decision: str  # filter | too_weak | too_few
    threshold: float | None  # reject a row whose score < threshold
    auc: float | None
    pi: float | None  # estimated fraction of mismatched rows among the matched scores
    expected_false_reject: float  # estimated fraction of good rows rejected
    expected_catch: float  # estimated fraction of mismatched rows rejected
    false_reject_budget: float
    n_matched: int
    n_mismatched: int
    reason: str = ""

    def rejects(self, score: float) -> bool:
        return self.threshold is not None and score < self.threshold

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=True)


def _cdf(sorted_scores: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Fraction of scores strictly below each value of `at` (the filter rejects score < t)."""
    return np.searchsorted(sorted_scores, at, side="left") / len(sorted_scores)


def estimate_pi(matched: np.ndarray, mismatched: np.ndarray, max_pi: float = 0.5) -> float:
    """Fraction of mismatched rows among the matched scores, Storey-style: at every l,
    r(l) = F_matched(l) / F_mis(l) = pi + (1 - pi) G(l) / F_mis(l) >= pi (good rows only add
    to the numerator), so the smallest ratio estimates pi; capped at `max_pi`.

    The small-sample details were chosen by simulation (benchmarks/alignment_filter.py,
    docs/alignment.md): l runs over the mismatched quantiles from PI_LOWEST_QUANTILE up (below
    it r divides two small noisy counts). The l used is the one minimising r(l) + PI_SE_WEIGHT
    standard errors (binomial, over the matched rows and the mismatched draws), so it is an l
    where good rows have not yet raised r and the noise is small, not the l whose noise
    happened to dip lowest; the estimate is r there plus PI_REPORT_SE standard errors. Too low
    an estimate costs catch (the good rows' CDF is overestimated); too high spends false
    rejects; these weights keep the mean false-reject rate under the budget in every
    simulated case while a well separated model at 300 rows still filters."""
    m = np.sort(np.asarray(matched, dtype=np.float64))
    x = np.sort(np.asarray(mismatched, dtype=np.float64))
    qs = np.linspace(PI_LOWEST_QUANTILE, 1.0, 76)[:-1]
    lam = np.unique(np.concatenate([np.quantile(x, qs), [np.nextafter(x[-1], np.inf)]]))
    f_m, f_x = _cdf(m, lam), _cdf(x, lam)
    ok = f_x >= PI_LOWEST_QUANTILE
    ratio, f_x = f_m[ok] / f_x[ok], f_x[ok]
    se = np.sqrt(ratio * (1 - f_x) / (len(m) * f_x) + ratio ** 2 * (1 - f_x) / (len(x) * f_x))
    best = np.argmin(ratio + PI_SE_WEIGHT * se)
    return float(np.clip(ratio[best] + PI_REPORT_SE * se[best], 0.0, max_pi))


def calibrate(
    matched: np.ndarray,
    mismatched: np.ndarray,
    false_reject_budget: float = 0.02,
    min_auc: float = 0.6,
    min_catch: float = 0.5,
    min_rows: int = 30,
    max_pi: float = 0.5,
) -> Calibration:
    """The threshold that sets the most rows right (mismatched caught minus good rejected)
    at an estimated false-reject rate of good rows <= `false_reject_budget`, or no threshold.

    Model: matched = (1 - pi) Good + pi Mis, with Mis estimated by `mismatched` (the same
    images with captions drawn from other rows). With pi from `estimate_pi`, the good rows'
    CDF is G(t) = (F_matched(t) - pi F_mis(t)) / (1 - pi). Every score is a candidate t
    (reject score < t); those with G(t) over the budget are out; of the rest, the lowest t
    maximising pi F_mis(t) - (1 - pi) G(t) is used. That maximum is the Bayes cut (rows just
    below it are as likely good as mismatched), so the budget is a cap, not a target: a
    model that separates well rejects far fewer good rows than the budget allows.

    Conservative on purpose, since the budget must hold on the rows at hand and not only on
    average: G's numerator counts every matched row below t, so a good row the model scores
    like a mismatched one is charged to the budget; the binomial spread of the mismatched
    count below t (pi n F_mis(t) only in expectation) is added to G; pi is at most `max_pi`
    (mismatched rows are assumed a minority; with no power r(l) ~ 1 and the cap keeps G sane).

    Decisions: `too_few` with fewer than `min_rows` matched scores (or fewer mismatched than
    matched: draw at least one per row); `too_weak` when the AUC is below `min_auc` or the
    expected catch at the chosen t is below `min_catch` (a filter that catches less than half
    of what it is for is not worth its false rejects); then the threshold is None and nothing
    is rejected."""
    m = np.sort(np.asarray(matched, dtype=np.float64).ravel())
    x = np.sort(np.asarray(mismatched, dtype=np.float64).ravel())
    if not 0.0 < false_reject_budget < 1.0:
        raise ValueError("false_reject_budget must be in (0, 1)")
    if not (np.isfinite(m).all() and np.isfinite(x).all()):
        raise ValueError("scores must be finite")
    base = dict(false_reject_budget=false_reject_budget, n_matched=len(m), n_mismatched=len(x))
    if len(m) < min_rows or len(x) < len(m):
        return Calibration("too_few", None, None, None, 0.0, 0.0, **base,
                           reason=f"{len(m)} matched / {len(x)} mismatched scores: too few to calibrate "
                                  f"(need >= {min_rows} matched and at least as many mismatched)")
    power = auc(m, x)
    pi = estimate_pi(m, x, max_pi)
    candidates = np.unique(np.concatenate([m, x, [np.nextafter(max(m[-1], x[-1]), np.inf)]]))
    f_m, f_x = _cdf(m, candidates), _cdf(x, candidates)
    n = len(m)
    spread = np.sqrt(pi * f_x * (1 - f_x) / n + pi ** 2 * f_x * (1 - f_x) / len(x))
    good_cdf = np.clip((f_m - pi * f_x + spread) / (1 - pi), 0.0, 1.0)
    net = pi * f_x - (1 - pi) * good_cdf
    net[good_cdf > false_reject_budget] = -np.inf
    idx = int(np.argmax(net))  # the first (lowest) t of the best
    threshold, catch, false_reject = float(candidates[idx]), float(f_x[idx]), float(good_cdf[idx])
    if idx == 0 or catch == 0.0:
        threshold = None
    if power < min_auc or catch < min_catch or threshold is None:
        why = (f"AUC {power:.3f} < {min_auc}" if power < min_auc
               else f"catch {catch:.3f} < {min_catch} at false-reject budget {false_reject_budget}")
        return Calibration("too_weak", None, power, pi, 0.0, 0.0, **base,
                           reason=f"model too weak to filter: {why}; nothing rejected")
    return Calibration("filter", threshold, power, pi, false_reject, catch, **base,
                       reason=f"AUC {power:.3f}, est. mismatched {pi:.3f}: reject score < {threshold:.4f}")
