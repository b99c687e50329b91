"""Independence and identical-distribution checks of update entries (the M22 slides' protocol).

M22 models a layer's update entries as i.i.d. within the layer and across iterations, and checks
that with two tests run many times on random subsets, reporting the *pass rate*: the fraction of
trials with p-value ``> alpha`` (no evidence against the null at level ``alpha``)::

    rho = (1 / trials) * sum_i 1[p_i > alpha]

* **Spearman** (``scipy.stats.spearmanr``, two-sided): H0 = the paired values have no monotonic
  association. Under H0 the pass rate is about ``1 - alpha`` (0.95).
* **Kolmogorov-Smirnov** (``scipy.stats.ks_2samp``, two-sided, ``method="auto"``): H0 = the two
  samples come from the same law. About ``1 - alpha`` under H0 for continuous data; with ties
  (many exact zeros) the test is conservative and passes more often.

What is paired with what
------------------------
Each trial draws two disjoint index sets ``I`` and ``J`` of ``n`` flat positions (``2n`` distinct
positions) with ``numpy.random.default_rng(seed)``; ``I[k]`` is paired with ``J[k]``.

* **Between entries of one layer** (``samples_b=None``, ``mode="entries"``):
  Spearman on the pairs ``(a[I[k]], a[J[k]])``; KS between the samples ``a[I]`` and ``a[J]``.
* **Between iterations** (``samples_b`` = the same layer at another iteration, same number of
  entries, ``mode="iterations"``): Spearman on ``(a[I[k]], b[I[k]])`` -- *the same entries* at the
  two iterations (does an entry's value predict its later value?); KS between ``a[I]`` and ``b[J]``
  -- *different* entries, so the two samples are independent draws when H0 holds (is the layer's
  law the same at both iterations?). Spearman ignores ``J`` in this mode.

How ``I`` and ``J`` are drawn (``pairing``)
-------------------------------------------
* ``"random"`` (default): ``2n`` distinct positions uniformly at random, split in two. **Caveat:**
  within one layer this pairing makes the two samples exchangeable *whatever the layer holds*, so
  both tests pass at about ``1 - alpha`` even for strongly dependent or non-stationary entries. It is
  the calibration baseline; to detect dependence *within* a layer use the next two. Between
  iterations it is the right choice.
* ``"neighbours"``: ``J = I + lag`` -- pairs of entries ``lag`` apart in the flat layout (``lag=1``:
  adjacent entries of a row; ``lag = row length``: the same column in adjacent rows). Positions are
  drawn from disjoint tiles ``[t*2*lag, (t+1)*2*lag)``, ``I`` in the first half of a tile, so all
  ``2n`` are distinct. Spearman here detects local correlation.
* ``"blocks"``: ``I`` and ``J`` are two non-overlapping contiguous runs of ``n`` positions at random
  places; ``I[k]`` pairs with ``J[k]`` at the same offset. KS here detects that different regions of
  the layer (rows, filters) follow different laws.

The slides ran n = 100 and n = 3000; larger ``n`` gives the tests more power, so real gradients pass
less often at n = 3000 -- the pass rate is a function of ``n`` as much as of the data. A trial whose
statistic is undefined (e.g. Spearman on a constant subset, common in sparse layers) is not counted:
``pass_rate = n_pass / (trials - n_undefined)`` (``nan`` when every trial is undefined).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import stats as sstats

from fedsqueeze.stats.fit import StatsError, as_float64

__all__ = ["PassRate", "ks_pass_rate", "spearman_pass_rate"]

Pairing = Literal["random", "neighbours", "blocks"]
_I64 = npt.NDArray[np.int64]
_F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class PassRate:
    """Result of :func:`spearman_pass_rate` or :func:`ks_pass_rate`.

    Attributes
    ----------
    test: ``"spearman"`` or ``"ks"``.
    mode: ``"entries"`` (one array) or ``"iterations"`` (two arrays).
    pairing: how the index sets were drawn (module docstring).
    n, trials, alpha: the arguments.
    pass_rate: ``n_pass / (trials - n_undefined)``, in [0, 1]; about ``1 - alpha`` under H0.
    n_pass: trials with p-value > alpha.
    n_undefined: trials whose statistic was undefined (constant subset) and were not counted.
    mean_statistic: mean Spearman rho or KS D over the defined trials (the slides' "Mean of Stat").
    mean_pvalue: mean p-value over the defined trials.
    """

    test: str
    mode: str
    pairing: str
    n: int
    trials: int
    alpha: float
    pass_rate: float
    n_pass: int
    n_undefined: int
    mean_statistic: float
    mean_pvalue: float


def spearman_pass_rate(
    samples_a: Any,
    samples_b: Any = None,
    n: int = 100,
    trials: int = 100,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    pairing: Pairing = "random",
    lag: int = 1,
) -> PassRate:
    """Fraction of ``trials`` Spearman tests with p-value > ``alpha``; see the module docstring.

    Parameters
    ----------
    samples_a: the layer's entries (tensor or array, any shape; flattened; finite).
    samples_b: the same layer at another iteration (same number of entries), or ``None`` to test
        between entries of ``samples_a``.
    n: pairs per test (>= 3); the slides use 100 and 3000. Needs ``2n`` <= entries.
    trials: number of tests (index-set draws).
    alpha: significance level in (0, 1).
    seed: seeds the index-set draws.
    pairing: ``"random"``, ``"neighbours"`` or ``"blocks"``.
    lag: distance of the pairs for ``pairing="neighbours"``.
    """

    def spearman(x: _F64, y: _F64) -> tuple[float, float]:
        res = sstats.spearmanr(x, y)
        return float(res.statistic), float(res.pvalue)

    return _pass_rate("spearman", spearman, samples_a, samples_b, n, trials, alpha, seed, pairing, lag)


def ks_pass_rate(
    samples_a: Any,
    samples_b: Any = None,
    n: int = 100,
    trials: int = 100,
    alpha: float = 0.05,
    seed: int = 0,
    *,
    pairing: Pairing = "random",
    lag: int = 1,
) -> PassRate:
    """Fraction of ``trials`` two-sample KS tests with p-value > ``alpha``; see the module docstring.

    Parameters are those of :func:`spearman_pass_rate` (``n`` >= 1 entries per sample).
    """

    def ks(x: _F64, y: _F64) -> tuple[float, float]:
        res = sstats.ks_2samp(x, y)
        return float(res.statistic), float(res.pvalue)

    return _pass_rate("ks", ks, samples_a, samples_b, n, trials, alpha, seed, pairing, lag)


# ---------------------------------------------------------------------------------------------- internals
def _int_arg(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise StatsError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _pass_rate(
    test: str,
    fn: Callable[[_F64, _F64], tuple[float, float]],
    samples_a: Any,
    samples_b: Any,
    n: int,
    trials: int,
    alpha: float,
    seed: int,
    pairing: str,
    lag: int,
) -> PassRate:
    n = _int_arg("n", n, 3 if test == "spearman" else 1)
    trials = _int_arg("trials", trials, 1)
    lag = _int_arg("lag", lag, 1)
    if not (isinstance(alpha, (int, float)) and 0.0 < float(alpha) < 1.0):
        raise StatsError(f"alpha must be a number in (0, 1), got {alpha!r}")
    if pairing not in ("random", "neighbours", "blocks"):
        raise StatsError(f"pairing must be 'random', 'neighbours' or 'blocks', got {pairing!r}")
    a = as_float64(samples_a, what="samples_a")
    b = None if samples_b is None else as_float64(samples_b, what="samples_b")
    if b is not None and b.size != a.size:
        raise StatsError(
            f"samples_a and samples_b must be the same layer at two iterations (same number of entries), "
            f"got {a.size} and {b.size} entries"
        )
    size = a.size
    capacity = (size // (2 * lag)) * lag if pairing == "neighbours" else size // 2
    if n > capacity:
        what = (
            f"n <= {capacity} for pairing='neighbours' with lag={lag}"
            if pairing == "neighbours"
            else "2n <= entries"
        )
        raise StatsError(f"n={n} is too large for a layer of {size} entries: need {what}; lower n")

    rng = np.random.default_rng(seed)
    stats_: list[float] = []
    pvals: list[float] = []
    undefined = 0
    with warnings.catch_warnings():
        # constant subsets: scipy warns and returns nan, which we count as undefined
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", getattr(sstats, "ConstantInputWarning", RuntimeWarning))
        for _ in range(trials):
            i_idx, j_idx = _draw(rng, size, n, pairing, lag)
            if b is None:
                x, y = a[i_idx], a[j_idx]
            elif test == "spearman":
                x, y = a[i_idx], b[i_idx]
            else:
                x, y = a[i_idx], b[j_idx]
            s, p = fn(x, y)
            if math.isnan(p) or math.isnan(s):
                undefined += 1
                continue
            stats_.append(s)
            pvals.append(p)
    defined = len(pvals)
    n_pass = int(sum(p > alpha for p in pvals))
    return PassRate(
        test=test,
        mode="entries" if b is None else "iterations",
        pairing=pairing,
        n=n,
        trials=trials,
        alpha=float(alpha),
        pass_rate=n_pass / defined if defined else float("nan"),
        n_pass=n_pass,
        n_undefined=undefined,
        mean_statistic=float(np.mean(stats_)) if defined else float("nan"),
        mean_pvalue=float(np.mean(pvals)) if defined else float("nan"),
    )


def _draw(rng: np.random.Generator, size: int, n: int, pairing: str, lag: int) -> tuple[_I64, _I64]:
    """Two disjoint index sets of ``n`` positions each in ``range(size)``; ``I[k]`` pairs with ``J[k]``."""
    if pairing == "random":
        pos = rng.choice(size, 2 * n, replace=False).astype(np.int64)
        return pos[:n], pos[n:]
    if pairing == "neighbours":
        slots = (size // (2 * lag)) * lag  # slot m -> tile m // lag, offset m % lag in the tile's first half
        m = rng.choice(slots, n, replace=False).astype(np.int64)
        i_idx = (m // lag) * (2 * lag) + m % lag
        return i_idx, i_idx + lag
    # blocks: starts u <= v in [0, size - 2n] -> runs [u, u+n) and [v+n, v+2n), which never overlap
    u, v = sorted(int(t) for t in rng.integers(0, size - 2 * n + 1, size=2))
    lo, hi = np.arange(u, u + n, dtype=np.int64), np.arange(v + n, v + 2 * n, dtype=np.int64)
    return (lo, hi) if rng.random() < 0.5 else (hi, lo)
