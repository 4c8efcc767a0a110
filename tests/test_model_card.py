"""The model card's "Usage" snippet and pipeline, run on a tiny checkpoint.

The checkpoint has the real Llama-3 tokenizer and vocabulary size (128257, as
ArmoRM), so tokenization and the gating pattern are the real ones; only the
backbone is tiny and random. The snippet below is the model card's, with only
the import/class lines changed and device = "cpu".
"""
from __future__ import annotations

import shutil
import textwrap

import numpy as np
import pytest
import torch

import armorm
from checkpoints import make_armorm, reference_armorm_head

CARD_SNIPPET = '''
import torch
from armorm import ArmoRM as AutoModelForSequenceClassification
from {tok_module} import {tok_class} as AutoTokenizer
device = "cpu"
path = MODEL_PATH
model = AutoModelForSequenceClassification.from_pretrained(path, device_map=device,
                               trust_remote_code=True, torch_dtype=torch.bfloat16)
tokenizer = AutoTokenizer.from_pretrained(path, use_fast=True)
prompt = 'What are some synonyms for the word "beautiful"?'
response = "Nicely, Beautifully, Handsome, Stunning, Wonderful, Gorgeous, Pretty, Stunning, Elegant"
messages = [{{"role": "user", "content": prompt}},
           {{"role": "assistant", "content": response}}]
input_ids = tokenizer.apply_chat_template(messages, return_tensors="pt").to(device)
with torch.no_grad():
   output = model(input_ids)
   multi_obj_rewards = output.rewards.cpu().float()
   gating_output = output.gating_output.cpu().float()
   preference_score = output.score.cpu().float()
obj_transform = model.reward_transform_matrix.data.cpu().float()
multi_obj_coeffs = gating_output @ obj_transform.T
assert torch.isclose(torch.sum(multi_obj_rewards * multi_obj_coeffs, dim=1), preference_score, atol=1e-3)
K = 3
top_obj_dims = torch.argsort(torch.abs(multi_obj_coeffs), dim=1, descending=True,)[:, :K]
top_obj_coeffs = torch.gather(multi_obj_coeffs, dim=1, index=top_obj_dims)
attributes = model.attributes
example_index = 0
for i in range(K):
   attribute = attributes[top_obj_dims[example_index, i].item()]
   coeff = top_obj_coeffs[example_index, i].item()
   print(f"{{attribute}}: {{round(coeff,5)}}")
helpsteer_rewards_pred = multi_obj_rewards[0, :5] * 5 - 0.5
print(helpsteer_rewards_pred)
'''

PROMPT = 'What are some synonyms for the word "beautiful"?'


@pytest.fixture(scope="module")
def tiny_armorm(tmp_path_factory, llama3_dir):
    d = tmp_path_factory.mktemp("card") / "ArmoRM-tiny"
    tiny = make_armorm(d, vocab=128257, pad_token_id=128256, hidden=32, heads=4, kv_heads=2, inter=64, layers=2,
                       gating_hidden=16)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama3_dir / f).exists():
            shutil.copy(llama3_dir / f, d / f)
    return tiny


@pytest.mark.parametrize("tok", [("transformers", "AutoTokenizer"), ("armorm", "ChatTokenizer")])
def test_model_card_snippet_runs(tiny_armorm, tok, capsys):
    code = CARD_SNIPPET.format(tok_module=tok[0], tok_class=tok[1])
    scope = {"MODEL_PATH": str(tiny_armorm.path)}
    exec(compile(textwrap.dedent(code), "model_card_snippet", "exec"), scope)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4
    names = [line.split(":")[0] for line in printed[:3]]
    assert all(n in armorm.ATTRIBUTES for n in names)
    # the snippet's score equals the docs/model.md head on transformers' hidden states of the same tokens
    ids = scope["input_ids"]
    ids = ids["input_ids"] if not isinstance(ids, torch.Tensor) else ids
    assert ids[0, 0].item() == 128000 and (ids[0] == 128000).sum() == 1  # one BOS
    bb = tiny_armorm.backbone
    with torch.no_grad():
        hs = bb(ids).last_hidden_state[0]
    p_g = armorm.model.find_gating_position(ids[0].numpy(), armorm.LLAMA3_GATING_PATTERN)
    assert p_g > 0
    ref = reference_armorm_head(hs, ids.shape[1] - 1, p_g, tiny_armorm.head, 10.0, 3)
    # bf16 weights (the snippet asks for bf16) vs the fp32 reference: bf16 rounding of the backbone
    assert abs(scope["preference_score"].item() - ref["score"].item()) <= 0.05 * max(1.0, abs(ref["score"].item()))


