"""Plots of rewards, rankings and evaluation reports (matplotlib: `pip install "armorm[plot]"`).

    armorm.plot.objectives(out)          # rewards and coefficients per objective, conversations side by side
    armorm.plot.ranking(out)             # N responses to one prompt, best first
    armorm.plot.rewardbench(report)      # per-subset accuracy of an evaluation report
    armorm.plot.save(fig, "file.png")    # written to a temporary file and renamed

Each function returns a matplotlib Figure and never opens a window: figures
are made without pyplot, drawn by the Agg renderer whatever backend is set, so
they work in scripts, servers and threads and leave no global state behind.
In Jupyter a figure shows itself when it is a cell's value (as a PNG, once;
no `%matplotlib` needed). To draw into a figure of your own (e.g. for
`plt.show()`), pass `ax=` (`axes=` for `objectives`, which draws two panels).
"""
from __future__ import annotations

import io
import math
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError('armorm.plot needs matplotlib: pip install "armorm[plot]" (or pip install matplotlib)') from e

from .display import NEGATIVE, POSITIVE, as_report, conversation_parts, scored, shorten

#: One colour per conversation in `objectives` (matplotlib's tab10).
_SERIES = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b279a2", "#ff9da6", "#9d755d", "#bab0ac",
           "#eeca3b"]
MAX_SERIES = len(_SERIES)
BEST = "#f58518"


class NotebookFigure(Figure):
    """A matplotlib Figure that Jupyter shows as a PNG when it is a cell's value."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


def _figure(width: float, height: float) -> NotebookFigure:
    fig = NotebookFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg renders it whatever backend pyplot would pick
    return fig


def _legend(fig: Figure, ax: Any, handles: List[Any], owned: bool) -> None:
    """Below the plot when the figure is ours (nothing to hide), else inside the caller's axes."""
    if owned:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 3), fontsize=8,
                   frameon=False)
    else:
        ax.legend(handles=handles, fontsize=8)


def _rows(n: int, rows: Union[None, int, Sequence[int]]) -> List[int]:
    if rows is None:
        if n > MAX_SERIES:
            raise ValueError(f"this output has {n} rows; pick at most {MAX_SERIES} with rows=[...]")
        return list(range(n))
    picked = [rows] if isinstance(rows, (int, np.integer)) else list(rows)
    if not picked or len(picked) > MAX_SERIES:
        raise ValueError(f"rows must name 1 to {MAX_SERIES} rows, got {len(picked)}")
    for i in picked:
        if not -n <= int(i) < n:
            raise IndexError(f"row {i} of an output with {n} rows")
    return [int(i) % n for i in picked]


def objectives(output: Mapping, rows: Union[None, int, Sequence[int]] = None, *,
               labels: Optional[Sequence[str]] = None, k: int = 3, axes: Optional[Tuple[Any, Any]] = None) -> Figure:
    """Rewards (left) and coefficients (right) per objective, for one conversation or several side by side.

    `output`: a RewardOutput of an ArmoRM (`score_batch`, the model's call).
    `rows`: which conversations (default: all, at most 10). `labels`: legend
    names (default: the start of each response when the pipeline scored it).
    Objective names in bold are among a plotted conversation's top `k` by
    |coefficient|. The right panel shows coefficients (gating_output @ T^T,
    so the score is the sum of reward x coefficient) when the output comes
    from the model, else the gating weights. `axes`: two Axes to draw into.
    """
    s = scored(output)
    if s.rewards is None or s.rewards.ndim != 2:
        raise ValueError("objectives() needs an output with per-objective rewards (an ArmoRM's)")
    picked = _rows(s.rows, rows)
    if labels is not None and len(labels) != len(picked):
        raise ValueError(f"labels: {len(labels)} given for {len(picked)} rows")
    names = labels if labels is not None else [s.label(i) for i in picked]
    right = s.weights()
    right_name = "coefficient" if s.coefficients is not None else "gating weight"
    K = len(s.names)
    if axes is None:
        fig = _figure(10, 1.2 + 0.32 * K)
        ax_r, ax_c = fig.subplots(1, 2, sharey=True)
    else:
        ax_r, ax_c = axes
        fig = ax_r.figure
    y = np.arange(K)
    h = 0.8 / len(picked)
    for n, i in enumerate(picked):
        off = (n - (len(picked) - 1) / 2) * h
        color = _SERIES[n % len(_SERIES)]
        ax_r.barh(y + off, s.rewards[i], height=h, color=color, label=names[n])
        if right is not None:
            ax_c.barh(y + off, right[i], height=h, color=color, label=names[n])
    top = {j for i in picked for j in s.top(i, k)}
    for ax, title in ((ax_r, "reward"), (ax_c, right_name)):
        ax.axvline(0, color="#888", linewidth=0.8)
        ax.grid(axis="x", color="#ddd", linewidth=0.6)
        ax.set_axisbelow(True)
        ax.set_xlabel(title)
    ax_r.set_yticks(y, s.names)
    ax_r.invert_yaxis()
    for j, tick in enumerate(ax_r.get_yticklabels()):
        if j in top:
            tick.set_fontweight("bold")
    if s.score is not None:
        scores = ", ".join(f"{float(s.score[i]):+.4f}" for i in picked)
        ax_r.set_title(f"score{'s' if len(picked) > 1 else ''}: {scores}", loc="left", fontsize=10)
    if right is None:
        ax_c.set_visible(False)
    if len(picked) > 1:
        _legend(fig, ax_r, ax_r.get_legend_handles_labels()[0], axes is None)
    return fig


