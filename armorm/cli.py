"""The `armorm` command line (also `python -m armorm`).

    armorm score             score conversations (default: the model card's example)
    armorm make-tiny-model   write a small random ArmoRM directory (and toy datasets) to try armorm offline
    armorm prepare-stage1    stage 1: embed a multi-objective dataset with a backbone
    armorm train-stage1      stage 1: fit the regression layer (ridge per objective)
    armorm prepare-stage2    stage 2: embed preference pairs
    armorm train-stage2      stage 2: verbosity debiasing and the gating network
    armorm eval-rewardbench  RewardBench accuracies, sections and score
    armorm assemble          write an ArmoRM checkpoint from a backbone and the trained heads

Every command prints `--help` with each option's default. Input errors print
one line naming the file and line and exit 2; output files appear only
complete.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from .hub import DEFAULT_MODEL, ModelNotFoundError
from .serve import command as serve_command

EXAMPLE_PROMPT = 'What are some synonyms for the word "beautiful"?'
EXAMPLE_RESPONSES = [
    "Nicely, Beautifully, Handsome, Stunning, Wonderful, Gorgeous, Pretty, Stunning, Elegant",
    'Certainly! Here are some synonyms for the word "beautiful":\n\n1. Gorgeous\n2. Lovely\n3. Stunning\n'
    "4. Attractive\n5. Pretty\n6. Elegant\n7. Exquisite\n8. Handsome\n9. Charming\n10. Alluring\n11. Radiant\n"
    "12. Magnificent\n13. Graceful\n14. Enchanting\n15. Dazzling\n\nThese synonyms can be used in various "
    "contexts to convey the idea of beauty.",
    "Sorry i cannot answer this.",
]


class InputError(ValueError):
    """A malformed input file (the message names the line)."""


def example_conversations() -> List[List[Dict[str, str]]]:
    """The model card's three example conversations."""
    return [[{"role": "user", "content": EXAMPLE_PROMPT}, {"role": "assistant", "content": r}]
            for r in EXAMPLE_RESPONSES]


def read_jsonl(path: str) -> Tuple[List[List[Dict[str, str]]], List[Any], List[str]]:
    """Reads conversations (`messages`, or `prompt` + `response`) and optional `id`s from JSONL.

    Returns the conversations, their ids and their "file:line" locations.
    """
    from .data import DatasetError, iter_jsonl
    from .tokenizer import conversation_from_record
    if os.path.isdir(path):
        raise InputError(f"{path}: is a directory, not a JSONL file")
    convs, ids, where = [], [], []
    lines = iter_jsonl(path)
    while True:
        try:
            lineno, rec = next(lines)
        except StopIteration:
            break
        except DatasetError as e:  # not UTF-8, not JSON: the message names path:line
            raise InputError(str(e)) from None
        try:
            conv = conversation_from_record(rec)
            for j, m in enumerate(conv):
                if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    raise ValueError(f"message {j} needs string 'role' and 'content'")
            if not conv:
                raise ValueError("empty conversation")
        except ValueError as e:
            raise InputError(f"{path}:{lineno}: {e}") from None
        convs.append(conv)
        ids.append(rec.get("id"))
        where.append(f"{path}:{lineno}")
    if not convs:
        raise InputError(f"{path}: no conversations")
    return convs, ids, where


def _records(out: Any, attributes: Sequence[str], explained: List[List[Tuple[str, float]]],
             ids: Sequence[Any]) -> List[Dict[str, Any]]:
    recs = []
    for i in range(len(out.score)):
        rec: Dict[str, Any] = {} if ids[i] is None else {"id": ids[i]}
        rec["score"] = float(out.score[i])
        if "rewards" in out:
            rec["rewards"] = {a: float(v) for a, v in zip(attributes, out.rewards[i])}
            rec["gating_output"] = {a: float(v) for a, v in zip(attributes, out.gating_output[i])}
            rec["top_objectives"] = [{"objective": a, "coefficient": c} for a, c in explained[i]]
        recs.append(rec)
    return recs


