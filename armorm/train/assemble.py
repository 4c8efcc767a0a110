"""Assembling an ArmoRM checkpoint directory from a backbone and the two trained heads.

`assemble(backbone, regression, gating, output)` writes:

- `config.json`: the backbone's, with `architectures: ["LlamaForRewardModelWithGating"]`
  and the head keys (`num_objectives`, `gating_temperature`,
  `gating_hidden_dim`, `gating_n_hidden`);
- the tokenizer files of the backbone (or of `tokenizer_dir`);
- the backbone weights under ArmoRM's names (`model.` + the LlamaModel name):
  a file that already holds only `model.*` tensors is hard-linked (copied
  when the file system cannot link); otherwise (a bare LlamaModel
  `save_pretrained` directory, or a file with other heads in it) a new file
  is written with the backbone tensors renamed, streamed tensor by tensor in
  row chunks, never whole in memory;
- `model-armorm-head.safetensors` with `regression_layer.weight`,
  `reward_transform_matrix`, `gating.layers.*`, `gating.logit_scale`
  (float32), and `model.safetensors.index.json` mapping every tensor.

The directory is built under a temporary name next to `output` and renamed
into place when complete.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Iterator, Optional, Union

import numpy as np

from ..atomic import make_temp_dir
from ..config import load_config, weight_files
from ..safetensors_io import SafetensorsFile, save_file
from .stage2 import load_gating, load_regression

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json"]
HEAD_FILE = "model-armorm-head.safetensors"
_NOT_BACKBONE = ("lm_head.", "score.", "regression_layer.", "reward_transform_matrix", "gating.")


def _backbone_name(name: str) -> Optional[str]:
    """ArmoRM's name for a stored tensor, or None when it is not part of the backbone."""
    bare = name[len("model."):] if name.startswith("model.") else name
    if name.startswith(_NOT_BACKBONE) or bare.startswith(_NOT_BACKBONE):
        return None
    if not bare.startswith(("embed_tokens.", "layers.", "norm.", "rotary_emb.")):
        return None
    return "model." + bare


def _rows(f: SafetensorsFile, name: str, budget: int = 64 << 20) -> Iterator[np.ndarray]:
    t = f.info(name)
    if not t.shape:
        yield f.read(name)
        return
    step = max(1, budget // max(t.row_bytes, 1))
    for a in range(0, t.shape[0], step):
        yield f.read_rows(name, a, min(t.shape[0], a + step))


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
        return "linked"
    except OSError:
        shutil.copy2(src, dst)
        return "copied"


def assemble(backbone: Union[str, os.PathLike], regression: Union[str, os.PathLike], gating: Union[str, os.PathLike],
             output: Union[str, os.PathLike], *, tokenizer_dir: Optional[Union[str, os.PathLike]] = None,
             overwrite: bool = False, quiet: bool = True) -> Dict[str, Any]:
    """Writes the checkpoint directory; returns a summary {output, files: {name: linked|copied|written}}."""
    backbone = os.fspath(backbone)
    output = os.path.abspath(os.fspath(output))
    cfg = load_config(backbone)
    raw = dict(cfg.raw)
    H = cfg.hidden_size
    W, _ = load_regression(regression)
    params, T, hc = load_gating(gating)
    K = W.shape[0]
    if W.shape[1] != H:
        raise ValueError(f"the regression weight is [{K}, {W.shape[1]}] but the backbone's hidden size is {H}")
    if T.shape[0] != K:
        raise ValueError(f"the gating file has {T.shape[0]} objectives, the regression weight {K}")
    if hc["input_dim"] != H:
        raise ValueError(f"the gating network takes {hc['input_dim']} inputs but the backbone's hidden size is {H}")
    if os.path.exists(output) and not overwrite:
        raise ValueError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    files = weight_files(backbone)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = make_temp_dir(parent, os.path.basename(output))
    summary: Dict[str, str] = {}
    try:
        weight_map: Dict[str, str] = {}
        total = 0
        for path in files:
            f = SafetensorsFile(path)
            mapping = {n: _backbone_name(n) for n in f.keys()}
            keep = {n: m for n, m in mapping.items() if m is not None}
            if not keep:
                continue
            base = os.path.basename(path)
            if base == HEAD_FILE:
                base = "backbone-" + base
            if all(n == m for n, m in keep.items()) and len(keep) == len(mapping):
                summary[base] = _link_or_copy(path, os.path.join(tmp, base))
            else:
                specs = {m: (f.info(n).dtype, f.info(n).shape, _rows(f, n)) for n, m in keep.items()}
                save_file(specs, os.path.join(tmp, base), metadata={"format": "pt"})
                summary[base] = "written"
            for n, m in keep.items():
                if m in weight_map:
                    raise ValueError(f"tensor {m} occurs in two backbone files ({weight_map[m]}, {base})")
                weight_map[m] = base
                total += f.info(n).end - f.info(n).begin
        if "model.embed_tokens.weight" not in weight_map:
            raise ValueError(f"{backbone}: no embed_tokens.weight among its tensors; is it a Llama backbone?")
        head = {"regression_layer.weight": W.astype(np.float32), "reward_transform_matrix": T.astype(np.float32)}
        head.update({k: v.astype(np.float32) for k, v in sorted(params.items())})
        save_file(head, os.path.join(tmp, HEAD_FILE), metadata={"format": "pt"})
        summary[HEAD_FILE] = "written"
        for k, v in head.items():
            weight_map[k] = HEAD_FILE
            total += v.nbytes
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as fh:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
        raw["architectures"] = ["LlamaForRewardModelWithGating"]
        raw.update(num_objectives=K, gating_temperature=hc["temperature"], gating_hidden_dim=hc["hidden_dim"],
                   gating_n_hidden=hc["n_hidden"])
        for k in ("auto_map",):
            raw.pop(k, None)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as fh:
            json.dump(raw, fh, indent=2)
        tdir = os.fspath(tokenizer_dir) if tokenizer_dir is not None else backbone
        copied = []
        for name in TOKENIZER_FILES:
            p = os.path.join(tdir, name)
            if os.path.isfile(p):
                shutil.copy2(p, os.path.join(tmp, name))
                copied.append(name)
        if "tokenizer.json" not in copied:
            raise ValueError(f"{tdir} has no tokenizer.json; ArmoRM scoring needs the tokenizer "
                             "(pass tokenizer_dir= / --tokenizer DIR)")
        for name in copied:
            summary[name] = "copied"
        summary["config.json"] = "written"
        summary["model.safetensors.index.json"] = "written"
        if os.path.exists(output):
            old = output + ".old-" + os.path.basename(tmp)
            os.replace(output, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not quiet:
        for k, v in summary.items():
            print(f"  {v:>7}  {k}")
    return {"output": output, "files": summary, "num_objectives": K, "hidden_size": H}