def _scores_and_labels(outputs: Any) -> Tuple[np.ndarray, List[str], Optional[str]]:
    """Scores, labels and the shared prompt (or None) of what `ranking` takes."""
    if isinstance(outputs, Mapping):
        s = scored(outputs)
        if s.score is None:
            raise ValueError("ranking() needs scores; this output has none")
        prompts = {conversation_parts(c)[0] for c in s.conversations} if s.conversations is not None else set()
        return (np.asarray(s.score, dtype=np.float64), [s.label(i) for i in range(s.rows)],
                next(iter(prompts)) if len(prompts) == 1 else None)
    scores = []
    for i, o in enumerate(outputs):
        v = o["score"] if isinstance(o, Mapping) else o
        a = np.asarray(v.detach().cpu() if hasattr(v, "detach") else v, dtype=np.float64).reshape(-1)
        if a.size != 1:
            raise ValueError(f"outputs[{i}]: one score per response expected, got {a.size}")
        scores.append(float(a[0]))
    return np.asarray(scores), [f"response {i}" for i in range(len(scores))], None


def ranking(outputs: Any, labels: Optional[Sequence[str]] = None, *, ax: Any = None) -> Figure:
    """N responses to one prompt ranked by score, best on top (highlighted).

    `outputs`: a RewardOutput with one row per response (`score_batch`), or
    a sequence of scores, or of the pipeline's `{"score": ...}` results.
    `labels`: one per response (default: the start of each response when the
    pipeline scored them, else "response i"). `ax`: an Axes to draw into.
    """
    scores, default_labels, prompt = _scores_and_labels(outputs)
    if scores.size == 0:
        raise ValueError("ranking() needs at least one score")
    if labels is not None and len(labels) != scores.size:
        raise ValueError(f"labels: {len(labels)} given for {scores.size} responses")
    names = list(labels) if labels is not None else default_labels
    order = sorted(range(scores.size), key=lambda i: (-scores[i] if math.isfinite(scores[i]) else math.inf, i))
    if ax is None:
        fig = _figure(8, 1.0 + 0.38 * scores.size)
        ax = fig.subplots()
    else:
        fig = ax.figure
    y = np.arange(scores.size)
    vals = np.nan_to_num(scores[order], nan=0.0)
    colors = [BEST if r == 0 else (POSITIVE if v >= 0 else NEGATIVE) for r, v in enumerate(vals)]
    ax.barh(y, vals, color=colors)
    ax.set_yticks(y, [f"#{r + 1}  {shorten(names[i], 50)}  (row {i})" for r, i in enumerate(order)])
    ax.invert_yaxis()
    ax.axvline(0, color="#888", linewidth=0.8)
    span = float(np.max(np.abs(vals))) if vals.size else 0.0
    for yy, v, i in zip(y, vals, order):
        ax.annotate(f"{scores[i]:+.4f}", (v, yy), xytext=(4 if v >= 0 else -4, 0), textcoords="offset points",
                    ha="left" if v >= 0 else "right", va="center", fontsize=8)
    if span > 0:
        lo, hi = min(0.0, float(vals.min())), max(0.0, float(vals.max()))
        pad = 0.25 * span
        ax.set_xlim(lo - (pad if lo < 0 else 0), hi + (pad if hi > 0 else 0))
    ax.set_xlabel("score")
    ax.grid(axis="x", color="#ddd", linewidth=0.6)
    ax.set_axisbelow(True)
    title = f"{scores.size} responses ranked by score"
    if prompt:
        title += f"\nprompt: {shorten(prompt, 70)}"
    ax.set_title(title, loc="left", fontsize=10)
    return fig


