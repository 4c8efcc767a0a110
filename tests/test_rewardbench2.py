"""RewardBench 2: the official scoring rules against hand-computed cases, the input paths
(scores file, model + dataset, prepared embeddings) agreeing on a tiny random ArmoRM with
the real Llama-3 tokenizer, the harness's two-BOS tokenization against transformers, and
malformed inputs named by row.
"""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from armorm import ArmoRM, ArmoRMPipeline, cli
from armorm.data import DatasetError
from armorm.train import rewardbench2 as rb2
from armorm.tokenizer import format_conversations
from armorm.train.rewardbench2 import ScoredPrompts, best_of_n_result, ties_prompt_stats, ties_score
from checkpoints import make_armorm

NAN = float("nan")
INF = float("inf")


def prompts(rows):
    """ScoredPrompts from (id, subset, num_correct, scores) tuples."""
    return ScoredPrompts([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows],
                         [np.asarray(r[3], dtype=np.float64) for r in rows], [f"prompt {i}" for i in range(len(rows))])


# ----------------------------------------------------------------------------- best of 4


@pytest.mark.parametrize("scores, want", [
    ([3, 1, 2, 0], 1.0),
    ([1, 3, 2, 0], 0.0),
    ([3, 3, 1, 0], 0.5),          # a tie at the maximum: 1 / (number of completions at the maximum)
    ([3, 1, 3, 3], 1 / 3),
    ([3, 3, 3, 3], 0.25),
    ([2, 3, 3, 1], 0.0),          # tie at the maximum without the correct one
    ([3, 3, 1, 4], 0.0),
    ([3, NAN, 1, 0], 0.0),        # a NaN anywhere: the maximum is NaN and equals nothing
    ([NAN, 1, 2, 0], 0.0),
    ([INF, 1, 2, 0], 1.0),
    ([INF, INF, 2, 0], 0.5),
    ([-1.5, -2.0, -1.6, -3.0], 1.0),
])
def test_best_of_n_rule(scores, want):
    assert best_of_n_result(scores) == want


# ----------------------------------------------------------------------------- Ties


def test_ties_prompt_stats():
    assert ties_prompt_stats([5, 4.5, 4, 1], 3) == (True, 1.0, 3.0)
    assert ties_prompt_stats([5, 6, 1], 1) == (False, None, -1.0)     # one correct: no spread
    assert ties_prompt_stats([2, 2, 2], 2) == (False, 0.0, 0.0)        # gap 0 is not accurate
    # NaN: Python's max/min over the scores in order, as the harness
    acc, spread, gap = ties_prompt_stats([NAN, 5, 1], 2)               # min([nan, 5]) is nan
    assert acc is False and math.isnan(spread) and math.isnan(gap)
    assert ties_prompt_stats([5, NAN, 1], 2) == (True, 0.0, 4.0)       # min([5, nan]) is 5, max 5
    acc, spread, gap = ties_prompt_stats([5, 4, NAN, 1], 2)            # max([nan, 1]) is nan
    assert acc is False and spread == 1.0 and math.isnan(gap)


def test_ties_score_hand_computed():
    ids = ["ref:0", "tied:0", "ref:1", "tied:1", "ref:2", "tied:3"]
    nc = [1, 3, 1, 2, 1, 1]
    scores = [[4, 1, 2],           # ref:0  accurate, gap 2
              [5, 4.5, 4, 1],      # tied:0 accurate, spread 1, gap 3
              [1, 2, 0],           # ref:1  wrong, gap -1
              [3, 2.5, 2],         # tied:1 accurate, spread 0.5, gap 0.5
              [2, 1],              # ref:2  accurate, no tied partner
              [1, 2]]              # tied:3 one correct, wrong, no ref partner (allowed)
    t = ties_score(ids, nc, scores)
    assert t["ref_accuracy"] == pytest.approx(2 / 3) and t["tied_accuracy"] == pytest.approx(2 / 3)
    assert t["shared_ids"] == 2 and t["ref_prompts"] == 3 and t["tied_prompts"] == 3
    # shared k = 0, 1: tied gap 3 > spread 1 yes, 0.5 > 0.5 no; min(ref, tied) gap 2 > 1 yes, -1 > 0.5 no
    assert t["correctness_preferred"] == 0.5 and t["correctness_preferred_hard"] == 0.5
    margin = (math.tanh(2 / 1 - 1) + math.tanh(-1 / 0.5 - 1)) / 2
    assert t["margin_score"] == pytest.approx(margin)
    want = 0.3 * 2 / 3 + 0.3 * 2 / 3 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * margin
    assert t["score"] == pytest.approx(want) and round(want, 6) == 0.598833
    # the per-prompt stats, in input order
    assert t["per_prompt"][1] == (True, 1.0, 3.0) and t["per_prompt"][5] == (False, None, -1.0)


