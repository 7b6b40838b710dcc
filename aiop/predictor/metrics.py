"""Accuracy metrics of a predictor, their mean ± std over seeds, and scatter plots.

Percentage errors are relative to the measured value (``|pred − true| / |true|``,
in percent). ``within_5``/``within_10`` are the shares (0–1) of predictions
within ±5 % / ±10 % of the measured value. SRCC is Spearman's ρ and
``kendall`` Kendall's τ-b (scipy); both are NaN with fewer than two distinct
values. AIO-P logged MSE, MAE, MAPE and ρ; Kendall's τ and the within-shares
are ours.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

METRICS: tuple[str, ...] = (
    "n",
    "mae",
    "mse",
    "mape",
    "median_ape",
    "p95_ape",
    "srcc",
    "kendall",
    "within_5",
    "within_10",
)


def _arrays(y_true: Sequence[float], y_pred: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true, dtype=np.float64).ravel()
    p = np.asarray(y_pred, dtype=np.float64).ravel()
    if t.shape != p.shape:
        raise ValueError(f"y_true has {t.size} values, y_pred {p.size}")
    return t, p


def ape(y_true: Sequence[float], y_pred: Sequence[float]) -> np.ndarray:
    """Absolute percentage errors, in percent (inf where the measured value is 0)."""
    t, p = _arrays(y_true, y_pred)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.abs(p - t) / np.abs(t) * 100.0


def _rank_corr(kind: str, t: np.ndarray, p: np.ndarray) -> float:
    from scipy import stats

    # constant input: correlation undefined (scipy would warn and return NaN)
    if t.size < 2 or np.all(t == t[0]) or np.all(p == p[0]):
        return math.nan
    fn = stats.spearmanr if kind == "srcc" else stats.kendalltau
    return float(fn(t, p)[0])


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """Every metric of :data:`METRICS` for one set of (measured, predicted) pairs."""
    t, p = _arrays(y_true, y_pred)
    if t.size == 0:
        return {k: (0 if k == "n" else math.nan) for k in METRICS}
    err = p - t
    a = ape(t, p)
    return {
        "n": int(t.size),
        "mae": float(np.mean(np.abs(err))),
        "mse": float(np.mean(err**2)),
        "mape": float(np.mean(a)),
        "median_ape": float(np.median(a)),
        "p95_ape": float(np.quantile(a, 0.95)),
        "srcc": _rank_corr("srcc", t, p),
        "kendall": _rank_corr("kendall", t, p),
        "within_5": float(np.mean(a <= 5.0)),
        "within_10": float(np.mean(a <= 10.0)),
    }


def mean_std(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric: ``{"mean", "std", "values"}`` over seeds (population std, NaNs skipped)."""
    out: dict[str, dict[str, Any]] = {}
    keys = [k for k in METRICS if any(k in r for r in runs)]
    keys += sorted({k for r in runs for k in r} - set(keys))
    for key in keys:
        values = [float(r[key]) for r in runs if key in r]
        finite = [v for v in values if math.isfinite(v)]
        out[key] = {
            "mean": float(np.mean(finite)) if finite else math.nan,
            "std": float(np.std(finite)) if finite else math.nan,
            "values": values,
        }
    return out


def format_mean_std(stat: Mapping[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    """``"1.23 ± 0.04"`` (``"–"`` for NaN)."""
    m, s = stat.get("mean", math.nan), stat.get("std", math.nan)
    if not math.isfinite(m):
        return "–"
    return f"{m * scale:.{digits}f} ± {s * scale:.{digits}f}"


def scatter_plot(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str,
    unit: str = "",
    log_scale: bool = False,
) -> Path:
    """Predicted vs measured, one colour per series name, with the y = x and ±10 % lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(5.5, 5.0), dpi=120)
    lo, hi = math.inf, -math.inf
    markers = "os^Dv<>"
    for i, (name, (t, p)) in enumerate(series.items()):
        t_arr, p_arr = _arrays(t, p)
        if t_arr.size == 0:
            continue
        keep = np.isfinite(t_arr) & np.isfinite(p_arr)
        if log_scale:
            keep &= (t_arr > 0) & (p_arr > 0)
        t_arr, p_arr = t_arr[keep], p_arr[keep]
        if t_arr.size == 0:
            continue
        m = regression_metrics(t_arr, p_arr)
        label = f"{name} (n={m['n']}, SRCC {m['srcc']:.3f}, med APE {m['median_ape']:.1f}%)"
        # distinct hollow markers keep overlapping series apart
        ax.scatter(
            t_arr, p_arr, s=14, marker=markers[i % len(markers)], facecolors="none",
            edgecolors=f"C{i}", linewidths=0.8, alpha=0.8, label=label,
        )  # fmt: skip
        lo = min(lo, float(t_arr.min()), float(p_arr.min()))
        hi = max(hi, float(t_arr.max()), float(p_arr.max()))
    if math.isfinite(lo):
        line = np.geomspace(lo, hi, 50) if log_scale and lo > 0 else np.linspace(lo, hi, 50)
        ax.plot(line, line, "k-", lw=0.8, label="y = x")
        ax.plot(line, line * 1.1, "k:", lw=0.6, label="±10 %")
        ax.plot(line, line * 0.9, "k:", lw=0.6)
    if log_scale:
        ax.set_xscale("log")
        ax.set_yscale("log")
    suffix = f" [{unit}]" if unit else ""
    ax.set_xlabel(f"measured{suffix}")
    ax.set_ylabel(f"predicted{suffix}")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", lw=0.3, alpha=0.5)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
