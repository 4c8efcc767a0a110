"""The ArmoRM recipe on Gemma-2 and Qwen3 backbones, end to end through the CLI.

A tiny random `Gemma2ForCausalLM` (tied embeddings) / `Qwen3ForCausalLM` with a
synthetic tokenizer carrying the family's real chat template and special-token
ids (tests/chat_templates.py): prepare-stage1, train-stage1, prepare-stage2,
train-stage2, assemble, then the assembled `<Family>ForRewardModelWithGating`
directory loads in armorm with the family's gating pattern (Gemma-2:
[107, 108, 106, 2516, 108], RLHFlow's), scores every pair as the parts computed
from the prepared embeddings do, and RewardBench from the checkpoint equals
RewardBench from the embeddings. transformers' AutoModel loads the assembled
directory's backbone (the head needs armorm) and gives the same hidden states.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import armorm
from armorm import cli
from armorm.safetensors_io import SafetensorsFile
from armorm.train import rewardbench as rb
from armorm.train import stage2
from chat_templates import (GEMMA2, GEMMA_GATING, GEMMA_SPECIALS, GEMMA_WORDS, QWEN3, QWEN_GATING, QWEN_SPECIALS,
                            QWEN_WORDS, synthetic_tokenizer_dir)
from checkpoints import make_causallm
from training_data import OBJ, make_records, pair_records, write_jsonl

FAMILY_SETUP = {
    # family: (tokenizer args, gating pattern, vocab, class prefix)
    "gemma2": (dict(template=GEMMA2, specials=GEMMA_SPECIALS, words=GEMMA_WORDS, bos="<bos>", eos="<eos>",
                    pad="<pad>", unk="<unk>", first_free_id=3000), GEMMA_GATING, 3400, "Gemma2"),
    "qwen3": (dict(template=QWEN3, specials=QWEN_SPECIALS, words=QWEN_WORDS, eos="<|im_end|>", pad="<|endoftext|>",
                   first_free_id=151700), QWEN_GATING, 152000, "Qwen3"),
}


def backbone(tmp_path, family):
    tok, _, vocab, _ = FAMILY_SETUP[family]
    tok = dict(tok)
    d = tmp_path / f"{family}-it"
    kw = dict(hidden=24, heads=4, kv_heads=2, head_dim=8, inter=40, layers=2, vocab=vocab)
    if family == "gemma2":
        kw.update(sliding_window=16, query_pre_attn_scalar=8)
    hf = make_causallm(d, family=family, tie=family == "gemma2", **kw)
    synthetic_tokenizer_dir(d, tok.pop("template"), tok.pop("specials"), tok.pop("words"), **tok)
    return d, hf


def no_system(recs):
    """Gemma-2's template has no system role: drop those messages."""
    for r in recs:
        for side in ("messages", "chosen", "rejected"):
            if isinstance(r.get(side), list):
                r[side] = [m for m in r[side] if m["role"] != "system"]
    return recs