def test_ties_zero_spread_and_zero_over_zero():
    # tied:0 correct scores equal: spread 0, gap 1 -> ratio inf, tanh 1; tied:1 gap 0 too -> 0/0 counts 0
    t = ties_score(["ref:0", "tied:0", "ref:1", "tied:1"], [1, 2, 1, 2],
                   [[3, 0], [2, 2, 1], [3, 0], [2, 2, 2]])
    assert t["correctness_preferred"] == 0.5            # 1 > 0 yes, 0 > 0 no
    assert t["correctness_preferred_hard"] == 0.5
    assert t["margin_score"] == 0.5                      # (tanh(inf) + 0) / 2: the mean is over every shared k
    assert t["score"] == pytest.approx(0.3 * 0.5 + 0.3 * 1.0 + 0.2 * 0.5 + 0.2 * 0.5 + 0.01 * 0.5)


def test_ties_nan_scores():
    t = ties_score(["ref:0", "tied:0"], [1, 2], [[NAN, 1], [3, 2, 1]])
    # ref: min([nan]) = nan -> not accurate; gap nan: min(nan, 1) is nan in numpy -> comparisons false, margin 0
    assert t["ref_accuracy"] == 0.0 and t["tied_accuracy"] == 1.0
    assert t["correctness_preferred"] == 0.0             # tied gap 1 > spread 1: no
    assert t["correctness_preferred_hard"] == 0.0 and t["margin_score"] == 0.0
    assert t["score"] == pytest.approx(0.3)


def test_ties_single_correct_tied_prompt_with_partner_is_an_error():
    with pytest.raises(ValueError, match=r"p1: tied:4 has a single correct completion.*ref:4"):
        ties_score(["ref:4", "tied:4"], [1, 1], [[2, 1], [2, 1]], wheres=["p0", "p1"])


def test_ties_without_pairs_is_nan_as_official():
    t = ties_score(["ref:0", "ref:1"], [1, 1], [[2, 1], [0, 1]])
    assert t["ref_accuracy"] == 0.5 and t["tied_accuracy"] == 0.0
    assert math.isnan(t["correctness_preferred"]) and math.isnan(t["score"])
    res = rb2.evaluate(prompts([("ref:0", "Ties", 1, [2, 1]), ("ref:1", "Ties", 1, [0, 1]),
                                ("0", "Math", 1, [1, 0])]))
    assert res["subsets"]["Ties"] is None and res["score"] is None
    assert any("no k has both ref:k and tied:k" in n for n in res["notes"])
    assert "nan" in rb2.format_table(res)


@pytest.mark.parametrize("bad, match", [
    (["ref0"], "must be 'ref:<k>' or 'tied:<k>'"),
    (["other:3"], "must be 'ref:<k>' or 'tied:<k>'"),
    (["ref:x"], "must be 'ref:<k>' or 'tied:<k>'"),
    (["ref:1:2"], "must be 'ref:<k>' or 'tied:<k>'"),
    (["ref:1", "ref:01"], "ref:1 appears twice"),    # the harness keys prompts by the integer
])
def test_ties_bad_ids(bad, match):
    with pytest.raises(ValueError, match=match):
        ties_score(bad, [1] * len(bad), [[1, 0]] * len(bad))


# ----------------------------------------------------------------------------- evaluate


def test_evaluate_six_subsets_and_final_mean(tmp_path):
    rows = [("0", "Factuality", 1, [3, 1, 2, 0]), ("1", "Factuality", 1, [3, 3, 1, 0]),   # 1, 0.5
            ("2", "Precise IF", 1, [0, 1, 2, 3]),                                        # 0
            ("3", "Math", 1, [5, 5, 5, 1]), ("4", "Math", 1, [9, 1, 1, 1]),               # 1/3, 1
            ("5", "Safety", 1, [1, 0, 0, 0]),                                            # 1
            ("6", "Focus", 1, [NAN, 0, 0, 0]), ("7", "Focus", 1, [1, 0, NAN, 0]),         # 0, 0
            ("ref:0", "Ties", 1, [4, 1, 2]), ("tied:0", "Ties", 3, [5, 4.5, 4, 1])]
    res = rb2.evaluate(prompts(rows))
    ties = 0.3 + 0.3 + 0.2 + 0.2 + 0.01 * math.tanh(2 / 1 - 1)
    want = {"Factuality": 75.0, "Precise IF": 0.0, "Math": 100 * (1 / 3 + 1) / 2, "Safety": 100.0, "Focus": 0.0,
            "Ties": 100 * ties}
    assert list(res["subsets"]) == list(want)             # the leaderboard's order
    for k, v in want.items():
        assert res["subsets"][k] == pytest.approx(v)
    assert res["score"] == pytest.approx(sum(want.values()) / 6)   # unweighted mean of the six
    assert res["counts"] == {"Factuality": 2, "Precise IF": 1, "Math": 2, "Safety": 1, "Focus": 2, "Ties": 2}
    assert res["ties"]["shared_ids"] == 1
    p = {r["id"]: r for r in res["prompts"]}
    assert p["1"]["result"] == 0.5 and p["3"]["result"] == pytest.approx(1 / 3)
    assert p["tied:0"]["result"] is None and p["tied:0"]["accurate"] is True
    assert p["tied:0"]["different_correct_margin"] == 1.0 and p["ref:0"]["different_correct_margin"] is None
    assert not any("mean of the" in n for n in res["notes"])    # all six subsets present
    table = rb2.format_table(res)
    assert "Precise IF" in table.splitlines()[2] and f"{res['score']:.1f}" in table.splitlines()[7]
    out = tmp_path / "r.json"
    rb2.write_json(out, res)
    got = json.loads(out.read_text())
    assert got["subsets"]["Math"] == pytest.approx(want["Math"]) and got["score"] == pytest.approx(res["score"])
    assert [r["id"] for r in got["prompts"]] == [r[0] for r in rows]
    assert got["prompts"][6]["scores"][0] is None          # NaN written as null (strict JSON)


