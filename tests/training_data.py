"""Small training datasets the stage tests share (test_stage1.py, test_stage2.py).

`make_records(n)`: multi-objective rows (`messages` + one label per objective
of `OBJ`, from three sources that label different objectives, some missing);
`write_jsonl(path, records)`: a JSON Lines file of them, with blank lines;
`pair_records(n)`: preference pairs in both formats (message lists, and
prompt + strings) with RewardBench-like subsets and ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OBJ = ["a-x", "a-y", "b-x", "c-x", "c-y"]

WORDS = ("the a cat dog runs quickly answer question because of this and that why how fine thanks "
         "hello world python code list sort").split()


def make_records(n, seed=0, objectives=OBJ):
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        turns = [{"role": "user", "content": " ".join(rng.choice(WORDS, int(rng.integers(2, 9))))},
                 {"role": "assistant", "content": " ".join(rng.choice(WORDS, int(rng.integers(1, 25))))}]
        if i % 5 == 0:
            turns = [{"role": "system", "content": "be brief"}] + turns
        rec = {"messages": turns, "id": i}
        src = i % 3
        for k, o in enumerate(objectives):
            labelled = (src == 0 and k < 2) or (src == 1 and k == 2) or (src == 2 and k >= 3)
            rec[o] = float(np.round(rng.normal(), 3)) if labelled else None
        if i % 7 == 0:
            rec[objectives[2]] = int(rng.integers(0, 5)) if src == 1 else None  # ints are fine
        recs.append(rec)
    return recs


def write_jsonl(path: Path, recs):
    with open(path, "w", encoding="utf-8") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
            if r["id"] % 11 == 0:
                f.write("\n")  # blank lines are skipped
    return path


SUBSETS = ["alpacaeval-easy", "mt-bench-hard", "donotanswer", "math-prm", "hep-go"]


def pair_records(n, seed=0):
    recs = make_records(n, seed)
    rng = np.random.default_rng(seed + 1)
    out = []
    for i, r in enumerate(recs):
        a = r["messages"][-1]["content"]
        b = " ".join(rng.choice(a.split() + ["no", "maybe"], 6))
        if i % 2:
            out.append({"prompt": r["messages"][-2]["content"], "chosen": a, "rejected": b, "id": 1000 + i,
                        "subset": SUBSETS[i % len(SUBSETS)]})
        else:
            out.append({"chosen": r["messages"], "rejected": r["messages"][:-1] + [{"role": "assistant",
                                                                                    "content": b}],
                        "id": 1000 + i, "subset": SUBSETS[i % len(SUBSETS)]})
    return out