def write_jsonl_atomic(path: str, records: Sequence[Dict[str, Any]]) -> None:
    """Writes one JSON object per line; the file appears only complete."""
    from .atomic import atomic_open
    with atomic_open(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _print_table(convs: Sequence[Sequence[Dict[str, str]]], recs: Sequence[Dict[str, Any]]) -> None:
    print(f"prompt: {convs[0][-2]['content'] if len(convs[0]) > 1 else ''}")
    for i, (c, r) in enumerate(zip(convs, recs), 1):
        text = " ".join(c[-1]["content"].split())
        text = text if len(text) <= 70 else text[:67] + "..."
        print(f"\n[{i}] score {r['score']:+.5f}  {text}")
        for t in r.get("top_objectives", []):
            print(f"      {t['objective']:<38} {t['coefficient']:+.5f}")
        if "rewards" in r:
            hs = [r["rewards"][a] * 5 - 0.5 for a in list(r["rewards"])[:5]]
            print("      helpsteer (0-4 scale): " + " ".join(f"{v:.3f}" for v in hs))


def cmd_score(args: argparse.Namespace) -> int:
    if _ray_requested(args):
        from .ray import cli_score
        return cli_score(args)
    from .hub import resolve_model_path
    from .model import PREPACK_FOR_BATCH_JOBS
    from .pipeline import ArmoRMPipeline
    from .progress import make_progress
    if args.output:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise InputError(f"--output {args.output}: directory {out_dir} does not exist")
    model_ref = args.model or DEFAULT_MODEL
    try:
        path = resolve_model_path(model_ref)
    except ModelNotFoundError as e:
        print(f"armorm: error: {e}.\nPass a local copy with --model DIR (a directory holding config.json, "
              f"the safetensors weights and tokenizer.json of {DEFAULT_MODEL} or another ArmoRM-style model).\n"
              "To try armorm without it: armorm make-tiny-model tiny && armorm score --model tiny "
              "(random weights, meaningless scores).", file=sys.stderr)
        return 2
    if args.input:
        convs, ids, where = read_jsonl(args.input)
    else:
        convs, ids = example_conversations(), [None] * len(EXAMPLE_RESPONSES)
        where = [f"example {i}" for i in range(1, len(convs) + 1)]
    rm = ArmoRMPipeline(path, torch_dtype=args.dtype, max_length=args.max_length, num_threads=args.threads,
                        truncation=not args.no_truncation, batch_tokens=args.batch_tokens,
                        check_finite=not args.no_check_finite, prepack=PREPACK_FOR_BATCH_JOBS)
    seqs = rm.encode(convs, names=where)
    show = not args.no_progress and len(seqs) > 1 and (args.progress or sys.stderr.isatty())
    bare = rm.model.config.kind in ("backbone", "causallm")
    out = rm.model.score_sequences(seqs, fields=["hidden_state"] if bare else None,
                                   batch_tokens=args.batch_tokens, progress=make_progress(len(seqs), show),
                                   names=where)
    if "score" not in out:
        print(f"armorm: error: this checkpoint has no reward head (a bare {rm.model.architecture})", file=sys.stderr)
        return 2
    explained = rm.model.explain(out, args.top_k) if "gating_output" in out else [[] for _ in seqs]
    recs = _records(out, rm.model.attributes, explained, ids)
    if args.output:
        write_jsonl_atomic(args.output, recs)
        print(f"wrote {len(recs)} scores to {args.output}", file=sys.stderr)
    elif args.input:
        for r in recs:
            print(json.dumps(r, ensure_ascii=False))
    else:
        _print_table(convs, recs)
    return 0


def _int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        return v
    return parse


def _show_progress(args: argparse.Namespace) -> bool:
    return not args.no_progress and (args.progress or sys.stderr.isatty())


def cmd_prepare(args: argparse.Namespace) -> int:
    """prepare-stage1 and prepare-stage2: the same sharded, resumable loop (armorm.train.prepare), each
    stage's own options."""
    if _ray_requested(args):
        from .ray import cli_prepare
        return cli_prepare(args, stage=int(args.stage[-1]))
    import importlib
    stage = importlib.import_module(f".train.{args.stage}", __package__)
    own = {"objectives": args.objectives} if args.stage == "stage1" else {"seq_len": args.seq_len}
    seed = None if getattr(args, "no_shuffle", False) else args.seed
    return _print_prepared(lambda: stage.prepare(
        args.model, args.dataset, args.output, n_shards=args.n_shards, shard_idx=args.shard_idx, split=args.split,
        name=args.name, batch_tokens=args.batch_tokens, embeddings_dtype=args.embeddings_dtype, torch_dtype=args.dtype,
        seed=seed, shard_mode=args.shard_mode, chunk_rows=args.chunk_rows, num_threads=args.threads,
        progress=_show_progress(args), overwrite=args.overwrite, restart=args.restart, quiet=False,
        check_finite=not args.no_check_finite, **own))


def _print_prepared(prepare: Callable[[], str]) -> int:
    """Runs a preparation on the shared loop and prints its file; an interrupted one says how to resume."""
    try:
        path = prepare()
    except ImportError as e:
        print(f"armorm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("armorm: interrupted; finished chunks are kept: rerun the same command to resume", file=sys.stderr)
        return 130
    print(path)
    return 0


def cmd_train_stage1(args: argparse.Namespace) -> int:
    from .train import stage1
    result = stage1.train(args.embeddings, args.output, report=args.report,
                          alphas=args.alphas or stage1.DEFAULT_ALPHAS, val_fraction=args.val_fraction,
                          seed=args.seed, objectives=args.objectives,
                          solver=args.solver, form=args.form, gram=args.gram, skip_unlabeled=args.skip_unlabeled,
                          chunk_rows=args.chunk_rows, max_workers=args.workers, progress=_show_progress(args))
    print(result.table())
    print(f"wrote regression_layer.weight {list(result.weight.shape)} to {result.output} "
          f"and the report to {result.report_path}", file=sys.stderr)
    return 0


def cmd_train_stage2(args: argparse.Namespace) -> int:
    from .train import stage2
    cfg = stage2.GatingConfig(hidden_dim=args.hidden_dim, n_hidden=args.n_hidden, temperature=args.temperature,
                              dropout=args.dropout, logit_scale_init=args.logit_scale, lr=args.lr,
                              weight_decay=args.weight_decay, steps=args.steps, batch_size=args.batch_size,
                              val_fraction=args.val_fraction, split_seed=args.split_seed, seed=args.seed,
                              eval_every=args.eval_every, backend=args.backend)
    res = stage2.train(args.preference, args.regression, args.output, reference=args.reference, config=cfg,
                       verbosity_index=None if args.no_debias else args.verbosity_index,
                       corr_threshold=args.corr_threshold, report=args.report, blas_threads=args.blas_threads,
                       progress=_show_progress(args))
    print(res.table())
    print(f"wrote the gating network and reward_transform_matrix to {res.output}", file=sys.stderr)
    return 0


def _check_plot(args: argparse.Namespace) -> None:
    """--plot FILE: matplotlib present, a format it writes, an existing directory; checked before the work."""
    if getattr(args, "plot", None):
        try:
            from . import plot
        except ImportError as e:
            raise InputError(f"--plot: {e}") from None
        plot.check_target(args.plot)


def _write_plot(args: argparse.Namespace, report: Any) -> None:
    """--plot FILE: the report's per-subset bars (armorm.plot.rewardbench), written whole or not at all."""
    if getattr(args, "plot", None):
        from . import plot
        plot.save(plot.rewardbench(report), args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)


def _eval_input(args: argparse.Namespace, module: Any, **model_kwargs: Any) -> Any:
    """The scores of a RewardBench evaluation from the input given: `module` (train.rewardbench or
    train.rewardbench2) reads a scores file, computes the head on prepared embeddings, or runs the model."""
    try:
        if args.scores:
            return module.read_scores_file(args.scores)
        if args.embeddings:
            if not args.regression or not args.gating:
                raise ValueError("--embeddings needs --regression FILE and --gating FILE")
            return module.scores_from_embeddings(args.embeddings, args.regression, args.gating)
        if not args.dataset:
            raise ValueError("--model needs --dataset PATH")
        return module.scores_from_model(args.model, args.dataset, split=args.split, batch_tokens=args.batch_tokens,
                                        num_threads=args.threads, torch_dtype=args.dtype,
                                        progress=_show_progress(args), check_finite=not args.no_check_finite,
                                        **model_kwargs)
    except ImportError as e:  # an optional reader (pyarrow, datasets) is missing: the message says which
        raise InputError(str(e)) from None


def _eval_report(args: argparse.Namespace, module: Any, res: Any) -> int:
    print(module.format_table(res))
    if args.output:
        module.write_json(args.output, res)
        print(f"wrote {args.output}", file=sys.stderr)
    _write_plot(args, res)
    return 0


def cmd_eval_rewardbench(args: argparse.Namespace) -> int:
    from .train import rewardbench as rb
    _check_plot(args)
    subsets, c, r = _eval_input(args, rb)
    return _eval_report(args, rb, rb.evaluate_scores(subsets, c, r, rb.load_prior(args.prior_sets)))


def cmd_eval_rewardbench2(args: argparse.Namespace) -> int:
    from .train import rewardbench2 as rb2
    _check_plot(args)
    prompts = _eval_input(args, rb2, harness_tokenization=args.harness_tokenization, max_length=args.max_length,
                          truncation=not args.no_truncation)
    return _eval_report(args, rb2, rb2.evaluate(prompts))


def cmd_prepare_rewardbench2(args: argparse.Namespace) -> int:
    from .train import rewardbench2 as rb2
    return _print_prepared(lambda: rb2.prepare(
        args.model, args.dataset, args.output, split=args.split, name=args.name,
        harness_tokenization=args.harness_tokenization, max_length=args.max_length,
        truncation=not args.no_truncation, embeddings_dtype=args.embeddings_dtype, torch_dtype=args.dtype,
        batch_tokens=args.batch_tokens, num_threads=args.threads, progress=_show_progress(args),
        overwrite=args.overwrite, check_finite=not args.no_check_finite, n_shards=args.n_shards,
        shard_idx=args.shard_idx, chunk_rows=args.chunk_rows, restart=args.restart, quiet=False))


def cmd_assemble(args: argparse.Namespace) -> int:
    from .train.assemble import assemble
    out = assemble(args.backbone, args.regression, args.gating, args.output, tokenizer_dir=args.tokenizer,
                   overwrite=args.overwrite, quiet=False)
    print(out["output"])
    return 0


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from .tiny import make_tiny_model
    try:
        out = make_tiny_model(args.output, seed=args.seed, datasets=args.datasets, overwrite=args.overwrite)
    except FileExistsError as e:
        raise InputError(str(e)) from None
    print(out)
    print("random toy weights: its scores mean nothing (use it to try armorm without the real model)",
          file=sys.stderr)
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default after its help (flags and unset options have none to show) and keeps
    the description's paragraphs."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(super(_HelpFormatter, self)._fill_text(par, width, indent) for par in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text or action.default is None or action.default is False \
                or action.default == argparse.SUPPRESS or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) \
            else action.default
        return f"{text} (default: {default})"


DTYPE_CHOICES = ["bfloat16", "float32", "float16", "auto"]


def _add_common(s: argparse.ArgumentParser, threads: bool = True, progress: bool = True) -> None:
    if threads:
        s.add_argument("--threads", type=_int_at_least(1), default=None,
                       help="CPU threads (default: ARMORM_NUM_THREADS, else every core this process may use)")
    if progress:
        s.add_argument("--progress", action="store_true", help="show a progress bar even when not on a terminal")
        s.add_argument("--no-progress", action="store_true", help="never show a progress bar")


def _add_check_finite(s: argparse.ArgumentParser) -> None:
    s.add_argument("--no-check-finite", action="store_true",
                   help="load a checkpoint even if a weight holds NaN/inf (by default it is refused, naming "
                        "the tensor) and skip that scan of the weights")


_RAY_OPTIONS = ("ray_address", "actors", "threads_per_actor", "device", "batch_rows", "input_format",
                "output_format")


def _add_ray_arguments(s: argparse.ArgumentParser, files: bool) -> None:
    """--ray and its options (armorm/ray.py; docs/ray.md). `files`: score's batches, file formats and
    --overwrite (the preparations' unit of work is their --chunk-rows)."""
    g = s.add_argument_group("Ray (pip install 'armorm[ray]'; docs/ray.md)")
    g.add_argument("--ray", action="store_true", help="run on a Ray cluster with Ray Data: a pool of actors, each "
                   "loading the model once")
    g.add_argument("--ray-address", metavar="ADDR", help="the cluster to join (e.g. 10.0.0.1:6379, or auto for "
                   "the one `ray start` runs on this machine; default: $RAY_ADDRESS, else a Ray instance started "
                   "on this machine for this run)")
    g.add_argument("--actors", type=_int_at_least(1), metavar="N",
                   help="actors, each holding one copy of the model (default: 1)")
    g.add_argument("--threads-per-actor", type=_int_at_least(1), metavar="N",
                   help="CPU threads of each actor, reserved from Ray (default: 1)")
    g.add_argument("--device", choices=["cpu", "cuda"], help="where each actor runs the model; cuda reserves one "
                   "GPU per actor (default: cpu)")
    if files:
        g.add_argument("--batch-rows", type=_int_at_least(1), metavar="N", help="rows per Ray Data batch, scored "
                       "in one packed call; a batch is the unit redone when an actor dies (default: 256)")
        g.add_argument("--input-format", choices=["parquet", "jsonl"], help="format of --input (default: from "
                       "the file names)")
        g.add_argument("--output-format", choices=["parquet", "jsonl"], help="format of the files written to "
                       "--output DIR (default: the input's)")
        g.add_argument("--overwrite", action="store_true", help="replace a non-empty --output DIR")


def _ray_requested(args: argparse.Namespace) -> bool:
    """True with --ray; a Ray option without --ray is an error rather than silently ignored."""
    if getattr(args, "ray", False):
        return True
    given = [o for o in _RAY_OPTIONS if getattr(args, o, None) is not None]
    if given:
        raise InputError(f"--{given[0].replace('_', '-')} needs --ray")
    return False


def _add_plot(s: argparse.ArgumentParser) -> None:
    """--plot for the evaluation commands: each calls _check_plot(args) first and _write_plot(args, report)
    last (eval-rewardbench2 too: armorm.plot.rewardbench reads its result as it reads RewardBench 1's)."""
    s.add_argument("--plot", metavar="FILE.png", help="also draw the per-subset scores as bars to FILE "
                   "(.png, .svg, .pdf; needs matplotlib: pip install 'armorm[plot]')")


def _add_prepare_arguments(s: argparse.ArgumentParser, chunk_rows: int) -> None:
    """The options prepare-stage1 and prepare-stage2 share: model, dataset, output, sharding, batching, resume."""
    s.add_argument("--model", metavar="DIR", required=True, help="backbone / reward model directory or hub id")
    s.add_argument("--dataset", metavar="PATH", required=True,
                   help="JSONL, Parquet, a datasets save_to_disk directory, or a hub dataset id")
    _add_output_arguments(s, chunk_rows)
    s.add_argument("--shard-mode", default="contiguous", choices=["contiguous", "strided"],
                   help="datasets' shard(): contiguous blocks (datasets >= 3.1) or every n-th row "
                        "(datasets < 3.1)")
    s.add_argument("--split", default="train", help="dataset split (RewardBench: filtered)")
    s.add_argument("--batch-tokens", type=_int_at_least(1), default=8192, help="tokens per packed batch")
    s.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES,
                   help="dtype the backbone weights are held in, as the reference's")
    s.add_argument("--seed", type=int, default=0, help="shuffle seed before sharding, as the reference's")
    _add_check_finite(s)
    _add_common(s)
    _add_ray_arguments(s, files=False)


def _add_output_arguments(s: argparse.ArgumentParser, chunk_rows: int) -> None:
    """Where a preparation on the shared loop (prepare-stage1/2, prepare-rewardbench2) writes, and its resume."""
    s.add_argument("--output", metavar="DIR", required=True, help="directory for the shard file")
    s.add_argument("--n-shards", type=_int_at_least(1), default=1, help="number of shards")
    s.add_argument("--shard-idx", type=_int_at_least(1), default=1, help="this shard, 1-based as the reference")
    s.add_argument("--name", help="file name stem (default: the dataset's last path component)")
    s.add_argument("--embeddings-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="stored embedding dtype")
    s.add_argument("--chunk-rows", type=_int_at_least(1), default=chunk_rows, help="rows per resumable chunk")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output made with other settings")
    s.add_argument("--restart", action="store_true", help="discard the partial work of an interrupted run")


def _add_eval_inputs(s: argparse.ArgumentParser, scores_help: str, embeddings_what: str) -> None:
    """The three inputs of the RewardBench evaluations: a scores file, prepared embeddings with training's
    regression and gating files, or a model (its dataset option is the command's)."""
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--scores", metavar="FILE", help=scores_help)
    g.add_argument("--embeddings", nargs="+", metavar="GLOB", help=f"{embeddings_what} (with --regression and "
                   "--gating)")
    g.add_argument("--model", metavar="DIR", help="an ArmoRM checkpoint (with --dataset)")
    s.add_argument("--regression", metavar="FILE", help="train-stage1 output (with --embeddings)")
    s.add_argument("--gating", metavar="FILE", help="train-stage2 output (with --embeddings)")


def _add_rewardbench2_model_arguments(s: argparse.ArgumentParser, required: bool = False) -> None:
    """The options eval-rewardbench2 --model and prepare-rewardbench2 share: dataset, tokenization, batching."""
    if required:
        s.add_argument("--model", metavar="DIR", required=True, help="backbone or reward model directory or hub id")
    s.add_argument("--dataset", metavar="PATH", required=required,
                   help="allenai/reward-bench-2: its Parquet file or downloaded directory, JSONL, or a hub id"
                        + ("" if required else " (with --model)"))
    s.add_argument("--split", default="test", help="dataset split")
    s.add_argument("--harness-tokenization", action="store_true",
                   help="tokenize as the official harness: the chat template rendered to text, then tokenized "
                        "again with the tokenizer's special tokens (two BOS tokens for Llama 3); by default the "
                        "model card's single BOS")
    s.add_argument("--max-length", type=_int_at_least(1), default=2048,
                   help="cut longer sequences on the right, the BOS tokens counting (the harness's length)")
    s.add_argument("--no-truncation", action="store_true", help="score whole sequences")
    s.add_argument("--batch-tokens", type=_int_at_least(1), default=8192, help="tokens per packed batch")
    s.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES, help="dtype the backbone weights are held in")
    _add_check_finite(s)
    _add_common(s)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="armorm", formatter_class=_HelpFormatter,
                                description="ArmoRM-style multi-objective reward models on a C core: scoring, "
                                            "training and evaluation. `armorm COMMAND --help` lists a command's "
                                            "options and their defaults.")
    p.add_argument("--version", action="version", version=f"armorm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, description: Optional[str] = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=description or help, formatter_class=_HelpFormatter)

    s = command("score", "score conversations (default: the model card's example)",
                "Scores conversations with an ArmoRM-style reward model.\n\n"
                "Without --input it scores the model card's example (three answers to a request for synonyms "
                "of \"beautiful\") and prints a table. Without --model it uses " + DEFAULT_MODEL + " from the "
                "local Hugging Face cache, or downloads it when huggingface_hub is installed and the hub is "
                "reachable; otherwise it stops and asks for --model DIR. With --input, one JSON result per "
                "line goes to --output (written atomically) or to stdout.")
    s.add_argument("--model", metavar="DIR", help=f"model directory or hub id (default: {DEFAULT_MODEL})")
    s.add_argument("--input", metavar="JSONL",
                   help="one conversation per line: {\"messages\": [...]} or {\"prompt\", \"response\"}, and an "
                        "optional \"id\" (default: the model card's example); with --ray: Parquet or JSONL files, "
                        "a directory or a glob, rows may also be chosen/rejected pairs")
    s.add_argument("--output", metavar="JSONL", help="write one result per line here, atomically "
                   "(default: stdout); with --ray: a directory of Parquet or JSONL files")
    s.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES,
                   help="dtype the backbone weights are held in, as the model card's torch_dtype")
    s.add_argument("--batch-tokens", type=_int_at_least(1), default=8192, help="tokens per packed batch")
    s.add_argument("--max-length", type=_int_at_least(1), default=4096,
                   help="truncate conversations to this many tokens (an error if that cuts the final "
                        "assistant header)")
    s.add_argument("--no-truncation", action="store_true", help="score whole conversations")
    s.add_argument("--top-k", type=_int_at_least(0), default=3, help="objectives listed per conversation")
    _add_check_finite(s)
    _add_common(s)
    _add_ray_arguments(s, files=True)
    s.set_defaults(func=cmd_score)
    serve_command.add_parser(sub)

    s = command("make-tiny-model", "write a small random ArmoRM directory (and toy datasets) to try armorm offline",
                "Writes a toy ArmoRM directory: config.json (LlamaForRewardModelWithGating, 2 layers, hidden 64), "
                "random weights and a byte-level tokenizer with the Llama-3 chat template. Its scores mean "
                "nothing; it needs no download and no torch. With --datasets, OUTPUT/data/ gets small synthetic "
                "stage1.jsonl, pairs.jsonl and rewardbench.jsonl files for the training and evaluation commands.")
    s.add_argument("output", metavar="OUTPUT", help="directory to create")
    s.add_argument("--datasets", action="store_true", help="also write toy datasets to OUTPUT/data/")
    s.add_argument("--seed", type=int, default=0, help="random seed of the weights and datasets")
    s.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    s.set_defaults(func=cmd_make_tiny_model)

    s = command("prepare-stage1", "stage 1: embed a multi-objective dataset with a backbone",
                "Formats each row's `messages` with the model's chat template, runs the backbone (packed "
                "batches, no padding) and writes {embeddings [N,H], labels [N,K]} to "
                "OUTPUT/<name>-<shard:05d>-of-<n_shards:05d>.safetensors, as the reference's "
                "stage-1_prepare.py. Resumable: rerun the same command after an interruption.")
    _add_prepare_arguments(s, chunk_rows=1024)
    s.add_argument("--objectives", nargs="+", metavar="NAME",
                   help="label columns, in order (names or comma lists; default: the 19 ArmoRM attributes)")
    s.set_defaults(func=cmd_prepare, stage="stage1")

    s = command("train-stage1", "stage 1: fit the regression layer (ridge per objective)",
                "Ridge regression without intercept per objective on its labelled rows, alpha chosen by "
                "validation MSE on an 80/20 split (scikit-learn's train_test_split with random_state 42, "
                "reproduced), as the reference's stage-1_train.py; writes regression_layer.weight [K,H] and a "
                "JSON report.")
    s.add_argument("--embeddings", nargs="+", metavar="GLOB", required=True,
                   help="stage-1 files: globs, directories or files (rows taken in sorted path order)")
    s.add_argument("--output", metavar="FILE", required=True, help="safetensors file for regression_layer.weight")
    s.add_argument("--report", metavar="FILE", help="JSON report (default: OUTPUT with a .json suffix)")
    s.add_argument("--alphas", nargs="+", type=float, default=None,
                   help="ridge penalties (default: 1e-4 1e-3 ... 1e4, the reference's grid)")
    s.add_argument("--val-fraction", type=float, default=0.2, help="validation fraction")
    s.add_argument("--seed", type=int, default=42, help="split seed, as the reference's")
    s.add_argument("--objectives", nargs="+", metavar="NAME", help="names of the label columns (default: from "
                   "the files' metadata, else the 19 ArmoRM attributes)")
    s.add_argument("--solver", default="auto", choices=["auto", "mixed", "cholesky", "eigh", "lu"],
                   help="linear solver for the alpha grid: mixed = float32 Cholesky factors refined to float64 "
                        "solutions (needs scipy), cholesky = one float64 factorization per alpha; auto = mixed "
                        "with scipy")
    s.add_argument("--gram", default="auto", choices=["auto", "float64", "bf16"],
                   help="X^T X accumulation: float64 (exact) or bf16 (bf16 embeddings on the core's AVX512_BF16 "
                        "GEMM, solutions then refined against the exact rows in float64); auto = bf16 where it "
                        "can")
    s.add_argument("--form", default="auto", choices=["auto", "primal", "dual"],
                   help="primal (H x H) or dual (n x n) normal equations; auto = the smaller")
    s.add_argument("--skip-unlabeled", action="store_true",
                   help="write a zero row (marked in the report) for an objective without training or "
                        "validation labels instead of failing")
    s.add_argument("--chunk-rows", type=_int_at_least(1), default=4096, help="rows read per step")
    s.add_argument("--workers", type=_int_at_least(1), default=None,
                   help="parallel solves, each with a one-thread BLAS, when threadpoolctl is installed "
                        "(default: the usable CPUs, at most 8)")
    _add_common(s, threads=False)
    s.set_defaults(func=cmd_train_stage1)

    s = command("prepare-stage2", "stage 2: embed preference pairs (last token and gating position)",
                "Runs both sides of each pair (chosen/rejected message lists, or prompt + chosen/rejected "
                "strings) through the backbone and writes embeddings [N,2,H] and prompt_embeddings [N,2,H] to "
                "OUTPUT/<name>-<shard>-of-<n>.safetensors.")
    _add_prepare_arguments(s, chunk_rows=512)
    s.add_argument("--seq-len", type=_int_at_least(1), default=8192,
                   help="skip pairs with a side longer than this many tokens")
    s.add_argument("--no-shuffle", action="store_true", help="keep the dataset order (RewardBench: use it)")
    s.set_defaults(func=cmd_prepare, stage="stage2")

    s = command("train-stage2", "stage 2: verbosity debiasing and the gating network",
                "Computes reward_transform_matrix (verbosity debiasing) and trains the gating network on "
                "prepare-stage2 files; writes both to OUTPUT (safetensors) and a JSON report.")
    s.add_argument("--preference", nargs="+", metavar="GLOB", required=True, help="prepare-stage2 files")
    s.add_argument("--regression", metavar="FILE", required=True, help="train-stage1 output")
    s.add_argument("--reference", nargs="+", metavar="GLOB", help="debiasing set (default: the preference set)")
    s.add_argument("--output", metavar="FILE", required=True, help="safetensors file for the gating network "
                   "and reward_transform_matrix")
    s.add_argument("--report", metavar="FILE", help="JSON report (default: OUTPUT with a .json suffix)")
    from .train.stage2 import CORR_THRESHOLD, VERBOSITY_INDEX, GatingConfig
    g = GatingConfig()  # the defaults below are the library's (the head sizes: the model description's)
    s.add_argument("--verbosity-index", type=int, default=VERBOSITY_INDEX,
                   help="row of the verbosity objective among the regression layer's objectives")
    s.add_argument("--corr-threshold", type=float, default=CORR_THRESHOLD,
                   help="debiasing: smallest penalty whose Spearman correlation with verbosity is at most this")
    s.add_argument("--no-debias", action="store_true", help="reward_transform_matrix = identity")
    s.add_argument("--hidden-dim", type=_int_at_least(1), default=g.hidden_dim, help="width of the gating MLP's "
                   "hidden layers")
    s.add_argument("--n-hidden", type=_int_at_least(0), default=g.n_hidden, help="hidden layers of the gating MLP")
    s.add_argument("--temperature", type=float, default=g.temperature,
                   help="softmax temperature of the gating output")
    s.add_argument("--dropout", type=float, default=g.dropout, help="dropout after each hidden ReLU")
    s.add_argument("--logit-scale", type=float, default=g.logit_scale_init, help="initial logit_scale (learned)")
    s.add_argument("--lr", type=float, default=g.lr, help="AdamW learning rate (cosine annealed)")
    s.add_argument("--weight-decay", type=float, default=g.weight_decay, help="AdamW weight decay")
    s.add_argument("--steps", type=_int_at_least(1), default=g.steps, help="training steps")
    s.add_argument("--batch-size", type=_int_at_least(1), default=g.batch_size, help="pairs per step (sampled "
                   "with replacement)")
    s.add_argument("--val-fraction", type=float, default=g.val_fraction, help="validation fraction")
    s.add_argument("--split-seed", type=int, default=g.split_seed, help="train/validation split seed")
    s.add_argument("--seed", type=int, default=g.seed, help="initialisation, batch sampling and dropout seed")
    s.add_argument("--eval-every", type=_int_at_least(0), default=g.eval_every,
                   help="validation every N steps (0: at the end)")
    s.add_argument("--backend", choices=["auto", "core", "numpy"], default=g.backend,
                   help="gating matmuls: the C core's bf16 GEMMs (fp32 sums, fp32 weights and optimizer), NumPy "
                        "float32, or auto (core where the CPU has AVX512_BF16)")
    s.add_argument("--blas-threads", type=_int_at_least(1), default=None,
                   help="threads for the core's GEMMs, or BLAS threads for numpy (needs threadpoolctl); "
                        "default: every core / the library's")
    _add_common(s, threads=False)
    s.set_defaults(func=cmd_train_stage2)

    s = command("eval-rewardbench", "RewardBench accuracies, sections and score",
                "Per-subset accuracy (ties wrong), sections weighted by the official example counts, the "
                "four-section mean and, with --prior-sets, the leaderboard score. Three inputs: a scores file, "
                "prepare-stage2 embeddings of RewardBench with the regression and gating files, or a model and "
                "the dataset end to end.")
    _add_eval_inputs(s, "JSONL rows: subset, chosen_score, rejected_score", "prepare-stage2 files of RewardBench")
    s.add_argument("--dataset", metavar="PATH", help="RewardBench's filtered split, Parquet or JSONL (with --model)")
    s.add_argument("--split", default="filtered", help="dataset split (with --model)")
    s.add_argument("--prior-sets", metavar="NUM|FILE", help="Prior Sets percentage, or JSON of the four accuracies")
    s.add_argument("--output", metavar="FILE", help="write the results as JSON")
    _add_plot(s)
    s.add_argument("--batch-tokens", type=_int_at_least(1), default=8192, help="tokens per packed batch "
                   "(with --model)")
    s.add_argument("--dtype", default="bfloat16", choices=DTYPE_CHOICES,
                   help="dtype the backbone weights are held in (with --model)")
    _add_check_finite(s)
    _add_common(s)
    s.set_defaults(func=cmd_eval_rewardbench)

    s = command("eval-rewardbench2", "RewardBench 2: best-of-4 subsets, Ties and the final score",
                "Scores every completion on its own, then applies the official harness's rules: a prompt outside "
                "Ties counts 1/n when its correct completion has the top score shared by n completions, Ties by "
                "its weighted accuracy-and-margin formula over ref:k / tied:k pairs; the score is the unweighted "
                "mean of the subsets (docs/rewardbench2.md). Three inputs: a scores file, prepare-rewardbench2 "
                "embeddings with the regression and gating files, or a model and the dataset end to end.")
    _add_eval_inputs(s, "JSONL, one prompt per line: id, subset, num_correct, scores", "prepare-rewardbench2 files")
    s.add_argument("--output", metavar="FILE", help="write the subsets, the score and every prompt's result as JSON "
                   "(atomically)")
    _add_plot(s)
    _add_rewardbench2_model_arguments(s)
    s.set_defaults(func=cmd_eval_rewardbench2)

    s = command("prepare-rewardbench2", "RewardBench 2: embed every completion with a backbone",
                "Runs every completion of RewardBench 2 through the backbone once and writes the last-token "
                "embeddings [M,H], one gating-position embedding per prompt [P,H], the completion counts, "
                "num_correct, ids and subsets to OUTPUT/<name>-00001-of-00001.safetensors, for "
                "eval-rewardbench2 --embeddings with any regression and gating files. Prompts stay in dataset "
                "order; they are embedded in chunks, each kept when done, so an interrupted run resumes when "
                "the same command is run again. --n-shards N writes shard --shard-idx of N (contiguous "
                "prompts); eval-rewardbench2 --embeddings reads the shards together.")
    _add_output_arguments(s, chunk_rows=128)
    _add_rewardbench2_model_arguments(s, required=True)
    s.set_defaults(func=cmd_prepare_rewardbench2)

    s = command("assemble", "write an ArmoRM checkpoint from a backbone and the trained heads",
                "Writes a complete <Family>ForRewardModelWithGating directory (LlamaForRewardModelWithGating "
                "for a Llama backbone, Gemma2ForRewardModelWithGating, Qwen3... otherwise): the backbone's "
                "tensors (hard-linked when possible), the regression layer, the gating network and "
                "reward_transform_matrix, config.json and the tokenizer files. The directory appears complete or not at all.")
    s.add_argument("--backbone", metavar="DIR", required=True, help="the backbone checkpoint directory")
    s.add_argument("--regression", metavar="FILE", required=True, help="train-stage1 output")
    s.add_argument("--gating", metavar="FILE", required=True, help="train-stage2 output")
    s.add_argument("--output", metavar="DIR", required=True, help="directory to create")
    s.add_argument("--tokenizer", metavar="DIR", help="tokenizer files from here (default: the backbone's)")
    s.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    s.set_defaults(func=cmd_assemble)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # the reader of stdout went away (`armorm score ... | head`): end quietly, as other tools do
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return 141
    except (InputError, ValueError, RuntimeError) as e:
        print(f"armorm: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a missing or unreadable file, a directory given as a file, a full disk
        what = f"{e.filename}: " if e.filename else ""
        print(f"armorm: error: {what}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("armorm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
