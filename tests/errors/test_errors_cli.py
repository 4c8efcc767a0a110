"""The pipeline and the CLI on bad conversations and files (real Llama-3
tokenizer): a clear error naming the conversation or file:line, exit 2, and no
partial output.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from armorm.hub import ModelNotFoundError
from armorm.model import GatingPatternError
import armorm
from checkpoints import make_armorm
from bad_input import edit_header


# ============================================================================ pipeline and CLI (real Llama-3 tokenizer)

U = {"role": "user", "content": "What is 2 + 2?"}
A = {"role": "assistant", "content": "4."}


@pytest.fixture(scope="module")
def l3_ckpt(tmp_path_factory, llama3_dir):
    d = tmp_path_factory.mktemp("errors-l3") / "ArmoRM-tiny"
    make_armorm(d, vocab=128257, hidden=32, heads=4, kv_heads=2, inter=64, layers=2, gating_hidden=16)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama3_dir / f).exists():
            shutil.copy(llama3_dir / f, d / f)
    return d


@pytest.fixture(scope="module")
def rm(l3_ckpt):
    p = armorm.ArmoRMPipeline(l3_ckpt, torch_dtype="float32", num_threads=1)
    assert p.model.gating_pattern == armorm.LLAMA3_GATING_PATTERN  # derived from the tokenizer
    yield p
    p.model.close()


def test_pipeline_good_conversation(rm):
    assert np.isfinite(rm([U, A])["score"])


def test_pipeline_empty_conversation(rm):
    with pytest.raises(ValueError, match=r"conversation 0: empty conversation"):
        rm([])
    with pytest.raises(ValueError, match=r"conversation 1: empty conversation"):
        rm.score_batch([[U, A], []])


def test_pipeline_no_conversations(rm):
    with pytest.raises(ValueError, match=r"no sequences to score"):
        rm.score_batch([])


@pytest.mark.parametrize("msg,exc,match", [
    ({"content": "hi"}, ValueError, r"conversation 0: message 0 has no 'role'"),
    ({"role": "user"}, ValueError, r"conversation 0: message 0 has no 'content'"),
    ({"role": "user", "content": None}, ValueError, r"conversation 0: message 0 has no 'content'"),
    ({"role": 3, "content": "hi"}, TypeError, r"conversation 0: message 0: 'role' must be a string, got int"),
    ("hi", TypeError, r"conversation 0: message 0 must be a dict with 'role' and 'content', got str"),
])
def test_pipeline_bad_message(rm, msg, exc, match):
    with pytest.raises(exc, match=match):
        rm([msg, A])


def test_pipeline_messages_not_a_list(rm):
    with pytest.raises(TypeError, match=r"messages must be a list of \{'role', 'content'\} dicts"):
        rm("What is 2 + 2?")


@pytest.mark.parametrize("conv", [[U], [U, A, U], [A, {"role": "system", "content": "x"}]])
def test_pipeline_conversation_ending_with_non_assistant_turn(rm, conv):
    role = conv[-1]["role"]
    with pytest.raises(GatingPatternError, match=rf"conversation 1 ends with a '{role}' message; .* must end with "
                                                 r"an assistant message"):
        rm.score_batch([[U, A], conv])
    with pytest.raises(GatingPatternError, match=r"conversation 0 ends with"):
        rm(conv)


def test_pipeline_bad_records(rm):
    with pytest.raises(ValueError, match=r"record has 'prompt' but no 'response'"):
        rm.score_batch([{"prompt": "hi"}])
    with pytest.raises(ValueError, match=r"record has neither 'messages' nor 'prompt' \+ 'response' "
                                         r"\(keys: \['foo'\]\)"):
        rm.score_batch([{"foo": 1}])
    with pytest.raises(ValueError, match=r"record 'response' must be a string, got int"):
        rm.score_batch([{"prompt": "hi", "response": 3}])


def test_pipeline_truncation_cuts_final_header(rm):
    short = armorm.ArmoRMPipeline(model=rm.model, tokenizer=rm.tokenizer, max_length=40)
    assert np.isfinite(short([U, A])["score"])  # a short conversation fits
    long_prompt = [{"role": "user", "content": "word " * 50}, A]
    with pytest.raises(ValueError, match=r"conversation 0: truncation to max_length=40 tokens would cut off the "
                                         r"final assistant header \(it starts at token \d+ of \d+\)"):
        short(long_prompt)
    with pytest.raises(ValueError, match=r"conversation 1: truncation"):
        short.score_batch([[U, A], long_prompt])
    # the same conversation without truncation scores
    assert np.isfinite(armorm.ArmoRMPipeline(model=rm.model, tokenizer=rm.tokenizer, truncation=False)(long_prompt)
                       ["score"])


def test_pipeline_without_model(rm):
    with pytest.raises(ValueError, match=r"give model_id"):
        armorm.ArmoRMPipeline()


def test_pipeline_model_dir_missing(tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"does not exist"):
        armorm.ArmoRMPipeline(tmp_path / "nope")


# ---- CLI

def cli(*args) -> int:
    from armorm.cli import main
    return main([str(a) for a in args])


def _write_jsonl(path: Path, lines) -> Path:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return path


GOOD_LINE = json.dumps({"messages": [U, A]})


@pytest.mark.parametrize("bad,match", [
    ("{bad json", r"in\.jsonl:2: not valid JSON"),
    ("[1, 2]", r"in\.jsonl:2: record must be a dict"),
    ('"just a string"', r"in\.jsonl:2: record must be a dict"),
    (json.dumps({"messages": [{"content": "x"}]}), r"in\.jsonl:2: message 0 needs string 'role' and 'content'"),
    (json.dumps({"messages": []}), r"in\.jsonl:2: empty conversation"),
    (json.dumps({"prompt": "x"}), r"in\.jsonl:2: record has 'prompt' but no 'response'"),
    (json.dumps({"messages": "x"}), r"in\.jsonl:2: record 'messages' must be a list of message dicts"),
    (b"\xff\xfe{}", r"in\.jsonl:2: not valid UTF-8"),
])
def test_cli_malformed_jsonl_line(l3_ckpt, tmp_path, capsys, bad, match):
    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD_LINE, bad, GOOD_LINE])
    out = tmp_path / "out.jsonl"
    assert cli("score", "--model", l3_ckpt, "--input", inp, "--output", out, "--dtype", "float32") == 2
    err = capsys.readouterr().err
    assert err.startswith("armorm: error: ")
    assert re.search(match, err), err
    assert not out.exists()  # no partial output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]  # no temp file left either


def test_cli_conversation_ending_with_user_turn(l3_ckpt, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD_LINE, "", json.dumps({"messages": [U, A, U]})])
    out = tmp_path / "out.jsonl"
    assert cli("score", "--model", l3_ckpt, "--input", inp, "--output", out, "--dtype", "float32") == 2
    err = capsys.readouterr().err
    assert f"{inp}:3 ends with a 'user' message" in err  # file:line, blank lines counted
    assert not out.exists()


def test_cli_existing_output_untouched_on_error(l3_ckpt, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD_LINE, "{oops"])
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    assert cli("score", "--model", l3_ckpt, "--input", inp, "--output", out, "--dtype", "float32") == 2
    assert "in.jsonl:2" in capsys.readouterr().err
    assert out.read_text() == "previous results\n"


def test_cli_empty_input(l3_ckpt, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", ["", "   "])
    assert cli("score", "--model", l3_ckpt, "--input", inp) == 2
    assert "in.jsonl: no conversations" in capsys.readouterr().err


def test_cli_missing_input_file(l3_ckpt, tmp_path, capsys):
    assert cli("score", "--model", l3_ckpt, "--input", tmp_path / "nope.jsonl") == 2
    err = capsys.readouterr().err
    assert "No such file" in err and "nope.jsonl" in err


def test_cli_output_directory_missing(l3_ckpt, tmp_path, capsys):
    inp = _write_jsonl(tmp_path / "in.jsonl", [GOOD_LINE])
    out = tmp_path / "no-such-dir" / "out.jsonl"
    assert cli("score", "--model", l3_ckpt, "--input", inp, "--output", out) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "no-such-dir" in err and "does not exist" in err


def test_cli_model_dir_does_not_exist(tmp_path, capsys):
    assert cli("score", "--model", tmp_path / "nope") == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "--model DIR" in err


def test_cli_model_is_a_file(l3_ckpt, capsys):
    assert cli("score", "--model", l3_ckpt / "config.json") == 2
    err = capsys.readouterr().err
    assert "is a file, not a model directory" in err and "--model DIR" in err


def test_cli_broken_checkpoint(l3_ckpt, tmp_path, capsys):
    d = tmp_path / "broken"
    shutil.copytree(l3_ckpt, d)
    edit_header(d / "model.safetensors", lambda h: h.pop("model.norm.weight"))
    assert cli("score", "--model", d) == 2
    assert "missing tensor 'model.norm.weight'" in capsys.readouterr().err


def test_cli_no_model_offline(tmp_path, monkeypatch, capsys):
    """No --model, an empty HF cache and no network: a fast exit 2 telling the user to pass --model DIR."""
    import huggingface_hub.constants as hfc
    home = tmp_path / "hf"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these at import time, and it may already be imported
    monkeypatch.setattr(hfc, "HF_HOME", str(home))
    monkeypatch.setattr(hfc, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hfc, "HF_HUB_OFFLINE", True)
    assert cli("score") == 2
    err = capsys.readouterr().err
    assert "--model DIR" in err and armorm.DEFAULT_MODEL in err
    assert not any(home.rglob("*.safetensors"))


@pytest.mark.parametrize("flag,value", [("--threads", "0"), ("--batch-tokens", "0"), ("--max-length", "-1"),
                                        ("--top-k", "-1"), ("--threads", "many")])
def test_cli_bad_numeric_flags(l3_ckpt, capsys, flag, value):
    with pytest.raises(SystemExit) as ei:
        cli("score", "--model", l3_ckpt, flag, value)
    assert ei.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and ("must be at least" in err or "expected an integer" in err)


def test_cli_bad_dtype_and_command(capsys):
    with pytest.raises(SystemExit) as ei:
        cli("score", "--dtype", "int8")
    assert ei.value.code == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        cli("train")
    assert ei.value.code == 2