@pytest.mark.parametrize("family", sorted(FAMILY_SETUP))
def test_recipe_on_family_backbone(tmp_path, family, capsys):
    bb, hf = backbone(tmp_path, family)
    _, pattern, _, prefix = FAMILY_SETUP[family]
    recs, pairs = make_records(40), pair_records(30)
    if family == "gemma2":
        # the template's refusal of a system message reaches the CLI as one line naming the row: exit 2
        bad = write_jsonl(tmp_path / "with-system.jsonl", recs)
        assert cli.main(["prepare-stage1", "--model", str(bb), "--dataset", str(bad), "--output",
                         str(tmp_path / "x"), "--objectives", ",".join(OBJ), "--no-progress"]) == 2
        assert "System role not supported" in capsys.readouterr().err
        recs, pairs = no_system(recs), no_system(pairs)
    data1 = write_jsonl(tmp_path / "mo.jsonl", recs)
    data2 = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    common = ["--dtype", "float32", "--threads", "1", "--embeddings-dtype", "float32", "--no-progress"]
    assert cli.main(["prepare-stage1", "--model", str(bb), "--dataset", str(data1), "--output", str(tmp_path / "e1"),
                     "--objectives", ",".join(OBJ)] + common) == 0
    reg = tmp_path / "regression.safetensors"
    assert cli.main(["train-stage1", "--embeddings", str(tmp_path / "e1" / "*.safetensors"), "--output", str(reg),
                     "--no-progress"]) == 0
    out2 = tmp_path / "e2"
    assert cli.main(["prepare-stage2", "--model", str(bb), "--dataset", str(data2), "--output", str(out2)]
                    + common) == 0
    gate = tmp_path / "gating.safetensors"
    assert cli.main(["train-stage2", "--preference", str(out2 / "*.safetensors"), "--regression", str(reg),
                     "--output", str(gate), "--hidden-dim", "16", "--steps", "20", "--batch-size", "16",
                     "--eval-every", "10", "--no-progress"]) == 0
    ckpt = tmp_path / "armorm-ckpt"
    assert cli.main(["assemble", "--backbone", str(bb), "--regression", str(reg), "--gating", str(gate),
                     "--output", str(ckpt)]) == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["architectures"] == [prefix + "ForRewardModelWithGating"] and cfg["model_type"] == family

    model = armorm.ArmoRM.from_pretrained(ckpt, num_threads=1, torch_dtype="float32")
    assert model.config.family == family and model.config.kind == "armorm"
    assert model.gating_pattern == pattern  # derived from the family's chat template
    convs = []
    for i, p in enumerate(pairs):
        ch, rj = stage2.pair_conversations(p, f"row {i}")
        convs += [ch, rj]
    seqs = armorm.tokenizer.format_conversations(model.tokenizer, convs)
    got = np.asarray(model.score_sequences(seqs, fields=["score"])["score"]).reshape(-1, 2)
    _, c, r = rb.scores_from_embeddings(str(out2 / "*.safetensors"), str(reg), str(gate))
    rows = np.concatenate([SafetensorsFile(f).read("row_index") for f in sorted(out2.glob("*.safetensors"))])
    order = {int(x): j for j, x in enumerate(rows)}
    want = np.array([[c[order[i]], r[order[i]]] for i in range(len(pairs))])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # RewardBench: from the embeddings and end to end from the checkpoint, the same accuracies
    assert cli.main(["eval-rewardbench", "--embeddings", str(out2 / "*.safetensors"), "--regression", str(reg),
                     "--gating", str(gate), "--output", str(tmp_path / "rb1.json")]) == 0
    assert cli.main(["eval-rewardbench", "--model", str(ckpt), "--dataset", str(data2), "--split", "train",
                     "--dtype", "float32", "--threads", "1", "--output", str(tmp_path / "rb2.json")]) == 0
    a = json.loads((tmp_path / "rb1.json").read_text())
    b = json.loads((tmp_path / "rb2.json").read_text())
    assert {k: v["correct"] for k, v in a["subsets"].items()} == {k: v["correct"] for k, v in b["subsets"].items()}
    # `armorm score` on the assembled model
    assert cli.main(["score", "--model", str(ckpt), "--dtype", "float32", "--threads", "1",
                     "--input", str(data1), "--output", str(tmp_path / "scores.jsonl"), "--no-progress"]) == 0
    assert len((tmp_path / "scores.jsonl").read_text().splitlines()) == len(recs)

    # transformers loads the assembled backbone (AutoModel, by model_type); its hidden states are armorm's
    from transformers import AutoModel
    tm = AutoModel.from_pretrained(ckpt, dtype=torch.float32).eval()
    assert type(tm).__name__ == prefix + "Model"
    with torch.no_grad():
        hs = tm(torch.tensor([seqs[0]])).last_hidden_state[0, -1].numpy()
    ours = model.score_sequences([seqs[0]], fields=["hidden_state"]).hidden_state[0]
    assert np.abs(ours - hs).max() <= 1e-4 * np.abs(hs).max()
    with torch.no_grad():  # and the backbone is the CausalLM's we started from
        ref = hf.model(torch.tensor([seqs[0]])).last_hidden_state[0, -1].numpy()
    assert np.abs(ours - ref).max() <= 1e-4 * np.abs(ref).max()
    model.close()
