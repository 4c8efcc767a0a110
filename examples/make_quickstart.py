"""Writes examples/quickstart.ipynb (run it after editing the cells below: `python examples/make_quickstart.py`).

The notebook is kept without outputs: it runs on a random toy model whose
numbers mean nothing, and stored outputs (PNG images) would change on every
run. tests/test_notebook.py runs it in a Jupyter kernel, checks that each
cell tagged "html" shows an HTML table and each cell tagged "plot" one image,
and checks that the file is what this script writes.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

import nbformat

OUT = Path(__file__).resolve().parent / "quickstart.ipynb"

# (kind, tags, source): kind "md" or "code"; tags say what the test expects a code cell to show
CELLS: List[Tuple[str, List[str], str]] = [
    ("md", [], """\
# armorm quickstart

Score conversations with an ArmoRM-style multi-objective reward model, see why a response won (its
reward on each of the 19 objectives and the weights the gating network gave them for this prompt),
rank N responses to one prompt, and evaluate on RewardBench.

It runs top to bottom offline, on a small random model made in the second code cell. To use the
real model, set `MODEL` there."""),
    ("md", [], """\
## Install

```bash
pip install "armorm[plot]"        # from a checkout of the repository: pip install -e ".[plot]"
```

`plot` brings matplotlib for `armorm.plot`; tables display without it. For the real model from the
Hugging Face hub add the `hub` extra: `pip install "armorm[plot,hub]"`."""),
    ("code", [], """\
import tempfile
from pathlib import Path

import numpy as np

import armorm
import armorm.plot

armorm.__version__"""),
    ("md", [], """\
## The model

With `MODEL = None` the next cell makes a small toy ArmoRM (`armorm make-tiny-model` on the command
line): the real model's files and chat template (Llama 3), 2 layers of random weights. **Its scores
mean nothing**; it is here so that every cell runs in seconds without the 16 GB download.

