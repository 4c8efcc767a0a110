"""Rich display in Jupyter: armorm's results as HTML tables with inline bars.

Every `_repr_html_` in armorm renders here: a scored conversation or batch
(`RewardOutput`), `explain(...)` results (`Explanation`) and evaluation
reports (`Report`). The building blocks (`table`, `bar`, `signed_bar`,
`number`) are for any further report to reuse.

The HTML is plain markup with inline styles: no script, no stylesheet, so it
renders the same in Jupyter, VS Code and static notebook viewers, and a
notebook with these outputs stays trusted. All text that comes from data
(objective and subset names, conversation text) is escaped; only strings
built here as `Html` are inserted as markup.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .config import objective_names

POSITIVE = "#4c78a8"   # bars of positive values (blue)
NEGATIVE = "#e45756"   # bars of negative values (red)
GATING = "#72b7b2"     # gating weights (teal)
HIGHLIGHT = "#fff2c2"  # rows of the top objectives, the best response
BAR_WIDTH = 90         # px
MAX_ROWS = 20          # rows of a batch shown before "... and N more"
MAX_COLUMNS = 12       # conversations in the per-objective view
PREVIEW = 80           # characters of a message shown in a table cell


class Html(str):
    """Markup built by this module; every other string is escaped before it enters a page."""


def esc(x: Any) -> Html:
    """`x` as HTML: Html as is, anything else as escaped text."""
    return x if isinstance(x, Html) else Html(html.escape(str(x), quote=True))


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(float(v))


def number(v: Any, digits: int = 4, sign: bool = False) -> Html:
    """A right-aligned monospaced number ("n/a" for None or NaN)."""
    text = "n/a" if not _finite(v) else f"{float(v):{'+' if sign else ''}.{digits}f}"
    return Html(f'<span style="font-family:monospace">{text}</span>')


def bar(value: Any, vmax: float, color: str = POSITIVE, width: int = BAR_WIDTH) -> Html:
    """A horizontal bar of `width` * value / vmax pixels (values <= 0 or NaN: an empty track)."""
    frac = min(1.0, max(0.0, float(value) / vmax)) if _finite(value) and vmax > 0 else 0.0
    return Html(f'<span style="display:inline-block;vertical-align:middle;width:{width}px;height:10px;'
                f'background:#eee"><span style="display:block;width:{100 * frac:.1f}%;height:100%;'
                f'background:{color}"></span></span>')


def signed_bar(value: Any, vmax: float, width: int = BAR_WIDTH) -> Html:
    """A bar growing right (positive, blue) or left (negative, red) from a centre line."""
    half = width / 2
    frac = min(1.0, abs(float(value)) / vmax) if _finite(value) and vmax > 0 else 0.0
    w = frac * half
    left = half - w if _finite(value) and value < 0 else half
    color = NEGATIVE if _finite(value) and value < 0 else POSITIVE
    return Html(f'<span style="display:inline-block;position:relative;vertical-align:middle;width:{width}px;'
                f'height:10px;background:#eee"><span style="position:absolute;top:0;bottom:0;left:{left:.1f}px;'
                f'width:{w:.1f}px;background:{color}"></span><span style="position:absolute;top:0;bottom:0;'
                f'left:{half:.1f}px;width:1px;background:#999"></span></span>')


def value_bar(value: Any, vmax: float, *, signed: bool = False, color: str = POSITIVE, digits: int = 4) -> Html:
    """A number followed by its bar: the cell of a table column of values."""
    b = signed_bar(value, vmax) if signed else bar(value, vmax, color)
    return Html(f'{number(value, digits, sign=signed)}&nbsp;{b}')


_CELL = "padding:2px 8px;border-bottom:1px solid #ddd;text-align:{};white-space:{}"


def table(headers: Sequence[Any], rows: Sequence[Sequence[Any]], *, align: str = "", highlight: Iterable[int] = (),
          caption: Any = None) -> Html:
    """A table; `align` holds one of l/r/c/w per column (left, right, centre, left and wrapping long text;
    default l), `highlight` row indexes to shade. Cells are escaped unless they are Html.
    """
    hl = set(highlight)

    def style(j: int) -> str:
        a = align[j] if j < len(align) else "l"
        return _CELL.format({"l": "left", "r": "right", "c": "center", "w": "left"}[a],
                            "normal" if a == "w" else "nowrap")

    parts = ['<table style="border-collapse:collapse;margin:4px 0">']
    if caption is not None:
        parts.append(f'<caption style="text-align:left;padding:2px 8px">{esc(caption)}</caption>')
    parts.append("<thead><tr>" + "".join(f'<th style="{style(j)}">{esc(h)}</th>' for j, h in enumerate(headers))
                 + "</tr></thead><tbody>")
    for i, row in enumerate(rows):
        shade = f' style="background:{HIGHLIGHT};font-weight:bold"' if i in hl else ""
        parts.append(f"<tr{shade}>" + "".join(f'<td style="{style(j)}">{esc(c)}</td>' for j, c in enumerate(row))
                     + "</tr>")
    parts.append("</tbody></table>")
    return Html("".join(parts))


def block(*parts: Any) -> Html:
    """The outer element of a display: its parts one under the other."""
    return Html('<div style="font-size:13px">' + "".join(esc(p) for p in parts) + "</div>")


def paragraph(text: Any, *, bold: bool = False, muted: bool = False) -> Html:
    style = "margin:4px 0" + (";font-weight:bold" if bold else "") + (";color:#666" if muted else "")
    return Html(f'<p style="{style}">{esc(text)}</p>')


def details(summary: Any, body: Any) -> Html:
    """A collapsed section (HTML's own <details>: no script needed)."""
    return Html(f'<details style="margin:4px 0"><summary>{esc(summary)}</summary>{esc(body)}</details>')


# =========================================================================== conversations


def shorten(text: Any, limit: int = PREVIEW) -> str:
    """One line of at most `limit` characters (whitespace collapsed)."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def conversation_parts(conversation: Any) -> Tuple[str, str]:
    """(prompt, response): the last user message before the final message, and the final message.

    Takes a message list or a record that the pipeline takes (`messages`,
    or `prompt` + `response`); anything else gives ("", str(conversation)).
    """
    if isinstance(conversation, Mapping):
        try:
            from .tokenizer import conversation_from_record
            conversation = conversation_from_record(conversation)
        except Exception:  # a display never fails on what the pipeline would have refused
            return "", str(conversation)
    if not isinstance(conversation, (list, tuple)) or not conversation:
        return "", str(conversation)
    msgs = [m for m in conversation if isinstance(m, Mapping)]
    if not msgs:
        return "", str(conversation)
    prompt = next((str(m.get("content", "")) for m in reversed(msgs[:-1]) if m.get("role") == "user"), "")
    return prompt, str(msgs[-1].get("content", ""))


def _tooltip(text: str, shown: str) -> Html:
    """`shown` with the full `text` as its tooltip."""
    return Html(f'<span title="{esc(text)}">{esc(shown)}</span>')


# =========================================================================== reward outputs


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().float().numpy()
    return np.asarray(v)


@dataclass
class _Scored:
    """The arrays of a RewardOutput that the displays and plots use, as NumPy, with names."""

    rows: int
    score: Optional[np.ndarray]            # [B]
    rewards: Optional[np.ndarray]          # [B, K]
    gating: Optional[np.ndarray]           # [B, K]
    coefficients: Optional[np.ndarray]     # [B, K]: gating @ T^T when the transform matrix is known
    names: List[str]
    conversations: Optional[List[Any]]
    shapes: Dict[str, Tuple[int, ...]] = field(default_factory=dict)

    def weights(self) -> Optional[np.ndarray]:
        """What decides the top objectives: the coefficients, else the gating weights."""
        return self.coefficients if self.coefficients is not None else self.gating

    def top(self, i: int, k: int) -> List[int]:
        from .model import top_objectives
        w = self.weights()
        return [] if w is None else top_objectives(w[i], k)

    def label(self, i: int) -> str:
        if self.conversations is None:
            return f"row {i}"
        return shorten(conversation_parts(self.conversations[i])[1], 40)


def scored(out: Mapping, coefficients: bool = True) -> _Scored:
    """Reads an output (a RewardOutput or any mapping of its fields) for display.

    The coefficients are computed when `coefficients` and the output carries
    the model's transform matrix.
    """
    from .model import objective_coefficients
    ctx = getattr(out, "_display", None) or {}
    arrays = {k: _numpy(v) for k, v in out.items()}
    score = arrays.get("score")
    if score is None and "logits" in arrays and arrays["logits"].ndim == 2:
        score = arrays["logits"][:, 0]
    rewards = arrays.get("rewards")
    gating = arrays.get("gating_output")
    rows = next((len(a) for a in arrays.values() if a.ndim >= 1), 0)
    k = rewards.shape[1] if rewards is not None and rewards.ndim == 2 else 0
    coeffs = None
    if coefficients and gating is not None and ctx.get("transform") is not None:
        coeffs = objective_coefficients(gating, ctx["transform"])
    names = list(ctx.get("objectives") or objective_names(k))
    convs = ctx.get("conversations")
    if convs is not None and len(convs) != rows:
        convs = None
    return _Scored(rows, score, rewards, gating, coeffs, names, convs,
                   {name: tuple(a.shape) for name, a in arrays.items()})


def _conversation_header(s: _Scored, i: int) -> List[Html]:
    if s.conversations is None:
        return []
    prompt, response = conversation_parts(s.conversations[i])
    out = []
    if prompt:
        out.append(paragraph(Html(f"<b>prompt</b>: {_tooltip(prompt, shorten(prompt, 300))}")))
    out.append(paragraph(Html(f"<b>response</b>: {_tooltip(response, shorten(response, 300))}")))
    return out


def _one_row(s: _Scored, i: int, k: int) -> Html:
    """One conversation: its score, and per objective reward, gating weight, coefficient, contribution."""
    top = s.top(i, k)
    rank = {j: r + 1 for r, j in enumerate(top)}
    r = s.rewards[i]
    g = s.gating[i] if s.gating is not None else None
    c = s.coefficients[i] if s.coefficients is not None else None
    headers = ["", "objective", "reward"]
    headers += ["gating weight"] if g is not None else []
    headers += ["coefficient", "reward × coefficient"] if c is not None else []
    rmax = float(np.nanmax(np.abs(r))) if np.isfinite(r).any() else 0.0
    gmax = float(np.nanmax(g)) if g is not None and np.isfinite(g).any() else 0.0
    cmax = float(np.nanmax(np.abs(c))) if c is not None and np.isfinite(c).any() else 0.0
    contrib = r * c if c is not None else None
    pmax = float(np.nanmax(np.abs(contrib))) if contrib is not None and np.isfinite(contrib).any() else 0.0
    rows = []
    for j, name in enumerate(s.names):
        row: List[Any] = [str(rank.get(j, "")), name, value_bar(r[j], rmax, signed=True)]
        if g is not None:
            row.append(value_bar(g[j], gmax, color=GATING))
        if c is not None:
            row += [value_bar(c[j], cmax, signed=True), value_bar(contrib[j], pmax, signed=True)]
        rows.append(row)
    head = [paragraph(Html(f"score {number(s.score[i], 5, sign=True)}"), bold=True)] if s.score is not None else []
    what = "coefficient" if c is not None else "gating weight"
    note = [paragraph(f"Highlighted (1-{len(top)}): the objectives with the largest |{what}|."
                      + (" The score is the sum of reward × coefficient." if c is not None else ""), muted=True)]
    return block(*head, *_conversation_header(s, i),
                 table(headers, rows, align="rlrrrr", highlight=[j for j in top]), *note)


def _top_cell(s: _Scored, i: int, k: int) -> Html:
    w = s.weights()
    if w is None:
        return Html("")
    return Html("<br>".join(f'<span style="white-space:nowrap">{esc(s.names[j])} {number(w[i][j], 3, sign=True)}'
                            "</span>" for j in s.top(i, k)))


def _batch(s: _Scored, k: int) -> Html:
    """Several conversations: one row each, then a per-objective view in a collapsed section."""
    n = min(s.rows, MAX_ROWS)
    parts: List[Html] = []
    pairs = [conversation_parts(s.conversations[i]) for i in range(n)] if s.conversations is not None else None
    one_prompt = pairs is not None and len({p for p, _ in pairs}) == 1 and bool(pairs[0][0])
    if one_prompt:
        parts.append(paragraph(Html(f"<b>prompt</b>: {_tooltip(pairs[0][0], shorten(pairs[0][0], 300))}")))
    sc = s.score[:n] if s.score is not None else None
    smax = float(np.nanmax(np.abs(sc))) if sc is not None and np.isfinite(sc).any() else 0.0
    best = [int(np.nanargmax(sc))] if sc is not None and np.isfinite(sc).any() and n > 1 else []
    columns: List[Tuple[str, str, Any]] = [("#", "r", lambda i: str(i))]  # (header, alignment, cell of row i)
    if pairs is not None and not one_prompt:
        columns.append(("prompt", "w", lambda i: _tooltip(pairs[i][0], shorten(pairs[i][0], 40))))
    if pairs is not None:
        columns.append(("response", "w", lambda i: _tooltip(pairs[i][1], shorten(pairs[i][1], PREVIEW))))
    if sc is not None:
        columns.append(("score", "r", lambda i: value_bar(sc[i], smax, signed=True, digits=5)))
    if s.weights() is not None:
        what = "coefficient" if s.coefficients is not None else "gating weight"
        columns.append((f"top {k} objectives ({what})", "l", lambda i: _top_cell(s, i, k)))
    parts.append(table([h for h, _, _ in columns], [[cell(i) for _, _, cell in columns] for i in range(n)],
                       align="".join(a for _, a, _ in columns), highlight=best))
    notes = ["Highlighted: the highest score."] if best else []
    if s.rows > n:
        notes.append(f"Showing {n} of {s.rows} rows; out.row(i) shows one in detail.")
    else:
        notes.append("out.row(i) shows conversation i in detail.")
    parts.append(paragraph(" ".join(notes), muted=True))
    parts.append(details("per objective: rewards (shaded: the top objectives of each conversation)",
                         _per_objective(s, min(n, MAX_COLUMNS), k)))
    return block(*parts)


def _per_objective(s: _Scored, n: int, k: int) -> Html:
    """Objectives down, conversations across: each reward, its top objectives shaded."""
    tops = [set(s.top(i, k)) for i in range(n)]
    headers = ["objective"] + [str(i) for i in range(n)]
    rows = []
    for j, name in enumerate(s.names):
        cells: List[Any] = [name]
        for i in range(n):
            v = number(s.rewards[i][j], 3, sign=True)
            cells.append(Html(f'<span style="background:{HIGHLIGHT};font-weight:bold">{v}</span>')
                         if j in tops[i] else v)
        rows.append(cells)
    return table(headers, rows, align="l" + "r" * n)


def _fields_only(s: _Scored, title: str) -> Html:
    parts: List[Html] = [paragraph(title, bold=True)]
    if s.score is not None:
        n = min(s.rows, MAX_ROWS)
        smax = float(np.nanmax(np.abs(s.score[:n]))) if np.isfinite(s.score[:n]).any() else 0.0
        rows = [[str(i)] + ([_tooltip(conversation_parts(s.conversations[i])[1], s.label(i))]
                            if s.conversations is not None else [])
                + [value_bar(s.score[i], smax, signed=True, digits=5)] for i in range(n)]
        parts.append(table(["#"] + (["response"] if s.conversations is not None else []) + ["score"], rows,
                           align="rwr" if s.conversations is not None else "rr"))
        if s.rows > n:
            parts.append(paragraph(f"Showing {n} of {s.rows} rows.", muted=True))
    parts.append(table(["field", "shape"], [[k, "×".join(map(str, v)) or "scalar"] for k, v in s.shapes.items()]))
    return block(*parts)


def reward_output_html(out: Mapping, k: int = 3) -> str:
    """The HTML of a RewardOutput: one conversation in detail, or a batch as a table."""
    s = scored(out)
    if s.rewards is None or s.rewards.ndim != 2 or s.rows == 0:
        return _fields_only(s, f"RewardOutput: {s.rows} row{'s' if s.rows != 1 else ''}")
    return _one_row(s, 0, k) if s.rows == 1 else _batch(s, k)


def reward_output_text(out: Mapping) -> str:
    """The short terminal form: rows, scores (the first few) and field shapes."""
    s = scored(out, coefficients=False)
    parts = []
    if s.score is not None and s.score.ndim == 1:
        vals = ", ".join(f"{v:.4f}" for v in s.score[:4]) + (", ..." if s.rows > 4 else "")
        parts.append(f"score=[{vals}]")
    parts += [f"{k}[{','.join(map(str, v))}]" for k, v in s.shapes.items() if k != "score"]
    return f"RewardOutput({s.rows} row{'s' if s.rows != 1 else ''}: {', '.join(parts)})"


# =========================================================================== explanations


class Explanation(list):
    """The top objectives of one conversation: [(objective, coefficient), ...], as the model card prints them.

    It is that list (equal to it, usable as it); in Jupyter it also shows each
    coefficient as a bar and, when known, the objective's reward and its
    contribution to the score (reward × coefficient). `score`, `rewards` (one
    per listed objective) and `conversation` hold what is known, else None.
    """

    def __init__(self, items: Iterable[Tuple[str, float]] = (), *, score: Optional[float] = None,
                 rewards: Optional[Sequence[float]] = None, conversation: Any = None) -> None:
        super().__init__(items)
        self.score = score
        self.rewards = None if rewards is None else [float(v) for v in rewards]
        self.conversation = conversation

    def _repr_html_(self) -> str:
        return explanations_html([self])


class Explanations(list):
    """One Explanation per row of an output (`ArmoRM.explain`); a list of lists of tuples."""

    def _repr_html_(self) -> str:
        return explanations_html(list(self))


def explanations_html(items: Sequence[Explanation]) -> str:
    """One explanation as a table of its objectives; several as one row each."""
    if not items:
        return block(paragraph("no rows", muted=True))
    if len(items) == 1:
        e = items[0]
        parts: List[Html] = []
        if e.score is not None:
            parts.append(paragraph(Html(f"score {number(e.score, 5, sign=True)}"), bold=True))
        if e.conversation is not None:
            prompt, response = conversation_parts(e.conversation)
            if prompt:
                parts.append(paragraph(Html(f"<b>prompt</b>: {_tooltip(prompt, shorten(prompt, 300))}")))
            parts.append(paragraph(Html(f"<b>response</b>: {_tooltip(response, shorten(response, 300))}")))
        cmax = max((abs(c) for _, c in e if _finite(c)), default=0.0)
        headers = ["", "objective", "coefficient"]
        rows: List[List[Any]] = [[str(r + 1), name, value_bar(c, cmax, signed=True)] for r, (name, c) in enumerate(e)]
        if e.rewards is not None and len(e.rewards) == len(e):
            contrib = [rw * c for rw, (_, c) in zip(e.rewards, e)]
            rmax = max((abs(v) for v in e.rewards if _finite(v)), default=0.0)
            pmax = max((abs(v) for v in contrib if _finite(v)), default=0.0)
            headers += ["reward", "reward × coefficient"]
            for row, rw, p in zip(rows, e.rewards, contrib):
                row += [value_bar(rw, rmax, signed=True), value_bar(p, pmax, signed=True)]
        parts.append(table(headers, rows, align="rlrrr"))
        parts.append(paragraph("The objectives with the largest |coefficient|, largest first.", muted=True))
        return block(*parts)
    k = max(len(e) for e in items)
    headers = ["#", "response", "score"] + [f"top {r + 1}" for r in range(k)]
    rows = []
    for i, e in enumerate(items[:MAX_ROWS]):
        resp = conversation_parts(e.conversation)[1] if e.conversation is not None else ""
        row = [str(i), _tooltip(resp, shorten(resp, 40)), number(e.score, 5, sign=True)]
        row += [Html(f"{esc(name)} {number(c, 3, sign=True)}") for name, c in e] + [""] * (k - len(e))
        rows.append(row)
    more = [paragraph(f"Showing {MAX_ROWS} of {len(items)} rows.", muted=True)] if len(items) > MAX_ROWS else []
    return block(table(headers, rows, align="rwr"), *more)


# =========================================================================== evaluation reports


@dataclass
class ReportView:
    """What a report shows, in percent: headline figures, subsets in groups, notes."""

    title: str
    headline: List[Tuple[str, Optional[float]]]
    #: (group, the group's figure, [(subset, percent, detail such as "95/100")]); "" names no group
    groups: List[Tuple[str, Optional[float], List[Tuple[str, Optional[float], str]]]]
    notes: List[str] = field(default_factory=list)
    detail: str = "n"                # the header of the subsets' detail column
    measure: str = "accuracy (%)"    # what the subsets' percentages are

    def subsets(self) -> List[Tuple[str, str, Optional[float]]]:
        """(group, subset, percent) in display order."""
        return [(g, name, v) for g, _, subs in self.groups for name, v, _ in subs]


class Report(dict):
    """An evaluation result: the plain dict its JSON file holds, shown as a table in Jupyter.

    The generic view reads {"score": percent, "subsets": {name: percent, or
    {"accuracy": fraction, "correct", "count"}}, "counts": {name: n},
    "notes": [...]}; a report with sections overrides `view`.
    """

    title = "Evaluation"

    def __init__(self, data: Mapping[str, Any] = (), title: Optional[str] = None) -> None:
        super().__init__(data)
        if title is not None:
            self.title = title

    def view(self) -> ReportView:
        counts = self.get("counts") or {}
        subs = []
        items = (self.get("subsets") or {}).items()
        for name, v in items:
            if isinstance(v, Mapping):
                acc = v.get("accuracy")
                pct = None if not _finite(acc) else 100.0 * float(acc)
                detail = f"{v['correct']}/{v['count']}" if "correct" in v and "count" in v else ""
            else:
                pct = float(v) if _finite(v) else None
                detail = f"{counts[name]}" if name in counts else ""
            subs.append((str(name), pct, detail))
        score = self.get("score")
        as_fractions = any(isinstance(v, Mapping) for _, v in items)
        return ReportView(self.title, [("Score", float(score) if _finite(score) else None)],
                          [("", None, subs)], [str(n) for n in self.get("notes") or []],
                          detail="correct" if as_fractions else "n",
                          measure="accuracy (%)" if as_fractions else "score (%)")

    def _repr_html_(self) -> str:
        return report_html(self.view())

    def __repr__(self) -> str:
        return report_text(self.view())


def report_text(v: ReportView) -> str:
    """One line of headline figures, then the notes."""
    figs = ", ".join(f"{name} {'n/a' if x is None else f'{x:.1f}'}" for name, x in v.headline)
    n = sum(len(subs) for _, _, subs in v.groups)
    return "\n".join([f"{v.title}: {figs} ({n} subsets)"] + [f"note: {s}" for s in v.notes])


def report_html(v: ReportView) -> str:
    """The headline figures as one row, the subsets as bars (0-100) grouped, and the notes."""
    parts: List[Html] = [paragraph(v.title, bold=True),
                         table([name for name, _ in v.headline], [[number(x, 1) for _, x in v.headline]],
                               align="r" * len(v.headline))]
    grouped = any(g for g, _, _ in v.groups)
    detail = any(d for _, _, subs in v.groups for _, _, d in subs)
    headers = (["section"] if grouped else []) + ["subset", v.measure] + ([v.detail] if detail else [])
    rows = []
    for g, gv, subs in v.groups:
        for j, (name, pct, d) in enumerate(subs):
            cell = Html(f"{esc(g)} {number(gv, 1)}") if grouped and j == 0 and gv is not None else \
                (g if grouped and j == 0 else "")
            rows.append(([cell] if grouped else []) + [name, value_bar(pct, 100.0, digits=1)]
                        + ([d] if detail else []))
    parts.append(table(headers, rows, align=("l" if grouped else "") + "lrr"))
    if v.notes:
        parts.append(Html('<ul style="margin:4px 0;color:#666">' + "".join(f"<li>{esc(n)}</li>" for n in v.notes)
                          + "</ul>"))
    return block(*parts)


def as_report(obj: Any) -> Report:
    """A Report from a report or its dict (e.g. read back from the JSON file an evaluation wrote)."""
    if isinstance(obj, Report):
        return obj
    if not isinstance(obj, Mapping) or "subsets" not in obj:
        raise TypeError(f"expected an evaluation report (a dict with 'subsets'), got {type(obj).__name__}")
    if "sections" in obj:
        from .train.rewardbench import RewardBenchReport
        return RewardBenchReport(obj)
    return Report(obj, title="RewardBench 2" if "ties" in obj else None)  # RewardBench 2 reports its Ties parts
