"""What a new user meets first: the toy model, the README's offline flow, the CLI's manners, file modes."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import armorm
from armorm.cli import build_parser, main as cli_main
from armorm.tiny import make_tiny_model

ROOT = Path(__file__).resolve().parents[1]


def run_armorm(*args, cwd=None, stdin=None, **kw):
    """`python -m armorm ARGS` in a fresh process, with this checkout importable."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "armorm", *map(str, args)], cwd=cwd, env=env, input=stdin,
                          capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("toy") / "tiny", datasets=True)


def test_tiny_model_needs_neither_torch_nor_transformers(tmp_path):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from armorm.tiny import make_tiny_model\nfrom armorm import ArmoRMPipeline\n"
            f"make_tiny_model({str(tmp_path / 'm')!r})\n"
            f"rm = ArmoRMPipeline({str(tmp_path / 'm')!r})\n"
            "print(rm([{'role': 'user', 'content': 'Hi'}, {'role': 'assistant', 'content': 'Hello'}])['score'])")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert np.isfinite(float(res.stdout.strip()))


def test_tiny_model_directory_is_complete_and_loads(toy):
    assert sorted(p.name for p in toy.iterdir()) == ["config.json", "data", "model.safetensors", "tokenizer.json",
                                                      "tokenizer_config.json"]
    assert sorted(p.name for p in (toy / "data").iterdir()) == ["pairs.jsonl", "rewardbench.jsonl", "stage1.jsonl"]
    model = armorm.ArmoRM.from_pretrained(toy)
    assert model.architecture == "LlamaForRewardModelWithGating"
    # the gating pattern comes from the Llama-3 chat template through the toy tokenizer
    tok = model.tokenizer
    assert model.gating_pattern == tok.encode("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
                                              add_special_tokens=False)
    with pytest.raises(FileExistsError):
        make_tiny_model(toy)