def rewardbench(report: Mapping, *, ax: Any = None) -> Figure:
    """Per-subset accuracy bars of an evaluation report, coloured by section, with the headline score.

    `report`: what `armorm.train.rewardbench.evaluate_scores` returns, or its
    JSON file read back (RewardBench 2 reports and their files work too).
    """
    view = as_report(report).view()
    subs = view.subsets()
    if not subs:
        raise ValueError("the report has no subsets")
    owned = ax is None
    if ax is None:
        fig = _figure(8, 1.6 + 0.26 * len(subs))
        ax = fig.subplots()
    else:
        fig = ax.figure
    groups = list(dict.fromkeys(g for g, _, _ in subs))
    color = {g: _SERIES[n % len(_SERIES)] for n, g in enumerate(groups)}
    y = np.arange(len(subs))
    vals = [0.0 if v is None else v for _, _, v in subs]
    bars = ax.barh(y, vals, color=[color[g] for g, _, _ in subs])
    for b, (g, _, v) in zip(bars, subs):
        ax.annotate("n/a" if v is None else f"{v:.1f}", (b.get_width(), b.get_y() + b.get_height() / 2),
                    xytext=(3, 0), textcoords="offset points", va="center", fontsize=7,
                    bbox=dict(facecolor="white", edgecolor="none", pad=0.3, alpha=0.8))
    ax.set_yticks(y, [name for _, name, _ in subs], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 108)
    ax.set_xlabel(view.measure)
    ax.grid(axis="x", color="#ddd", linewidth=0.6)
    ax.set_axisbelow(True)
    head_name, head = view.headline[0]
    if head is not None:
        ax.axvline(head, color="#444", linestyle="--", linewidth=1, label=f"{head_name} {head:.1f}")
    if any(groups):
        from matplotlib.patches import Patch
        figures = dict((g, v) for g, v, _ in view.groups)
        handles = [Patch(color=color[g], label=g if figures.get(g) is None else f"{g} {figures[g]:.1f}")
                   for g in groups]
        _legend(fig, ax, handles + ax.get_legend_handles_labels()[0], owned)
    elif head is not None:
        _legend(fig, ax, ax.get_legend_handles_labels()[0], owned)
    ax.set_title(view.title + ("" if head is None else f": {head_name} {head:.1f}"), loc="left", fontsize=10)
    return fig


def check_target(path: Union[str, os.PathLike]) -> str:
    """The format of a figure file to write at `path` (from its extension); ValueError naming what is wrong.

    For commands to check before hours of work: the extension is one
    matplotlib writes and the directory exists.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    supported = FigureCanvasAgg(Figure()).get_supported_filetypes()
    if ext not in supported:
        raise ValueError(f"{path}: cannot write a figure in format {ext or '(no extension)'!r}; use one of "
                         f"{', '.join('.' + e for e in sorted(supported))}")
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise ValueError(f"{path}: directory {d} does not exist")
    return ext


def save(fig: Figure, path: Union[str, os.PathLike], dpi: int = 150) -> None:
    """Writes `fig` to `path` (format from the extension), whole or not at all."""
    from .atomic import atomic_open
    fmt = check_target(path)
    with atomic_open(path, binary=True) as f:
        fig.savefig(f, format=fmt, dpi=dpi, bbox_inches="tight")
