"""Rich display (armorm/display.py) and plots (armorm/plot.py).

The HTML is parsed with html.parser and every tag must close in order; text
from data (conversations, objective and subset names) must arrive escaped.
Plots are counted, not looked at: the bars a figure holds per axes (no
display needed: figures are drawn by Agg without pyplot). `--plot` on the CLI
writes the file whole or fails before any work.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import List

import numpy as np
import pytest

import armorm
from armorm import ArmoRMPipeline, RewardOutput
from armorm.cli import example_conversations
from armorm.display import Explanation, Report, as_report
from armorm.tiny import make_tiny_model
from armorm.train import rewardbench as rb

ROOT = Path(__file__).resolve().parent.parent
EVIL = '<script>alert("x")</script> & <b>bold</b>'
VOID = {"br", "hr", "img", "input", "meta", "link", "col", "wbr"}


class _Checker(HTMLParser):
    """Records tag nesting errors and every tag and text seen."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: List[str] = []
        self.errors: List[str] = []
        self.tags: List[str] = []
        self.text: List[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
        else:
            self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def well_formed(page: str) -> _Checker:
    c = _Checker()
    c.feed(page)
    c.close()
    assert not c.errors, c.errors[:5]
    assert not c.stack, f"unclosed: {c.stack}"
    assert "script" not in c.tags and "style" not in c.tags
    return c


@pytest.fixture(scope="module")
def rm(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("display") / "tiny")
    pipe = ArmoRMPipeline(path, torch_dtype="float32")
    yield pipe
    pipe.model.close()


def _conv(prompt: str, response: str):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


# =========================================================================== outputs


def test_batch_html_escapes_conversations_and_is_well_formed(rm):
    convs = example_conversations() + [_conv(EVIL, EVIL)]
    out = rm.score_batch(convs)
    page = out._repr_html_()
    c = well_formed(page)
    assert "<script>" not in page and "<b>bold" not in page
    assert "&lt;script&gt;" in page
    text = "".join(c.text)
    assert 'alert("x")' in text  # shown as text, after unescaping
    assert "table" in c.tags and "details" in c.tags
    # one row per conversation in the first table, the best score highlighted
    first = page.split("</table>")[0]
    assert first.count("<tr") == 1 + len(convs)
    assert page.count("font-weight:bold\"><td") >= 1
    for name in armorm.ATTRIBUTES:  # the per-objective view lists every objective
        assert name in text


def test_one_row_html_shows_every_objective_and_the_top_ones(rm):
    out = rm.score_batch([_conv("Hi <there>", "Hello & welcome")])
    page = out._repr_html_()
    c = well_formed(page)
    text = "".join(c.text)
    assert "Hi <there>" in text and "&lt;there&gt;" in page
    body = page.split("<tbody>")[1]
    assert body.count("<tr") == 19
    top = [name for name, _ in rm.explain(out, 3)]
    highlighted = [row for row in body.split("<tr")[1:] if row.startswith(" style=")]
    assert len(highlighted) == 3
    for name in top:
        assert any(f">{name}<" in row for row in highlighted)
    # row(i) of a batch is that conversation, with its text
    batch = rm.score_batch(example_conversations())
    one = batch.row(-1)
    assert one.score.shape == (1,) and one.score[0] == batch.score[2]
    assert "Sorry i cannot answer this." in "".join(well_formed(one._repr_html_()).text)
    with pytest.raises(IndexError):
        batch.row(3)


def test_objective_names_are_escaped():
    K = 3
    out = RewardOutput(rewards=np.array([[0.5, -0.2, 0.1]], np.float32),
                       gating_output=np.array([[0.2, 0.3, 0.5]], np.float32), score=np.array([0.1], np.float32))
    out._display.update(objectives=["a<b", 'q"x', "<script>"], transform=np.eye(K, dtype=np.float32))
    page = out._repr_html_()
    well_formed(page)
    assert "<script>" not in page and "a&lt;b" in page and "&lt;script&gt;" in page


def test_repr_is_short_and_other_architectures_display():
    seqcls = RewardOutput(score=np.arange(30, dtype=np.float32), logits=np.ones((30, 1), np.float32),
                          hidden_state=np.zeros((30, 8), np.float32))
    text = repr(seqcls)
    assert text.startswith("RewardOutput(30 rows: score=[0.0000, 1.0000, 2.0000, 3.0000, ...]") and "\n" not in text
    page = seqcls._repr_html_()
    well_formed(page)
    assert "Showing 20 of 30 rows" in page and page.split("</table>")[0].count("<tr") == 21
    backbone = RewardOutput(hidden_state=np.zeros((2, 8), np.float32))
    assert "hidden_state[2,8]" in repr(backbone)
    well_formed(backbone._repr_html_())


def test_torch_outputs_display(rm):
    torch = pytest.importorskip("torch", reason="torch is in the test extra")
    ids = rm.encode(example_conversations()[:1])[0]
    out = rm.model(torch.tensor(ids)[None])
    assert isinstance(out.score, torch.Tensor)
    page = out._repr_html_()
    well_formed(page)
    assert "coefficient" in page  # the transform matrix came along


def test_big_batch_is_cut(rm):
    convs = [_conv(f"prompt {i}", f"answer {i}") for i in range(45)]
    out = rm.score_batch(convs)
    page = out._repr_html_()
    well_formed(page)
    assert "Showing 20 of 45 rows" in page
    assert page.split("</table>")[0].count("<tr") == 21


# =========================================================================== explain


def test_explain_is_the_list_it_was(rm):
    conv = example_conversations()[1]
    e = rm.explain(conv)
    plain = [(n, c) for n, c in e]
    assert isinstance(e, list) and isinstance(e, Explanation) and e == plain and plain == e
    assert repr(e) == repr(plain)
    assert json.loads(json.dumps(e)) == [list(t) for t in plain]
    back = pickle.loads(pickle.dumps(e))
    assert back == plain and back.score == e.score
    out = rm.score_batch([conv])
    assert e.score == pytest.approx(float(out.score[0]))
    page = e._repr_html_()
    c = well_formed(page)
    assert page.split("<tbody>")[1].count("<tr") == 3
    assert "reward × coefficient" in "".join(c.text)
    # the model's explain: one per row, equal to the lists of tuples
    batch = rm.score_batch(example_conversations() + [_conv(EVIL, EVIL)])
    rows = rm.model.explain(batch, k=2)
    assert len(rows) == 4 and all(len(r) == 2 for r in rows)
    assert rows == [[(n, c) for n, c in r] for r in rows]
    page = rows._repr_html_()
    well_formed(page)
    assert "<script>" not in page
    # a plain dict of arrays (no display context) still explains
    assert rm.model.explain({"gating_output": batch.gating_output}) == rm.model.explain(batch)


# =========================================================================== reports


def _report(prior=None):
    subsets = [s for s in rb.EXAMPLE_COUNTS for _ in range(2)] + ["<odd & subset>"] * 2
    rng = np.random.default_rng(0)
    c = rng.normal(size=len(subsets))
    r = rng.normal(size=len(subsets))
    return rb.evaluate_scores(subsets, c, r, prior)


def test_rewardbench_report_is_a_dict_with_a_table():
    res = _report(prior=70.0)
    assert isinstance(res, dict) and isinstance(res, Report)
    assert json.loads(json.dumps(res)) == json.loads(json.dumps(dict(res)))
    text = repr(res)
    assert text.startswith("RewardBench: Score ") and "Chat Hard" in text and len(text.splitlines()) <= 3
    page = res._repr_html_()
    c = well_formed(page)
    assert "&lt;odd &amp; subset&gt;" in page and "<odd" not in page
    body = "".join(c.text)
    for sub in rb.EXAMPLE_COUNTS:
        assert sub in body
    # read back from its JSON file, the same view
    again = as_report(json.loads(json.dumps(res)))
    assert type(again) is rb.RewardBenchReport and again.view() == res.view()


def test_generic_report_reads_rewardbench2_shaped_results():
    res = {"subsets": {"Factuality": 61.5, "Ties": None, "Math": 70.0}, "score": 65.75,
           "counts": {"Factuality": 475, "Ties": 102, "Math": 183}, "notes": ["<only three>"], "ties": None}
    rep = as_report(res)
    v = rep.view()
    assert v.title == "RewardBench 2" and repr(rep).startswith("RewardBench 2: Score 65.8 (3 subsets)")
    assert v.headline == [("Score", 65.75)] and [s for _, s, _ in v.subsets()] == ["Factuality", "Ties", "Math"]
    page = rep._repr_html_()
    well_formed(page)
    assert "n/a" in page and "&lt;only three&gt;" in page
    with pytest.raises(TypeError):
        as_report({"score": 1})


# =========================================================================== plots


@pytest.fixture
def plot():
    return pytest.importorskip("armorm.plot", reason="matplotlib is in the test extra (and the plot extra)")


def _bars(ax) -> int:
    from matplotlib.container import BarContainer
    return sum(len(c) for c in ax.containers if isinstance(c, BarContainer))


def test_objectives_plot(plot, rm):
    from matplotlib.figure import Figure
    out = rm.score_batch(example_conversations())
    fig = plot.objectives(out)
    assert isinstance(fig, Figure)
    ax_r, ax_c = fig.axes
    assert _bars(ax_r) == 19 * 3 and _bars(ax_c) == 19 * 3
    assert [t.get_text() for t in ax_r.get_yticklabels()] == armorm.ATTRIBUTES
    bold = {t.get_text() for t in ax_r.get_yticklabels() if t.get_fontweight() == "bold"}
    assert {n for e in rm.model.explain(out) for n, _ in e} == bold
    assert ax_c.get_xlabel() == "coefficient"
    fig = plot.objectives(out, rows=1)
    assert _bars(fig.axes[0]) == 19
    np.testing.assert_allclose([p.get_width() for p in fig.axes[0].patches], out.rewards[1])
    png = fig._repr_png_()
    assert png.startswith(b"\x89PNG")
    with pytest.raises(ValueError, match="labels"):
        plot.objectives(out, labels=["a"])
    with pytest.raises(IndexError):
        plot.objectives(out, rows=[5])
    with pytest.raises(ValueError, match="rewards"):
        plot.objectives(RewardOutput(score=np.zeros(2, np.float32)))


def test_ranking_plot(plot, rm):
    resp = ["a", "b b b", "c c", "d", "<script>e</script>"]
    out = rm.score_batch([_conv("one prompt", r) for r in resp])
    fig = plot.ranking(out)
    (ax,) = fig.axes
    assert _bars(ax) == 5
    widths = [p.get_width() for p in ax.patches]
    assert widths == sorted(out.score.tolist(), reverse=True)
    assert ax.patches[0].get_facecolor() != ax.patches[1].get_facecolor()  # the best stands out
    assert "one prompt" in ax.get_title(loc="left")
    # plain scores and the pipeline's {"score": ...} results work too
    assert _bars(plot.ranking([0.1, 0.3, -0.2]).axes[0]) == 3
    assert _bars(plot.ranking([rm(_conv("p", r)) for r in resp[:2]]).axes[0]) == 2
    with pytest.raises(ValueError, match="labels"):
        plot.ranking([0.1, 0.2], labels=["x"])


def test_rewardbench_plot_and_save(plot, tmp_path):
    res = _report(prior=70.0)
    fig = plot.rewardbench(res)
    (ax,) = fig.axes
    assert _bars(ax) == len(res["subsets"])
    assert _bars(plot.rewardbench(json.loads(json.dumps(res))).axes[0]) == len(res["subsets"])
    target = tmp_path / "rb.png"
    plot.save(fig, target)
    assert target.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == ["rb.png"]  # no temporary file left
    with pytest.raises(ValueError, match="format"):
        plot.save(fig, tmp_path / "rb.nope")
    with pytest.raises(ValueError, match="does not exist"):
        plot.save(fig, tmp_path / "missing" / "rb.png")


def test_cli_eval_rewardbench_plot(tmp_path):
    rows = [{"subset": s, "chosen_score": float(i % 3), "rejected_score": 1.0}
            for i, s in enumerate(s for s in rb.EXAMPLE_COUNTS for _ in range(3))]
    scores = tmp_path / "scores.jsonl"
    scores.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "armorm", "eval-rewardbench", "--scores", str(scores), *args],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
    p = run("--plot", "rb.png")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "rb.png").read_bytes().startswith(b"\x89PNG")
    p = run("--plot", "rb.bmpx")
    assert p.returncode == 2 and p.stderr.startswith("armorm: error: rb.bmpx: cannot write a figure")
    assert not (tmp_path / "rb.bmpx").exists()