def test_evaluate_partial_subsets_note():
    res = rb2.evaluate(prompts([("0", "Math", 1, [1, 0]), ("1", "custom", 1, [0, 1])]))
    assert res["score"] == pytest.approx(50.0)
    assert any("mean of the 2 subset(s) present" in n for n in res["notes"])
    assert any("Math: 1 prompts (the official test split has 183)" in n for n in res["notes"])
    assert list(res["subsets"]) == ["Math", "custom"]


# ----------------------------------------------------------------------------- scores files


def write_scores(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def test_scores_file_and_cli(tmp_path, capsys):
    rows = [{"id": "0", "subset": "Math", "num_correct": 1, "scores": [2.0, 1.0, 0.5, 2.0]},
            {"id": "ref:0", "subset": "Ties", "num_correct": 1, "scores": [3.0, 1.0]},
            {"id": "tied:0", "subset": "Ties", "num_correct": 2, "scores": [3.0, 2.0, 1.0]}]
    path = write_scores(tmp_path / "s.jsonl", rows)
    with open(path, "a") as f:
        f.write('\n{"id": 7, "subset": "Math", "num_correct": 1, "scores": [NaN, 1]}\n')  # int id, NaN
    sp = rb2.read_scores_file(path)
    assert sp.ids == ["0", "ref:0", "tied:0", "7"] and sp.wheres[3] == f"{path}:5 (id '7')"
    assert math.isnan(sp.scores[3][0])
    out = tmp_path / "res.json"
    assert cli.main(["eval-rewardbench2", "--scores", str(path), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].split() == ["subset", "prompts", "score"]
    res = json.loads(out.read_text())
    assert res["subsets"]["Math"] == pytest.approx(25.0)      # 0.5 and 0 (NaN)
    # both accurate; tied:0 gap 1 is not > its spread 1 (nor is min(2, 1)); tanh(1 / 1 - 1) = 0
    ties = 0.3 + 0.3
    assert res["subsets"]["Ties"] == pytest.approx(100 * ties)
    assert res["score"] == pytest.approx((25.0 + 100 * ties) / 2)
    # the report shows itself as a table in Jupyter, and --plot draws its subsets
    report = rb2.evaluate(rb2.read_scores_file(path))
    assert "RewardBench 2" in report._repr_html_() and "<table" in report._repr_html_()
    pytest.importorskip("matplotlib")
    png = tmp_path / "rb2.png"
    assert cli.main(["eval-rewardbench2", "--scores", str(path), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    # the harness's own saved scores: one JSON object of columns, [score] lists for some models
    cols = {"id": ["0", "1"], "subset": ["Math", "Math"], "num_correct": [1, 1],
            "scores": [[[2.0], [1.0]], [1.0, 3.0]], "text": [["a", "b"], ["c", "d"]], "results": [1, 0]}
    (tmp_path / "h.json").write_text(json.dumps(cols, indent=4))
    sp = rb2.read_scores_file(tmp_path / "h.json")
    assert [list(s) for s in sp.scores] == [[2.0, 1.0], [1.0, 3.0]]


@pytest.mark.parametrize("line, match", [
    ('{"id": "0", "subset": "Math", "num_correct": 1}', r":1: no 'scores'"),
    ('{"id": "0", "subset": "Math", "num_correct": 0, "scores": [1, 2]}', r":1 \(id '0'\): num_correct 0 is out of range"),
    ('{"id": "0", "subset": "Math", "num_correct": 2, "scores": [1, 2]}', r"num_correct 2 is out of range"),
    ('{"id": "0", "subset": "Math", "num_correct": 1, "scores": [1]}', r"1 completion score\(s\)"),
    ('{"id": "0", "subset": "Math", "num_correct": 1, "scores": "1 2"}', r"'scores' must be a list"),
    ('{"id": "0", "subset": "Math", "num_correct": 1, "scores": [1, null]}', r"scores\[1\] must be a number"),
    ('{"id": "0", "subset": "Math", "num_correct": 1.0, "scores": [1, 2]}', r"num_correct must be an integer"),
    ('{"id": "0", "subset": "", "num_correct": 1, "scores": [1, 2]}', r"subset must be a non-empty string"),
    ('{"id": "x", "subset": "Ties", "num_correct": 1, "scores": [1, 2]}', r"must be 'ref:<k>' or 'tied:<k>'"),
    ('{"id": "0", "subset": "Math"', r":1: not valid JSON"),
    ('[1, 2]', r":1: expected an object"),
])
def test_scores_file_errors(tmp_path, capsys, line, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(ValueError, match=match):
        rb2.read_scores_file(path)
    assert cli.main(["eval-rewardbench2", "--scores", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("armorm: error: ") and str(path) in err[0]


def test_scores_file_duplicate_id(tmp_path):
    # outside Ties an id is a label (the harness scores both rows); a Ties id is the key of its prompt
    path = write_scores(tmp_path / "d.jsonl", [{"id": "3", "subset": "Math", "num_correct": 1, "scores": [1, 0]}] * 2)
    assert len(rb2.read_scores_file(path)) == 2
    path = write_scores(tmp_path / "t.jsonl", [{"id": "tied:3", "subset": "Ties", "num_correct": 1,
                                                "scores": [1, 0]}] * 2)
    with pytest.raises(ValueError, match=r"t.jsonl:2 \(id 'tied:3'\): Ties prompt tied:3 appears twice "
                                         r"\(also .*t.jsonl:1"):
        rb2.read_scores_file(path)


# ----------------------------------------------------------------------------- a RewardBench-2-shaped dataset

WORDS = ("the a cat dog runs quickly answer question because of this and that why how fine thanks "
         "hello world python code list sort red green blue seven".split())
FIVE = ["Factuality", "Precise IF", "Math", "Safety", "Focus"]


def rb2_records(seed=0, per_subset=3, ties_pairs=3):
    """Rows shaped like allenai/reward-bench-2's test split: best-of-4 rows in five subsets (integer-string
    ids), Ties rows ref:k (one correct answer) and tied:k (several), plus a ref without its tied partner."""
    rng = np.random.default_rng(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS, int(rng.integers(lo, hi))))

    recs, n = [], 0
    for s in FIVE:
        for _ in range(per_subset):
            comps = [text(1, 20) for _ in range(4)]
            recs.append({"id": str(n), "prompt": text(3, 10), "chosen": comps[:1], "rejected": comps[1:],
                         "num_correct": 1, "num_incorrect": 3, "total_completions": 4,
                         "models": ["m"] * 4, "subset": s, "additional_metadata": {"category": s}})
            n += 1
    for k in range(ties_pairs):
        prompt = text(3, 8)
        for kind, nc, ni in (("ref", 1, 2), ("tied", 2 + k, 3)):
            comps = [text(1, 6) for _ in range(nc + ni)]
            recs.append({"id": f"{kind}:{k}", "prompt": prompt if kind == "tied" else prompt + " (one answer)",
                         "chosen": comps[:nc], "rejected": comps[nc:], "num_correct": nc, "num_incorrect": ni,
                         "total_completions": nc + ni, "subset": "Ties"})
    recs.append({"id": f"ref:{ties_pairs}", "prompt": text(3, 8), "chosen": ["blue"], "rejected": ["seven", "x"],
                 "num_correct": 1, "num_incorrect": 2, "total_completions": 3, "subset": "Ties"})
    return recs


def write_jsonl(path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory, llama3_dir):
    d = tmp_path_factory.mktemp("rb2") / "tiny-armorm"
    make_armorm(d, vocab=128257, pad_token_id=128256, hidden=24, heads=4, kv_heads=2, inter=40, layers=2,
                gating_hidden=16, num_objectives=5, seed=3)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(llama3_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rb2data") / "rb2.jsonl", rb2_records())


def conversations(rec):
    return [[{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": c}]
            for c in rec["chosen"] + rec["rejected"]]


def test_model_scores_each_completion_alone(tiny_rm, dataset):
    recs = rb2_records()
    sp = rb2.scores_from_model(str(tiny_rm), str(dataset), torch_dtype="float32", num_threads=1)
    assert sp.ids == [r["id"] for r in recs] and sp.subsets == [r["subset"] for r in recs]
    assert sp.num_correct == [r["num_correct"] for r in recs]
    assert sp.wheres[0] == "row 0 (rb2.jsonl line 1) (id '0')"
    with ArmoRM.from_pretrained(tiny_rm, torch_dtype="float32", num_threads=1) as model:
        pipe = ArmoRMPipeline(model=model)
        for rec, got in zip(recs, sp.scores):
            alone = [pipe(c)["score"] for c in conversations(rec)]   # the model card's way, one at a time
            assert got.tolist() == alone
    assert len(set(np.concatenate(sp.scores).tolist())) == sum(len(s) for s in sp.scores)  # no accidental ties


def test_three_entry_points_agree(tiny_rm, dataset, tmp_path, capsys):
    out_model = tmp_path / "model.json"
    assert cli.main(["eval-rewardbench2", "--model", str(tiny_rm), "--dataset", str(dataset), "--dtype", "float32",
                     "--threads", "1", "--no-progress", "--output", str(out_model)]) == 0
    table = capsys.readouterr().out
    res = json.loads(out_model.read_text())
    assert list(res["subsets"]) == FIVE + ["Ties"]
    score_line = [ln for ln in table.splitlines() if ln.startswith("Score")]
    assert score_line and score_line[0].split()[-1] == f"{res['score']:.1f}"
    assert res["score"] == pytest.approx(sum(res["subsets"].values()) / 6)
    assert res["counts"]["Ties"] == 7 and res["ties"]["shared_ids"] == 3
    # the scores file the model run implies gives the same numbers
    scores = write_scores(tmp_path / "scores.jsonl", [{k: r[k] for k in ("id", "subset", "num_correct", "scores")}
                                                      for r in res["prompts"]])
    out_scores = tmp_path / "scores.json"
    assert cli.main(["eval-rewardbench2", "--scores", str(scores), "--output", str(out_scores)]) == 0
    res2 = json.loads(out_scores.read_text())
    assert res2["subsets"] == res["subsets"] and res2["score"] == res["score"]
    assert res2["prompts"] == res["prompts"]


def test_progress_over_prompts(tiny_rm, dataset):
    seen = []
    sp = rb2.scores_from_model(str(tiny_rm), str(dataset), torch_dtype="float32", num_threads=1, batch_tokens=64,
                               progress=lambda done, total: seen.append((done, total)))
    n = len(sp)
    assert seen[-1] == (n, n) and len(seen) > 1 and all(a < b for (a, _), (b, _) in zip(seen, seen[1:]))


# ----------------------------------------------------------------------------- tokenization


def test_harness_tokenization_gives_two_bos_as_transformers(tiny_rm, llama3_dir):
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(llama3_dir))
    hf.pad_token_id = hf.eos_token_id   # the harness does this for tokenizers without a pad token
    rec = rb2_records()[0]
    convs = conversations(rec)
    texts = [hf.apply_chat_template(c, tokenize=False) for c in convs]
    assert all(t.startswith("<|begin_of_text|>") for t in texts)
    want = hf(texts, truncation=True, max_length=2048)["input_ids"]          # the harness's call, unpadded
    with ArmoRM.from_pretrained(tiny_rm, torch_dtype="float32", num_threads=1) as model:
        harness = ArmoRMPipeline(model=model, max_length=2048, harness_tokenization=True).encode(convs)
        card = ArmoRMPipeline(model=model, max_length=2048).encode(convs)
        assert [s.tolist() for s in harness] == want
        assert format_conversations(hf, convs, retokenize_text=True) == want   # a transformers tokenizer too
        assert all(s[:2].tolist() == [128000, 128000] and s[2] != 128000 for s in harness)
        single = [hf.apply_chat_template(c, tokenize=True, return_dict=False) for c in convs]
        single = [s["input_ids"] if hasattr(s, "keys") else s for s in single]
        assert [s.tolist() for s in card] == single and all(s[0] == 128000 != s[1] for s in card)
        assert [h[1:].tolist() for h in harness] == [c.tolist() for c in card]
        # truncation on the right to max_length, as the harness's tokenizer call (the BOS counts)
        long = [[{"role": "user", "content": "why"}, {"role": "assistant", "content": "cat dog " * 40}]]
        text = hf.apply_chat_template(long[0], tokenize=False)
        got = ArmoRMPipeline(model=model, max_length=30, harness_tokenization=True).encode(long)[0]
        assert got.tolist() == hf([text], truncation=True, max_length=30)["input_ids"][0]


def test_harness_tokenization_changes_the_scores(tiny_rm, dataset):
    a = rb2.scores_from_model(str(tiny_rm), str(dataset), torch_dtype="float32", num_threads=1)
    b = rb2.scores_from_model(str(tiny_rm), str(dataset), torch_dtype="float32", num_threads=1,
                              harness_tokenization=True)
    diff = np.abs(np.concatenate(a.scores) - np.concatenate(b.scores))
    assert diff.max() > 1e-4      # the extra BOS is a real input token


def test_truncation_that_cuts_the_header_names_the_row(tiny_rm, tmp_path, capsys):
    recs = rb2_records()
    recs[2]["prompt"] = "word " * 80
    path = write_jsonl(tmp_path / "long.jsonl", recs)
    with pytest.raises(DatasetError, match=r"row 2 \(long.jsonl line 3\) \(id '2'\), completion 0 \(chosen 0\): "
                                           r"truncation to max_length=40"):
        rb2.scores_from_model(str(tiny_rm), str(path), torch_dtype="float32", num_threads=1, max_length=40)
    # without truncation it scores (the tiny model allows 2048 positions)
    sp = rb2.scores_from_model(str(tiny_rm), str(path), torch_dtype="float32", num_threads=1, truncation=False)
    assert len(sp) == len(recs)
    assert cli.main(["eval-rewardbench2", "--model", str(tiny_rm), "--dataset", str(path), "--max-length", "40",
                     "--dtype", "float32", "--threads", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "id '2'" in err[0]


# ----------------------------------------------------------------------------- malformed datasets


def _mutate(i, **kw):
    recs = rb2_records()
    for k, v in kw.items():
        if v is KeyError:
            del recs[i][k]
        else:
            recs[i][k] = v
    return recs


@pytest.mark.parametrize("recs, match", [
    (_mutate(4, subset=KeyError), r"row 4 \(bad.jsonl line 5\): no 'subset'"),
    (_mutate(4, chosen=KeyError, num_correct=KeyError), r"line 5\): no 'chosen', 'num_correct'"),
    (_mutate(4, num_correct=0), r"line 5\) \(id '4'\): num_correct 0 is out of range: with 4 completions it must be 1..3"),
    (_mutate(4, num_correct=4), r"num_correct 4 is out of range"),
    (_mutate(4, num_correct=2), r"\(id '4'\): num_correct is 2 but the row has 1 chosen"),
    (_mutate(4, num_correct="1"), r"\(id '4'\): num_correct must be an integer"),
    (_mutate(4, chosen=[]), r"\(id '4'\): 'chosen' is an empty list"),
    (_mutate(4, rejected=[]), r"\(id '4'\): 'rejected' is an empty list"),
    (_mutate(4, chosen="just a string"), r"\(id '4'\): 'chosen' must be a list of completion strings, got str"),
    (_mutate(4, rejected=["a", 3, "b"]), r"\(id '4'\): rejected\[1\] must be a string"),
    (_mutate(4, total_completions=5), r"\(id '4'\): total_completions is 5 but the row has 1 chosen \+ 3 rejected"),
    (_mutate(4, prompt=["a"]), r"\(id '4'\): 'prompt' must be a string"),
    (_mutate(4, id=None), r"line 5\): id must be a non-empty string"),
    (_mutate(16, id="ref:1"), r"line 18\) \(id 'ref:1'\): Ties prompt ref:1 appears twice \(also row 16"),
    (_mutate(16, id="ref-0"), r"line 17\) \(id 'ref-0'\): a Ties prompt's id must be 'ref:<k>'"),
])
def test_malformed_dataset_rows(tmp_path, capsys, recs, match):
    path = write_jsonl(tmp_path / "bad.jsonl", recs)
    with pytest.raises(DatasetError, match=match):
        rb2.read_dataset(str(path))
    # the CLI names the row on one line and exits 2, before loading any model
    assert cli.main(["eval-rewardbench2", "--model", str(tmp_path / "no-model"), "--dataset", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("armorm: error: row ")


def test_parquet_dataset_and_missing_columns(tmp_path, tiny_rm):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    recs = rb2_records()
    for r in recs:
        r.pop("additional_metadata", None)
        r.pop("models", None)
    d = tmp_path / "reward-bench-2" / "data"
    d.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(recs), d / "test-00000-of-00001.parquet")
    rows = rb2.read_dataset(str(tmp_path / "reward-bench-2"))     # a directory, split "test"
    assert [r.id for r in rows] == [r["id"] for r in recs] and rows[-2].completions == recs[-2]["chosen"] + \
        recs[-2]["rejected"]
    assert rows[0].where == "row 0 (id '0')"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "total_completions"} for r in recs]),
                   tmp_path / "nocol.parquet")
    with pytest.raises(DatasetError, match=r"nocol.parquet: no column\(s\) total_completions"):
        rb2.read_dataset(str(tmp_path / "nocol.parquet"))


# ----------------------------------------------------------------------------- prepared embeddings


@pytest.fixture(scope="module")
def head_files(tiny_rm, tmp_path_factory):
    """The tiny ArmoRM's head as training writes it: regression and gating files."""
    from armorm.safetensors_io import load_file, save_file
    from armorm.train.stage2 import GatingConfig, save_gating
    t = load_file(tiny_rm / "model.safetensors", as_float32=True)
    d = tmp_path_factory.mktemp("rb2head")
    save_file({"regression_layer.weight": t["regression_layer.weight"]}, d / "regression.safetensors")
    params = {k: v for k, v in t.items() if k.startswith("gating.")}
    save_gating(d / "gating.safetensors", params, t["reward_transform_matrix"],
                GatingConfig(hidden_dim=16, n_hidden=3, temperature=10.0))
    return d / "regression.safetensors", d / "gating.safetensors"


def test_embeddings_entry_point_matches_the_model(tiny_rm, dataset, head_files, tmp_path, capsys):
    from armorm.safetensors_io import SafetensorsFile
    reg, gate = head_files
    out = tmp_path / "emb"
    assert cli.main(["prepare-rewardbench2", "--model", str(tiny_rm), "--dataset", str(dataset), "--output", str(out),
                     "--embeddings-dtype", "float32", "--dtype", "float32", "--threads", "1", "--no-progress"]) == 0
    path = capsys.readouterr().out.strip()
    assert path == str(out / "rb2-00001-of-00001.safetensors")
    recs = rb2_records()
    f = SafetensorsFile(path)
    n = sum(len(r["chosen"]) + len(r["rejected"]) for r in recs)
    assert f.info("embeddings").shape == (n, 24) and f.info("prompt_embeddings").shape == (len(recs), 24)
    assert f.read("completions").tolist() == [r["total_completions"] for r in recs]
    assert f.read("num_correct").tolist() == [r["num_correct"] for r in recs]
    assert json.loads(f.metadata["ids"]) == [r["id"] for r in recs]
    assert json.loads(f.metadata["subsets"]) == [r["subset"] for r in recs]
    assert float(f.metadata["prompt_mismatch"]) < 1e-5       # every completion of a prompt: the same prefix
    # the parts give the model's scores, and the same evaluation
    emb = rb2.scores_from_embeddings(str(out / "*.safetensors"), reg, gate)
    model = rb2.scores_from_model(str(tiny_rm), str(dataset), torch_dtype="float32", num_threads=1)
    assert emb.ids == model.ids and emb.subsets == model.subsets and emb.num_correct == model.num_correct
    np.testing.assert_allclose(np.concatenate(emb.scores), np.concatenate(model.scores), rtol=1e-4, atol=1e-5)
    assert cli.main(["eval-rewardbench2", "--embeddings", str(out), "--regression", str(reg), "--gating", str(gate),
                     "--output", str(tmp_path / "e.json")]) == 0
    a = json.loads((tmp_path / "e.json").read_text())
    b = rb2.evaluate(model)
    assert [p["result"] for p in a["prompts"]] == [p["result"] for p in b["prompts"]]
    assert [p.get("accurate") for p in a["prompts"]] == [p.get("accurate") for p in b["prompts"]]
    for k in b["subsets"]:
        assert a["subsets"][k] == pytest.approx(b["subsets"][k], abs=1e-6)
    assert a["score"] == pytest.approx(b["score"], abs=1e-6)
    # an existing output is kept unless --overwrite
    args = ["prepare-rewardbench2", "--model", str(tiny_rm), "--dataset", str(dataset), "--output", str(out),
            "--dtype", "float32", "--threads", "1", "--no-progress"]
    assert cli.main(args) == 2
    assert "exists" in capsys.readouterr().err
    assert cli.main(args + ["--overwrite"]) == 0
    assert SafetensorsFile(path).info("embeddings").dtype == "BF16"
    # wrong files are named
    with pytest.raises(ValueError, match="not a prepare-rewardbench2 file"):
        rb2.scores_from_embeddings(str(reg), reg, gate)
    assert cli.main(["eval-rewardbench2", "--embeddings", str(out), "--regression", str(reg)]) == 2


# ----------------------------------------------------------------------------- preparation on the shared loop


def _prepare(model, data, out, **kw):
    kw = dict(dict(embeddings_dtype="float32", torch_dtype="float32", num_threads=1, quiet=True), **kw)
    return rb2.prepare(str(model), str(data), str(out), **kw)


@pytest.mark.parametrize("harness", [False, True])
def test_prepared_file_is_the_backbones_embeddings(tiny_rm, dataset, head_files, tmp_path, harness):
    from pathlib import Path
    from armorm.safetensors_io import SafetensorsFile
    recs = rb2_records()
    path = _prepare(tiny_rm, dataset, tmp_path / "c5", chunk_rows=5, harness_tokenization=harness)  # 5 chunks
    f = SafetensorsFile(path)
    # a direct score_sequences run over every completion, tokenized as the file's
    with ArmoRM.from_pretrained(tiny_rm, architecture="LlamaModel", torch_dtype="float32", num_threads=1) as m:
        pipe = ArmoRMPipeline(model=m, max_length=2048, harness_tokenization=harness)
        seqs = [s for r in recs for s in pipe.encode(conversations(r))]
        assert all(s[1] == 128000 for s in seqs) == harness               # the harness's second BOS
        want = m.score_sequences(seqs, fields=["hidden_state", "prompt_embedding"], share_prefixes=False)
    first = np.cumsum([0] + [r["total_completions"] for r in recs])[:-1]
    assert np.array_equal(f.read("embeddings"), np.asarray(want["hidden_state"], np.float32))
    assert np.array_equal(f.read("prompt_embeddings"), np.asarray(want["prompt_embedding"], np.float32)[first])
    assert f.read("completions").tolist() == [r["total_completions"] for r in recs]
    assert f.read("num_correct").tolist() == [r["num_correct"] for r in recs]
    assert json.loads(f.metadata["ids"]) == [r["id"] for r in recs]
    assert json.loads(f.metadata["subsets"]) == [r["subset"] for r in recs]
    assert float(f.metadata["prompt_mismatch"]) == 0.0     # a shared prefix: the same gating embedding exactly
    settings = json.loads(f.metadata["armorm_rewardbench2"])
    assert settings["harness_tokenization"] is harness and settings["seed"] is None
    # the chunking does not show in the file
    one = _prepare(tiny_rm, dataset, tmp_path / "c100", chunk_rows=100, harness_tokenization=harness)
    assert Path(one).read_bytes() == Path(path).read_bytes()
    # and the head on it gives the model's scores, tokenized the same way
    emb = rb2.scores_from_embeddings(path, *head_files)
    model = rb2.scores_from_model(str(tiny_rm), str(dataset), torch_dtype="float32", num_threads=1,
                                  harness_tokenization=harness)
    assert emb.ids == model.ids and emb.num_correct == model.num_correct
    np.testing.assert_allclose(np.concatenate(emb.scores), np.concatenate(model.scores), rtol=1e-4, atol=1e-5)


def test_prepare_resumes_after_interruption(tiny_rm, dataset, tmp_path, monkeypatch, capsys):
    from pathlib import Path
    kw = dict(chunk_rows=4, harness_tokenization=True, embeddings_dtype="bfloat16")
    full = _prepare(tiny_rm, dataset, tmp_path / "full", **kw)

    def interrupt(done, total):
        if done >= 9:
            raise KeyboardInterrupt("simulated")

    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        _prepare(tiny_rm, dataset, out, progress=interrupt, **kw)
    assert not list(out.glob("*.safetensors")) and [p for p in out.iterdir() if p.name.startswith(".")]
    # other settings are refused while the interrupted work is there, unless restarted
    with pytest.raises(ValueError, match="interrupted run with different settings.*harness_tokenization"):
        _prepare(tiny_rm, dataset, out, **dict(kw, harness_tokenization=False))
    seen = []
    path = _prepare(tiny_rm, dataset, out, progress=lambda done, total: seen.append((done, total)), **kw)
    assert seen[0][0] >= 8 and seen[-1] == (22, 22)        # finished chunks were not recomputed
    assert Path(path).read_bytes() == Path(full).read_bytes()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
    # the same command again keeps the file; other settings need overwrite
    assert _prepare(tiny_rm, dataset, out, progress=lambda *a: pytest.fail("recomputed"), **kw) == path
    with pytest.raises(ValueError, match=r"exists with different settings \(harness_tokenization: True -> False\)"):
        _prepare(tiny_rm, dataset, out, **dict(kw, harness_tokenization=False))
    with pytest.raises(ValueError, match="exists with different settings.*max_length: 2048 -> 1000"):
        _prepare(tiny_rm, dataset, out, **dict(kw, max_length=1000))
    # the CLI says how to resume
    monkeypatch.setattr(rb2, "prepare", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert cli.main(["prepare-rewardbench2", "--model", str(tiny_rm), "--dataset", str(dataset), "--output",
                     str(out), "--no-progress"]) == 130
    assert "finished chunks are kept: rerun the same command to resume" in capsys.readouterr().err


def test_prepare_shards_read_together(tiny_rm, dataset, head_files, tmp_path, capsys):
    from armorm.safetensors_io import SafetensorsFile
    one = SafetensorsFile(_prepare(tiny_rm, dataset, tmp_path / "one"))
    out = tmp_path / "two"
    for k in (1, 2):
        assert cli.main(["prepare-rewardbench2", "--model", str(tiny_rm), "--dataset", str(dataset), "--output",
                         str(out), "--n-shards", "2", "--shard-idx", str(k), "--chunk-rows", "3", "--dtype", "float32",
                         "--embeddings-dtype", "float32", "--threads", "1", "--no-progress"]) == 0
    paths = capsys.readouterr().out.split()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["rb2-00001-of-00002.safetensors", "rb2-00002-of-00002.safetensors"]
    parts = [SafetensorsFile(p) for p in paths]
    assert [len(json.loads(p.metadata["ids"])) for p in parts] == [11, 11]       # contiguous, dataset order
    for t in ("embeddings", "prompt_embeddings", "completions", "num_correct"):
        assert np.array_equal(np.concatenate([p.read(t) for p in parts]), one.read(t))
    a, b = rb2.scores_from_embeddings(str(out), *head_files), rb2.scores_from_embeddings(one.path, *head_files)
    assert a.ids == b.ids and a.num_correct == b.num_correct       # the head's matmul: per file, so not bitwise
    np.testing.assert_allclose(np.concatenate(a.scores), np.concatenate(b.scores), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("recs, match", [
    (_mutate(7, total_completions=5), r"row 7 \(bad.jsonl line 8\) \(id '7'\): total_completions is 5"),
    (_mutate(20, chosen=KeyError), r"row 20 \(bad.jsonl line 21\): no 'chosen'"),
    (_mutate(20, id="ref:1"), r"line 21\) \(id 'ref:1'\): Ties prompt ref:1 appears twice \(also row 17 "
                              r"\(bad.jsonl line 18\)"),                # in another chunk
])
def test_prepare_names_bad_rows_before_embedding(tiny_rm, tmp_path, capsys, recs, match):
    data = write_jsonl(tmp_path / "bad.jsonl", recs)
    out = tmp_path / "out"
    with pytest.raises(DatasetError, match=match):       # rows in later chunks, and across chunks
        _prepare(tiny_rm, data, out, chunk_rows=3)
    assert not list(out.iterdir())                       # checked before any chunk
    assert cli.main(["prepare-rewardbench2", "--model", str(tiny_rm), "--dataset", str(data), "--output", str(out),
                     "--chunk-rows", "3", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("armorm: error: row ")


def test_prepare_truncation_that_cuts_the_header_names_the_row(tiny_rm, tmp_path):
    recs = rb2_records()
    recs[9]["prompt"] = "word " * 80
    data = write_jsonl(tmp_path / "long.jsonl", recs)
    with pytest.raises(DatasetError, match=r"row 9 \(long.jsonl line 10\) \(id '9'\), completion 0 \(chosen 0\): "
                                           r"truncation to max_length=40"):
        _prepare(tiny_rm, data, tmp_path / "o", max_length=40, chunk_rows=4)
    assert _prepare(tiny_rm, data, tmp_path / "o", max_length=40, truncation=False, chunk_rows=4, restart=True)