def test_gating_pattern_derived_from_tokenizer(tiny_armorm):
    model = armorm.ArmoRM.from_pretrained(tiny_armorm.path)
    assert model.gating_pattern == [128009, 128006, 78191, 128007, 271]


def test_pipeline_matches_model(tiny_armorm, llama3_dir):
    from transformers import AutoTokenizer
    rm = armorm.ArmoRMPipeline(str(tiny_armorm.path), trust_remote_code=True, torch_dtype="float32")
    responses = ["Nicely, Beautifully, Handsome", "Gorgeous\n2. Lovely\n3. Stunning", "Sorry i cannot answer this."]
    convs = [[{"role": "user", "content": PROMPT}, {"role": "assistant", "content": r}] for r in responses]
    scores = [rm(c)["score"] for c in convs]
    assert all(isinstance(s, float) for s in scores)
    hf_tok = AutoTokenizer.from_pretrained(str(tiny_armorm.path))
    model = rm.model
    for c, s in zip(convs, scores):
        ids = hf_tok.apply_chat_template(c, return_tensors="np", return_dict=False)
        assert model(ids).score[0] == np.float32(s)
    batch = rm.score_batch(convs, batch_tokens=64, progress=True)
    np.testing.assert_array_equal(batch.score, np.float32(scores))
    assert batch.rewards.shape == (3, 19) and batch.gating_output.shape == (3, 19)
    assert batch.hidden_state.shape == (3, 32) and batch.prompt_embedding.shape == (3, 32)
    # the same pipeline on a transformers tokenizer gives the same scores
    rm2 = armorm.ArmoRMPipeline(model=model, tokenizer=hf_tok)
    assert [rm2(c)["score"] for c in convs] == scores
    # explain: top-3 by |coefficient|, coefficients = gating @ T^T, and score == sum(rewards * coeffs)
    top = rm.explain(convs[0])
    coeffs = model.coefficients(batch.gating_output)[0]
    order = np.argsort(-np.abs(coeffs))[:3]
    assert [n for n, _ in top] == [armorm.ATTRIBUTES[j] for j in order]
    assert np.isclose((batch.rewards[0] * coeffs).sum(), batch.score[0], atol=1e-5)


def test_prompt_response_records_and_prompt_embedding_shared(tiny_armorm):
    rm = armorm.ArmoRMPipeline(str(tiny_armorm.path), torch_dtype="float32")
    out = rm.score_batch([{"prompt": PROMPT, "response": "a"}, {"prompt": PROMPT, "response": "b b b b"}])
    # same prompt prefix under causal attention: the gating input is identical
    np.testing.assert_array_equal(out.prompt_embedding[0], out.prompt_embedding[1])
    np.testing.assert_array_equal(out.gating_output[0], out.gating_output[1])
    assert out.score[0] != out.score[1]


def test_truncation_keeps_header(tiny_armorm):
    rm = armorm.ArmoRMPipeline(str(tiny_armorm.path), torch_dtype="float32", max_length=40)
    long_answer = "word " * 200
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": long_answer}]
    full = rm.encode([conv])[0]
    assert full.size == 40  # truncated on the right, header kept
    rm_nt = armorm.ArmoRMPipeline(model=rm.model, tokenizer=rm.tokenizer, truncation=False)
    assert rm_nt.encode([conv])[0].size > 40
    expected = rm.model.score_sequences([rm_nt.encode([conv])[0][:40]]).score[0]
    assert rm(conv)["score"] == expected


def test_cli_scores_jsonl(tiny_armorm, tmp_path, capsys):
    import json
    from armorm.cli import main
    inp = tmp_path / "in.jsonl"
    recs = [{"id": "a", "messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": "x"}]},
            {"id": 7, "prompt": PROMPT, "response": "Lovely, gorgeous."}]
    inp.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    out = tmp_path / "out.jsonl"
    rc = main(["score", "--model", str(tiny_armorm.path), "--input", str(inp), "--output", str(out),
               "--dtype", "float32", "--top-k", "2"])
    assert rc == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", 7]
    rm = armorm.ArmoRMPipeline(str(tiny_armorm.path), torch_dtype="float32")
    ref = rm.score_batch(recs)
    for x, s, r, g in zip(lines, ref.score, ref.rewards, ref.gating_output):
        assert x["score"] == pytest.approx(float(s), abs=0)
        assert list(x["rewards"]) == armorm.ATTRIBUTES
        assert np.allclose(list(x["rewards"].values()), r) and np.allclose(list(x["gating_output"].values()), g)
        assert len(x["top_objectives"]) == 2
    # no --input: the built-in example, printed as a table
    rc = main(["score", "--model", str(tiny_armorm.path), "--dtype", "float32"])
    text = capsys.readouterr().out
    assert rc == 0 and text.count("score ") == 3 and "beautiful" in text