For the real model, set `MODEL` to a directory holding
[RLHFlow/ArmoRM-Llama3-8B-v0.1](https://huggingface.co/RLHFlow/ArmoRM-Llama3-8B-v0.1)
(`config.json`, the `*.safetensors` files and the tokenizer files), or to the hub id
`"RLHFlow/ArmoRM-Llama3-8B-v0.1"`: armorm takes it from the local Hugging Face cache, or downloads it
when `huggingface_hub` is installed and the hub is reachable."""),
    ("code", [], """\
MODEL = None  # the real model: "RLHFlow/ArmoRM-Llama3-8B-v0.1" or "/path/to/ArmoRM-Llama3-8B-v0.1"

WORK = Path(tempfile.mkdtemp(prefix="armorm-quickstart-"))
if MODEL is None:
    from armorm.tiny import make_tiny_model
    MODEL = make_tiny_model(WORK / "tiny-armorm")  # random weights: the scores below mean nothing

rm = armorm.ArmoRMPipeline(MODEL)  # the model card's pipeline
rm.model"""),
    ("md", [], """\
## Score the model card's example

One prompt (synonyms for "beautiful") and three answers. Called on one conversation, the pipeline
returns the model card's `{"score": ...}`:"""),
    ("code", [], """\
from armorm.cli import example_conversations

conversations = example_conversations()
rm(conversations[0])"""),
    ("md", [], """\
`score_batch` scores many conversations in one packed batch and returns every field (NumPy arrays,
row i = conversation i). In a notebook it shows as a table: the score, and the three objectives with
the largest coefficient. The collapsed section below it lists every reward."""),
    ("code", ["html"], """\
out = rm.score_batch(conversations)
out"""),
    ("md", [], "In a terminal (or with `print`) it stays short:"),
    ("code", [], "print(out)"),
    ("md", [], """\
One conversation in detail: its reward on each objective, the gating weight the prompt gave it, the
coefficient (gating weights times the reward transform matrix) and the contribution, reward x
coefficient. The contributions add up to the score."""),
    ("code", ["html"], "out.row(1)"),
    ("md", [], """\
## Explain

`explain` gives the model card's top objectives, a list of `(objective, coefficient)`; a notebook
also shows each one's reward and contribution."""),
    ("code", ["html"], "rm.explain(conversations[1])"),
    ("code", [], """\
for name, coefficient in rm.explain(conversations[1]):
    print(f"{name:40} {coefficient:+.4f}")"""),
    ("md", [], """\
## Plot

Rewards (left) and coefficients (right) per objective, the three answers side by side; objectives in
bold are among an answer's top three. Every function in `armorm.plot` returns a matplotlib figure
(save it with `armorm.plot.save(fig, "rewards.png")`)."""),
    ("code", ["plot"], "armorm.plot.objectives(out)"),
    ("md", [], """\
## Best of N

Score N responses to one prompt and keep the best. The gating network reads only the prompt, so all
the responses get the same coefficients: they differ in their rewards."""),
    ("code", ["html"], """\
prompt = "Give me three tips for writing a clear email."
responses = [
    "1. Put the request in the subject line. 2. Keep one topic per email. 3. End with the next step you expect.",
    "Write clearly.",
    "Be concise, use short paragraphs and bullet points, and proofread before sending.",
    "Emails are a form of written communication used since the 1970s.",
    "Start with the main point, keep it short, and say exactly what you need and by when.",
]
best_of_n = rm.score_batch([[{"role": "user", "content": prompt}, {"role": "assistant", "content": r}]
                            for r in responses])
print("best:", responses[int(np.argmax(best_of_n.score))])
best_of_n"""),
    ("code", ["plot"], "armorm.plot.ranking(best_of_n)"),
    ("md", [], """\
## Evaluate on RewardBench

RewardBench counts a pair as correct when the chosen response scores above the rejected one, per
subset, then weights the subsets into four sections. Here on toy rows of random text written by
`armorm.tiny.write_datasets`; for the real evaluation pass RewardBench's `filtered` split
(`allenai/reward-bench`, a Parquet or JSONL file) instead."""),
    ("code", ["html"], """\
from armorm.tiny import write_datasets
from armorm.train import rewardbench

data = write_datasets(WORK / "data")
subsets, chosen, rejected = rewardbench.scores_from_model(rm.model, data["rewardbench"])
report = rewardbench.evaluate_scores(subsets, chosen, rejected)
report"""),
    ("code", ["plot"], "armorm.plot.rewardbench(report)"),
    ("md", [], """\
## Next

- **Scoring at scale**: `armorm score --model DIR --input conversations.jsonl --output scores.jsonl`
  writes every field per conversation; from Python, `rm.score_batch(...)` packs any number of
  conversations without padding, and one model can serve many threads (README, "Pipeline" and "CLI").
- **Training your own ArmoRM**: stage 1 (ridge regression per objective) and stage 2 (the gating
  network), from the command line or `armorm.train` (README, "Training", with a worked example).
- **Evaluation**: `armorm eval-rewardbench --model DIR --dataset filtered.parquet --plot rewardbench.png`
  prints the table, and draws the bars above (README, "Training", step 5;
  [docs/rewardbench.md](../docs/rewardbench.md)); `armorm eval-rewardbench2` does RewardBench 2.
- **Serving an RLHF trainer**: `armorm serve --model DIR` answers OpenRLHF's `/get_reward` and the
  vLLM/SGLang routes verl calls, batching every client's requests together (README, "Serve").
- **Many machines**: `armorm score --ray` and `prepare-stage1/2 --ray` on a Ray cluster (README,
  "Running across machines (Ray)")."""),
    ("code", [], """\
rm.model.close()  # unmaps the weights
import shutil
shutil.rmtree(WORK)  # the toy model and data"""),
]


def build() -> nbformat.NotebookNode:
    """The notebook, without outputs; cell ids are fixed so that the file is the same on every run."""
    nb = nbformat.v4.new_notebook()
    nb.metadata = {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                   "language_info": {"name": "python"}}
    for i, (kind, tags, source) in enumerate(CELLS):
        cell = nbformat.v4.new_markdown_cell(source) if kind == "md" else nbformat.v4.new_code_cell(source)
        cell["id"] = f"cell-{i:02d}"
        if tags:
            cell.metadata["tags"] = list(tags)
        nb.cells.append(cell)
    nbformat.validate(nb)
    return nb


def text() -> str:
    return nbformat.writes(build()) + "\n"


if __name__ == "__main__":
    OUT.write_text(text(), encoding="utf-8")
    print(OUT, file=sys.stderr)