def test_tiny_tokenizer_matches_transformers(toy):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(toy))
    ours = armorm.ChatTokenizer.from_pretrained(toy)
    convs = [[{"role": "user", "content": "Hi there é 漢字 "}, {"role": "assistant", "content": " Hello!\n"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
              {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"},
              {"role": "assistant", "content": "6 <|eot_id|> literal"}]]
    for conv in convs:
        want = hf.apply_chat_template(conv, tokenize=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert ours.apply_chat_template(conv, tokenize=True) == list(want)
        assert want[0] == 256 and list(want).count(256) == 1  # exactly one BOS


def test_readme_offline_flow_runs_as_written(tmp_path):
    """The README's "Try it offline" block, run line by line with `armorm` on PATH."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- offline-flow -->\n```bash\n(.*?)```", text, re.S)
    assert m, "README has no offline-flow block"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shim = bindir / "armorm"
    shim.write_text(f"#!/bin/sh\nexec {sys.executable} -m armorm \"$@\"\n")
    shim.chmod(0o755)
    work = tmp_path / "w"
    work.mkdir()
    env = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = "set -euo pipefail\n" + m.group(1).replace("python -c", f"{sys.executable} -c")
    res = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert (work / "my-armorm" / "config.json").is_file()
    assert len((work / "scores.jsonl").read_text().splitlines()) == 240
    assert "Traceback" not in res.stderr


def test_cli_version_and_python_m():
    res = run_armorm("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"armorm {armorm.__version__}"
    res = run_armorm("--help")
    assert res.returncode == 0 and "make-tiny-model" in res.stdout


def test_every_cli_option_has_help_and_shows_its_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    assert set(subparsers.choices) >= {"score", "make-tiny-model", "prepare-stage1", "train-stage1",
                                       "prepare-stage2", "train-stage2", "eval-rewardbench", "assemble"}
    for name, sub in subparsers.choices.items():
        helptext = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help, f"armorm {name} {action.option_strings or action.dest}: no help text"
            if action.option_strings and action.default not in (None, False):
                default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
                assert f"(default: {default})" in " ".join(helptext.split()), \
                    f"armorm {name} {action.option_strings[0]}: the help does not show its default {default!r}"
    score_help = " ".join(subparsers.choices["score"].format_help().split())
    assert "Without --input" in score_help and "Without --model" in score_help


def test_cli_input_directory_is_a_one_line_error(toy, capsys):
    assert cli_main(["score", "--model", str(toy), "--input", str(toy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("armorm: error: ") and "is a directory" in err


def test_cli_missing_input_is_a_one_line_error(toy, tmp_path, capsys):
    assert cli_main(["score", "--model", str(toy), "--input", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.jsonl" in err and "No such file" in err


def test_cli_closed_pipe_ends_quietly(toy):
    proc = subprocess.Popen([sys.executable, "-m", "armorm", "score", "--model", str(toy), "--input",
                             str(toy / "data" / "stage1.jsonl"), "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    proc.stdout.readline()  # like `| head -1`: read one line, then go away
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 141


def test_cli_conversation_errors_name_file_and_line(toy, tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    good = json.dumps({"prompt": "Hi", "response": "Hello"})
    long = json.dumps({"prompt": "x " * 200, "response": "fine"})  # the final header beyond --max-length
    inp.write_text("\n".join([good, "", good, long]) + "\n")
    assert cli_main(["score", "--model", str(toy), "--input", str(inp), "--max-length", "64"]) == 2
    err = capsys.readouterr().err
    assert f"{inp}:4: truncation to max_length=64" in err, err
    # a conversation longer than the model allows, caught by the core, also named by file:line
    inp.write_text("\n".join([good, json.dumps({"prompt": "y " * 1100, "response": "ok"})]) + "\n")
    assert cli_main(["score", "--model", str(toy), "--input", str(inp), "--no-truncation"]) == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(inp))}:2 has \d+ tokens; the model allows at most 2048", err), err


def test_cli_no_check_finite_flag(toy, tmp_path, capsys):
    import shutil
    from armorm.safetensors_io import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(toy, bad)
    tensors = load_file(bad / "model.safetensors")
    w = tensors["model.layers.0.mlp.up_proj.weight"].copy()
    w[0, 0] = np.inf
    tensors["model.layers.0.mlp.up_proj.weight"] = w
    save_file(tensors, bad / "model.safetensors")
    assert cli_main(["score", "--model", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "holds 1 NaN/inf value" in err and "--no-check-finite" in err
    assert cli_main(["score", "--model", str(bad), "--no-check-finite"]) == 0


def test_top_objectives_do_not_depend_on_the_batch(toy, tmp_path):
    lines = (toy / "data" / "stage1.jsonl").read_text().splitlines()
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    one.write_text(lines[5] + "\n")
    many.write_text("\n".join(lines[:37]) + "\n")
    for src, dst in ((one, tmp_path / "one.out"), (many, tmp_path / "many.out")):
        assert cli_main(["score", "--model", str(toy), "--input", str(src), "--output", str(dst),
                         "--top-k", "19", "--no-progress"]) == 0
    alone = json.loads((tmp_path / "one.out").read_text())
    batched = json.loads((tmp_path / "many.out").read_text().splitlines()[5])
    assert alone == batched  # every field, top_objectives' coefficients included, to the last bit


def test_coefficients_are_row_invariant(toy):
    model = armorm.ArmoRM.from_pretrained(toy)
    g = np.random.default_rng(0).random((37, 19)).astype(np.float32)
    full = model.coefficients(g)
    for i in (0, 5, 36):
        assert np.array_equal(model.coefficients(g[i:i + 1])[0], full[i])
    np.testing.assert_allclose(full, g.astype(np.float64) @ model._core.tensor("reward_transform_matrix").T,
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("umask,fmode,dmode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_outputs_honour_the_umask(tmp_path, umask, fmode, dmode):
    from armorm.atomic import atomic_open
    from armorm.safetensors_io import save_file
    old = os.umask(umask)
    try:
        with atomic_open(tmp_path / "a.jsonl") as f:
            f.write("{}\n")
        save_file({"x": np.zeros(3, np.float32)}, tmp_path / "x.safetensors")
        toy = make_tiny_model(tmp_path / "toy")
    finally:
        os.umask(old)
    for p in (tmp_path / "a.jsonl", tmp_path / "x.safetensors", toy / "model.safetensors", toy / "config.json"):
        assert stat.S_IMODE(p.stat().st_mode) == fmode, p
    assert stat.S_IMODE(toy.stat().st_mode) == dmode


def test_assemble_directory_honours_the_umask(toy, tmp_path):
    from armorm.train.assemble import assemble
    from armorm.safetensors_io import load_file, save_file
    t = load_file(toy / "model.safetensors")
    reg = tmp_path / "regression.safetensors"
    save_file({"regression_layer.weight": t["regression_layer.weight"]}, reg)
    gating = tmp_path / "gating.safetensors"
    save_file({k: v for k, v in t.items() if k.startswith("gating.") or k == "reward_transform_matrix"}, gating,
              metadata={"gating_temperature": "10", "gating_hidden_dim": "32", "gating_n_hidden": "3"})
    old = os.umask(0o022)
    try:
        out = assemble(str(toy), str(reg), str(gating), str(tmp_path / "assembled"), quiet=True)
    finally:
        os.umask(old)
    d = Path(out["output"])
    assert stat.S_IMODE(d.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in d.iterdir() if p.is_file())


def test_pyproject_metadata_is_current():
    import tomllib
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(meta["project"]["license"], str)  # SPDX expression, not the deprecated table
    assert "version" in meta["project"]["dynamic"]  # one version, armorm.__version__
