"""The drop-in model: `ArmoRM.from_pretrained(path)(input_ids)`.

`ArmoRM` loads a Hugging Face reward-model directory of a supported family
(Llama, Qwen2, Qwen3, Gemma-2: config.FAMILIES) with an ArmoRM head
(`<Family>ForRewardModelWithGating`, RLHFlow's `LlamaForRewardModelWithGating`),
a `*ForSequenceClassification` head, or a bare `*Model` / `*ForCausalLM`
backbone into the C core and returns the reference's output fields. Input can be NumPy, lists or torch tensors;
torch input gives torch output, anything else NumPy.

Batching never pads: sequences are packed end to end and each one's result is
the same as when it is scored alone. Sequences of one call that share a
prefix (N responses to one prompt) compute it once (armorm/prefix.py,
docs/best_of_n.md).
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core
from .config import ATTRIBUTES, CheckpointError, ModelConfig, load_config, objective_names, weight_files
from .display import Explanation, Explanations
from .hub import resolve_model_path
from .prefix import DEFAULT_MIN_SHARED, plan_batches
from .tokenizer import ChatTokenizer, find_gating_position
from .tokenizer import gating_pattern as derive_gating_pattern

#: The gating pattern of the Llama-3 chat format:
#: "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n".
LLAMA3_GATING_PATTERN: List[int] = [128009, 128006, 78191, 128007, 271]

#: The names of from_pretrained's `prepack` values (CLI options, benchmark tables).
PREPACK_SETTINGS: Dict[str, Optional[bool]] = {"auto": None, "on": True, "off": False}

#: `prepack` for jobs of large packed batches that load a model for one run (CLI scoring, the
#: RewardBench evaluations, the preparations, Ray's actors): not prepacked. Their calls run
#: thousands of tokens, where packing the weights per call costs next to nothing, while
#: prepacking costs a pass over the weights at load and an anonymous copy per process that
#: processes on one machine cannot share, as they share a mapped checkpoint
#: (docs/model.md, 'Prepacked weights', 'Who prepacks').
PREPACK_FOR_BATCH_JOBS: Optional[bool] = False

_HF_IGNORED_KWARGS = {"trust_remote_code", "low_cpu_mem_usage", "attn_implementation", "use_safetensors",
                      "local_files_only", "use_cache", "revision", "cache_dir", "token", "force_download",
                      "offload_folder", "max_memory"}


class GatingPatternError(ValueError):
    """A sequence does not contain the token pattern that opens the final assistant turn."""


class RewardOutput(Mapping):
    """The model's outputs, named as the reference's (`output.score`, `output["score"]`).

    ArmoRM: rewards [B,K], gating_output [B,K], score [B], logits (= score),
    hidden_state [B,H], prompt_embedding [B,H]. SequenceClassification: logits
    [B,num_labels], score = logits[:, 0], hidden_state. Backbone: hidden_state
    and prompt_embedding (when a gating pattern was found).
    """

    def __init__(self, **fields: Any) -> None:
        self._fields = {k: v for k, v in fields.items() if v is not None}
        #: what displays need beside the arrays ("objectives": names, "transform": the reward transform
        #: matrix, "conversations": the scored inputs); filled by the model and the pipeline
        self._display: Dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._fields[name]
        except KeyError:
            raise AttributeError(f"this output has no field {name!r}; it has {', '.join(self._fields)}") from None

    def __getitem__(self, key: Union[str, int]) -> Any:
        if isinstance(key, int):
            return list(self._fields.values())[key]
        return self._fields[key]

    def __iter__(self):
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def to_tuple(self) -> Tuple[Any, ...]:
        return tuple(self._fields.values())

    def row(self, i: int) -> "RewardOutput":
        """Row `i` as a one-row output (arrays keep their leading axis); in Jupyter it shows in detail."""
        n = len(next(iter(self._fields.values()))) if self._fields else 0
        if not -n <= i < n:
            raise IndexError(f"row {i} of an output with {n} rows")
        i %= n
        out = RewardOutput(**{k: v[i:i + 1] for k, v in self._fields.items()})
        out._display = dict(self._display)
        if self._display.get("conversations") is not None:
            out._display["conversations"] = [self._display["conversations"][i]]
        return out

    def _repr_html_(self) -> str:
        from .display import reward_output_html
        return reward_output_html(self)

    def __repr__(self) -> str:
        from .display import reward_output_text
        return reward_output_text(self)


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _torch_dtype_name(torch_dtype: Any) -> str:
    if torch_dtype is None:
        return "auto"
    s = str(torch_dtype).replace("torch.", "").lower()
    aliases = {"auto": "auto", "float32": "float32", "fp32": "float32", "float": "float32",
               "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "half": "float16"}
    if s not in aliases:
        raise ValueError(f"torch_dtype must be float32, bfloat16, float16 or 'auto', got {torch_dtype!r}")
    return aliases[s]


def _device_name(device_map: Any) -> str:
    """'cpu' or 'cuda:N'. 'auto' is the first GPU when the CUDA backend sees one, else the CPU."""
    if device_map is None:
        return "cpu"
    if isinstance(device_map, dict):
        devs = {str(v) for v in device_map.values()}
        if devs <= {"cpu"}:
            return "cpu"
        device_map = next(iter(devs - {"cpu"}))
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        device_map = f"cuda:{device_map}"
    s = str(device_map)
    if s == "cpu":
        return "cpu"
    if s == "auto":
        return "cuda:0" if _core.cuda_device_count() > 0 else "cpu"
    m = re.fullmatch(r"cuda(?::(\d+))?", s)
    if m:
        if not _core.CUDA_BUILT:
            reason = getattr(_core, "CUDA_BUILD_REASON", "") or "its build recorded no reason"
            raise RuntimeError(f"device_map={s!r}: this armorm build has no CUDA backend ({reason}); "
                               "use device_map='cpu'")
        n = _core.cuda_device_count()
        idx = int(m.group(1) or 0)
        if idx >= n:
            raise RuntimeError(f"device_map={s!r}: " + ("no CUDA device is available" if n == 0 else
                                                         f"this machine has {n} CUDA device{'s' if n > 1 else ''}"))
        return f"cuda:{idx}"
    raise ValueError(f"device_map must be 'cpu', 'auto' or 'cuda[:N]', got {device_map!r}")


def default_num_threads() -> int:
    """ARMORM_NUM_THREADS when set, else the cores this process may run on."""
    env = os.environ.get("ARMORM_NUM_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"ARMORM_NUM_THREADS must be a positive integer, got {env!r}") from None
        if n < 1:
            raise ValueError(f"ARMORM_NUM_THREADS must be a positive integer, got {env!r}")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _as_sequence(x: Any, what: str) -> np.ndarray:
    try:
        a = np.asarray(x)
    except (ValueError, TypeError):  # ragged nesting: numpy's "inhomogeneous shape"
        raise ValueError(f"{what} must be a 1-D sequence of token ids") from None
    if a.dtype == object and a.ndim == 1 and all(type(t) is int for t in a):
        a = np.array([t if 0 <= t < 2**31 else -1 for t in a], dtype=np.int64)  # ids beyond int64
        if (a < 0).any():
            j = int(np.argmax(a < 0))
            raise ValueError(f"{what}, position {j}: token id {x[j]} is outside the embedding")
    if a.dtype == object or a.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of token ids")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if not (np.issubdtype(a.dtype, np.floating) and np.all(np.isfinite(a)) and np.all(a == np.round(a))):
            raise ValueError(f"{what} must hold integer token ids, got dtype {a.dtype}")
    if a.size:
        # ids that int32 cannot hold, checked before the cast (uint64 or large floats would wrap);
        # the core names the others (negative, >= vocab_size) with the vocabulary size
        bad = (a < np.iinfo(np.int32).min) | (a > np.iinfo(np.int32).max)
        if bad.any():
            j = int(np.argmax(bad))
            raise ValueError(f"{what}, position {j}: token id {int(a[j])} is outside the embedding")
    return a.astype(np.int32)


class ArmoRM:
    """A reward model on armorm's C core; a stand-in for the HF class.

    Use `ArmoRM.from_pretrained(path, ...)`. Calling the model takes the
    reference's inputs (`input_ids`, optional `attention_mask`) and returns a
    RewardOutput. `score_sequences` scores a list of token-id sequences of
    any lengths in token-budgeted packed batches.
    """

    attributes: List[str] = ATTRIBUTES

    def __init__(self, core: Any, config: ModelConfig, path: Path, gating_pattern: Optional[Sequence[int]],
                 tokenizer: Any = None, max_batch_tokens: int = 8192) -> None:
        self._core = core
        self.config = config
        self.name_or_path = str(path)
        self.tokenizer = tokenizer
        self.gating_pattern = None if gating_pattern is None else [int(t) for t in gating_pattern]
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be positive")
        self.max_batch_tokens = int(max_batch_tokens)
        self.device = "cpu"
        self._pattern_error: Optional[str] = None
        #: shortest shared prefix (tokens) that scoring computes once; 0 turns sharing off
        self.min_shared_prefix = DEFAULT_MIN_SHARED

    # ---- loading --------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], *, device_map: Any = None,
                        torch_dtype: Any = None, dtype: Any = None, num_threads: Optional[int] = None,
                        gating_pattern: Optional[Sequence[int]] = None, tokenizer: Any = None,
                        architecture: Optional[str] = None, max_batch_tokens: int = 8192,
                        check_finite: bool = True, prepack: Optional[bool] = None,
                        **hf_kwargs: Any) -> "ArmoRM":
        """Loads a model directory (or a hub id found in the local HF cache).

        Accepts the keyword arguments the model card passes (`device_map`,
        `torch_dtype`, `trust_remote_code`; the last is ignored: armorm never
        runs code from a checkpoint). `torch_dtype` picks the dtype the
        backbone weights are held in (fp32 accumulation always); None/'auto'
        keeps the stored dtype. `gating_pattern` overrides the token ids that
        open the final assistant turn; by default they are derived from the
        directory's tokenizer (or `tokenizer`), else Llama-3's.
        `architecture="LlamaModel"` (or any family's `*Model`) loads only the backbone of
        any checkpoint.
        `check_finite` (default True) refuses checkpoints holding NaN/inf
        weights, naming the tensor; False skips that scan of the weights.
        `prepack` holds the backbone matrices in the CPU matrix kernel's
        packed layout from load on (docs/model.md, 'Prepacked weights'):
        None (default) where that takes no more memory than the weights as
        held, True wherever the kernel path has a packed layout (a ValueError
        on the portable path or a GPU), False never. Results are the same
        bits either way; `prepacked_bytes` says what was done.
        """
        unknown = set(hf_kwargs) - _HF_IGNORED_KWARGS
        if unknown:
            raise TypeError(f"from_pretrained() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        if dtype is not None and torch_dtype is not None and _torch_dtype_name(dtype) != _torch_dtype_name(torch_dtype):
            raise ValueError("dtype and torch_dtype disagree")
        wdtype = _torch_dtype_name(torch_dtype if torch_dtype is not None else dtype)
        device = _device_name(device_map)
        path = resolve_model_path(pretrained_model_name_or_path)
        config = load_config(path, architecture=architecture)
        files = weight_files(path)
        core_cfg = dict(config.core)  # (load_config decided compute_head from `architecture`)
        core_cfg["check_finite"] = int(bool(check_finite))
        core_cfg["prepack"] = -1 if prepack is None else int(bool(prepack))
        nt = default_num_threads() if num_threads is None else int(num_threads)
        if not 1 <= nt <= 1024:
            raise ValueError(f"num_threads must be in 1..1024, got {num_threads!r}")
        dev_idx = -1 if device == "cpu" else int(device.split(":")[1])
        try:
            # on a GPU the weights are held (and converted while uploading) in bf16 there: the host
            # side keeps the stored dtype, mapped, with no converted copy
            core = _core.Model(files, core_cfg, "auto" if dev_idx >= 0 else wdtype, nt, device=dev_idx)
        except ValueError as e:  # the core's checkpoint checks: missing/misshapen/corrupt tensors, bad sizes
            raise CheckpointError(str(e)) from None
        if tokenizer is None and (path / "tokenizer.json").is_file():
            tokenizer = ChatTokenizer.from_pretrained(path)
        pattern_error = None
        if gating_pattern is None and tokenizer is not None:
            try:
                gating_pattern = derive_gating_pattern(tokenizer)
            except ValueError as e:
                # token-id scoring still works for backbones; gated scoring raises this reason
                pattern_error = str(e)
        elif gating_pattern is None:
            gating_pattern = LLAMA3_GATING_PATTERN  # no tokenizer: the reference's hard-coded pattern
        model = cls(core, config, path, gating_pattern, tokenizer, max_batch_tokens)
        model.device = device
        model._pattern_error = pattern_error
        return model

    def close(self) -> None:
        """Unmaps the checkpoint and frees the weights; the model is unusable after."""
        self._core.close()

    def __enter__(self) -> "ArmoRM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- HF-compatible surface -----------------------------------------

    @property
    def architecture(self) -> str:
        return self.config.architecture

    @property
    def prepacked_bytes(self) -> int:
        """Bytes of the backbone matrices held in the CPU kernel's packed layout; 0 when not prepacked."""
        return int(self._core.prepacked_bytes)

    @property
    def dtype(self) -> str:
        """The dtype the backbone weights are held in."""
        return "bfloat16" if self.device != "cpu" else self._core.dtype  # the GPU holds bf16 weights

    def eval(self) -> "ArmoRM":
        return self

    def to(self, device: Any) -> "ArmoRM":
        want = _device_name(device)
        if want != self.device:
            raise RuntimeError(f"this model runs on {self.device}; moving it is not supported: load it with "
                               f"device_map={want!r}")
        return self

    def _head_tensor(self, name: str) -> Any:
        if self.config.kind != "armorm":
            raise AttributeError(f"{name} exists only on ArmoRM checkpoints (this is {self.config.architecture})")
        a = self._core.tensor(name)
        if "torch" in sys.modules:  # the model card calls .data.cpu().float() on it
            import torch
            return torch.from_numpy(a)
        return a

    @property
    def reward_transform_matrix(self) -> Any:
        """[K, K] matrix applied to the rewards (torch tensor when torch is imported)."""
        return self._head_tensor("reward_transform_matrix")

    @property
    def regression_layer_weight(self) -> Any:
        """[K, H] regression weights."""
        return self._head_tensor("regression_layer.weight")

    def __call__(self, input_ids: Any = None, attention_mask: Any = None, **kwargs: Any) -> RewardOutput:
        """Scores `input_ids` like the reference model's forward.

        `input_ids`: one sequence (1-D), a padded batch (2-D, the reference's
        pad rule, or `attention_mask`), a list of sequences of different
        lengths, or a tokenizer's dict output. Returns a RewardOutput (torch
        tensors when the input is a torch tensor).
        """
        for k in kwargs:
            if k not in ("return_dict", "output_hidden_states", "use_cache"):
                raise TypeError(f"unexpected keyword argument {k!r}")
        if isinstance(input_ids, Mapping):
            if "input_ids" not in input_ids:
                raise ValueError("a dict input must hold 'input_ids' (as a tokenizer's output does)")
            attention_mask = input_ids.get("attention_mask", attention_mask)
            input_ids = input_ids["input_ids"]
        if input_ids is None:
            raise ValueError("input_ids is required")
        as_torch = _is_torch(input_ids)
        out = self.score_sequences(self._rows(input_ids, attention_mask))
        if as_torch:
            import torch
            res = RewardOutput(**{k: torch.from_numpy(v) for k, v in out.items()})
            res._display = out._display
            return res
        return out

    forward = __call__

    def _rows(self, input_ids: Any, attention_mask: Any) -> List[np.ndarray]:
        """Splits the reference's input forms into unpadded sequences."""
        if _is_torch(input_ids):
            input_ids = input_ids.detach().cpu().numpy()
        if attention_mask is not None and _is_torch(attention_mask):
            attention_mask = attention_mask.detach().cpu().numpy()
        if isinstance(input_ids, np.ndarray):
            if input_ids.ndim == 1:
                input_ids = input_ids[None, :]
                if attention_mask is not None:
                    attention_mask = np.asarray(attention_mask).reshape(1, -1)
            if input_ids.ndim != 2:
                raise ValueError(f"input_ids must be 1-D or 2-D, got shape {input_ids.shape}")
            rows = list(input_ids)
        elif isinstance(input_ids, (list, tuple)):
            if not input_ids:
                raise ValueError("input_ids is empty")
            if all(isinstance(t, (int, float, np.integer, np.floating)) for t in input_ids):  # one sequence
                rows = [np.asarray(input_ids)]
            else:
                rows = list(input_ids)
        else:
            raise TypeError(f"input_ids must be a list, NumPy array or torch tensor, not {type(input_ids).__name__}")
        seqs = [_as_sequence(r, f"input_ids[{i}]") for i, r in enumerate(rows)]
        if attention_mask is not None:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1 and len(seqs) == 1:
                mask = mask[None, :]
            if mask.shape != (len(seqs), len(seqs[0])) or any(len(s) != len(seqs[0]) for s in seqs):
                raise ValueError("attention_mask must have the shape of input_ids")
            out = []
            for i, (s, m) in enumerate(zip(seqs, mask)):
                keep = np.flatnonzero(m)
                if keep.size == 0:
                    raise ValueError(f"input_ids[{i}]: attention_mask masks every token")
                if keep[-1] - keep[0] + 1 != keep.size:
                    raise ValueError(f"input_ids[{i}]: attention_mask must be one contiguous run of ones "
                                     "(left or right padding)")
                out.append(s[keep[0]:keep[-1] + 1])
            return out
        pad = self.config.pad_token_id
        if pad is None:
            return seqs
        out = []
        for s in seqs:
            is_pad = s == pad
            if not is_pad.any():
                out.append(s)
            elif self.config.pad_rule == "last_non_pad":
                # reference: the last token that is not padding
                nonpad = np.flatnonzero(~is_pad)
                out.append(s[: nonpad[-1] + 1] if nonpad.size else s[:1])
            else:
                # reference: first pad minus one, modulo the length (a leading pad means the last token)
                first = int(np.argmax(is_pad))
                out.append(s if first == 0 else s[:first])
        return out

    # ---- the packed-batch engine ---------------------------------------

    def gating_positions(self, seqs: Sequence[np.ndarray], what: str = "sequence",
                         names: Optional[Sequence[str]] = None) -> np.ndarray:
        """Start of the last gating-pattern occurrence in each sequence.

        Raises GatingPatternError naming the first sequence without one
        (`names[i]` when given, else "`what` i").
        """
        if not self.gating_pattern:
            raise GatingPatternError(self._pattern_error or "no gating pattern: pass gating_pattern=[...]")
        pos = np.empty(len(seqs), dtype=np.int64)
        for i, s in enumerate(seqs):
            p = find_gating_position(s, self.gating_pattern)
            if p < 0:
                raise GatingPatternError(
                    f"{names[i] if names is not None else f'{what} {i}'}: the gating pattern {self.gating_pattern} (the header that opens the final "
                    "assistant turn) was not found; a conversation to score must end with an assistant message "
                    "in the model's chat format (pass gating_pattern= to override the pattern)")
            pos[i] = p
        return pos

    def score_sequences(self, sequences: Sequence[Any], reward_pos: Optional[Sequence[int]] = None,
                        fields: Optional[Iterable[str]] = None, batch_tokens: Optional[int] = None,
                        progress: Optional[Callable[[int, int], None]] = None,
                        names: Optional[Sequence[str]] = None, share_prefixes: Union[bool, int] = True,
                        stats: Optional[Dict[str, int]] = None) -> RewardOutput:
        """Scores token-id sequences of any lengths, packed without padding.

        `reward_pos[i]` is where sequence i's reward is read (default: its last
        token). `fields` limits the outputs (default: every field the model
        produces but `all_hidden`; the core decides which: `_core.fields`).
        `batch_tokens` caps the tokens per packed group (default
        `max_batch_tokens`; a longer sequence runs alone; a shared prefix
        counts once). `progress(done, total)` is called after each packed
        group with sequence counts. Errors about one sequence name it
        `names[i]` (e.g. "file.jsonl:7") when given.

        Sequences that start with the same tokens (responses to one prompt)
        compute their common prefix once; results are bit-identical to
        scoring each alone (docs/best_of_n.md). `share_prefixes`: True
        shares prefixes of at least `min_shared_prefix` tokens, an integer n
        those of at least n tokens, False nothing. `stats`, when given, is
        filled with `tokens_in` (the sequences' tokens), `tokens_computed`
        (the rows the backbone computed) and `shared_prefixes` (the prefix
        segments computed).
        """
        if names is not None and len(names) != len(sequences):
            raise ValueError("names must have one entry per sequence")
        seqs = [s if isinstance(s, np.ndarray) and s.dtype == np.int32 and s.ndim == 1
                else _as_sequence(s, f"sequence {i}") for i, s in enumerate(sequences)]
        if not seqs:
            raise ValueError("no sequences to score")
        lengths = np.array([s.size for s in seqs], dtype=np.int64)
        cu_all = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=cu_all[1:])
        rpos = None
        if reward_pos is not None:
            rpos = np.asarray(reward_pos, dtype=np.int64)
            if rpos.shape != (len(seqs),):
                raise ValueError("reward_pos must have one entry per sequence")
        # which fields, and whether they read the gating position: the model description decides (model.c)
        wanted, gated = self._core.plan(None if fields is None else list(fields))
        tokens = np.concatenate(seqs)
        try:
            if gated:
                try:
                    gpos = self.gating_positions(seqs, names=names)
                except GatingPatternError:
                    # a sequence the core refuses (empty, too long, an id outside the vocabulary) is named first
                    self._core.validate(tokens, cu_all, rpos)
                    raise
            else:
                gpos = None
            budget = int(batch_tokens or self.max_batch_tokens)
            min_shared = _min_shared(share_prefixes, self.min_shared_prefix)
            # all_hidden has a row per packed token: a call asking for it is packed as given
            share = min_shared and len(seqs) > 1 and "all_hidden" not in wanted
            plan = plan_batches(seqs, budget, min_shared, rpos, gpos) if share else None
            if plan is None or plan.shared_segments == 0:
                # the core checks the whole call once, then runs it in packed groups of at most `budget` tokens
                out = self._core.forward(tokens, cu_all, rpos, gpos, wanted, batch_tokens=budget, progress=progress)
                computed, shared = int(cu_all[-1]), 0
            else:
                out = self._forward_shared(seqs, tokens, cu_all, rpos, plan, wanted, progress)
                computed, shared = plan.tokens_computed, plan.shared_segments
        except ValueError as e:
            renamed = _rename_sequence(str(e), names)
            if renamed == str(e):  # not about one sequence, or already named (GatingPatternError)
                raise
            raise ValueError(renamed) from None
        res = RewardOutput(**out)
        if stats is not None:
            stats.update(tokens_in=int(cu_all[-1]), tokens_computed=computed, shared_prefixes=shared)
        if "gating_output" in res:  # what the rich display names and multiplies (armorm/display.py)
            res._display.update(objectives=self.objective_names(res["gating_output"].shape[1]),
                                transform=self._core.tensor("reward_transform_matrix"))
        return res

    def _forward_shared(self, seqs: List[np.ndarray], tokens: np.ndarray, cu_all: np.ndarray,
                        rpos: Optional[np.ndarray], plan: Any, wanted: Sequence[str],
                        progress: Optional[Callable[[int, int], None]]) -> Dict[str, np.ndarray]:
        """One core call of the plan's segments (prefixes once, docs/best_of_n.md); rows in the caller's order."""
        # the core names segments; the caller's sequences are checked (and named) here first
        self._core.validate(tokens, cu_all, rpos)
        call = plan.call()
        n = len(seqs)
        on_group = None if progress is None else (lambda done, _total: progress(int(call.scored[done]), n))
        out = self._core.forward(call.tokens, call.cu_seqlens, call.reward_pos, call.gating_pos, wanted,
                                 progress=on_group, parent=call.parent, groups=call.groups)
        return {f: v[call.rows] for f, v in out.items()}

    def score_responses(self, prompt_ids: Any, responses: Sequence[Any], fields: Optional[Iterable[str]] = None,
                        batch_tokens: Optional[int] = None,
                        progress: Optional[Callable[[int, int], None]] = None,
                        stats: Optional[Dict[str, int]] = None) -> RewardOutput:
        """Scores `prompt_ids + responses[i]` for every i, computing the prompt once.

        `prompt_ids`: the token ids every sequence starts with (for ArmoRM,
        usually the conversation up to and including the final assistant
        header, so the gating row lies in it and the gating network runs once);
        `responses`: token-id sequences. Row i of the result is response i;
        each equals scoring the whole sequence alone, bit for bit on the CPU.
        Same `fields`, `batch_tokens`, `progress` and `stats` as score_sequences.
        """
        prompt = _as_sequence(prompt_ids, "prompt_ids")
        if isinstance(responses, (str, bytes, Mapping)) or not hasattr(responses, "__iter__"):
            raise TypeError("responses must be a list of token-id sequences")
        responses = list(responses)
        if not responses:
            raise ValueError("responses is empty")
        seqs = [np.concatenate([prompt, _as_sequence(r, f"response {i}")]) for i, r in enumerate(responses)]
        names = [f"response {i}" for i in range(len(seqs))]
        # explicit: the caller says the prompt is shared, so share it whatever its length
        return self.score_sequences(seqs, fields=fields, batch_tokens=batch_tokens, progress=progress, names=names,
                                    share_prefixes=1, stats=stats)

    # ---- interpretation --------------------------------------------------

    def coefficients(self, gating_output: Any) -> np.ndarray:
        """coeffs = gating_output @ T^T, so that score == sum(rewards * coeffs).

        Row by row in a fixed order (elementwise products and sums over the
        objectives, k = 0..K-1), so a row's coefficients are bit-identical
        whatever else is in the batch; a BLAS product's summation order
        depends on the matrix shape.
        """
        return objective_coefficients(gating_output, self._core.tensor("reward_transform_matrix"))

    def objective_names(self, k: int) -> List[str]:
        """The names of `k` objectives: `attributes` when there are k of them, else objective-i."""
        return objective_names(k, self.attributes)

    def explain(self, output: Mapping, k: int = 3) -> List[List[Tuple[str, float]]]:
        """Top-`k` objectives by |coefficient| for each row, as the model card prints them.

        A list (one Explanation per row) of lists of (objective, coefficient);
        in Jupyter each shows as a table with the rewards when `output` has them.
        """
        coeffs = self.coefficients(output["gating_output"])
        names = self.objective_names(coeffs.shape[1])
        rewards = output.get("rewards")
        rewards = None if rewards is None else np.asarray(rewards.detach().cpu() if _is_torch(rewards) else rewards)
        scores = output.get("score")
        scores = None if scores is None else np.asarray(scores.detach().cpu() if _is_torch(scores) else scores)
        convs = getattr(output, "_display", {}).get("conversations")
        result = Explanations()
        for i, row in enumerate(coeffs):
            order = top_objectives(row, k)
            result.append(Explanation(
                [(names[j], float(row[j])) for j in order],
                score=None if scores is None else float(scores[i]),
                rewards=None if rewards is None else [float(rewards[i][j]) for j in order],
                conversation=None if convs is None or len(convs) != len(coeffs) else convs[i]))
        return result

    def __repr__(self) -> str:
        return f"ArmoRM({self.name_or_path!r}, architecture={self.architecture}, dtype={self.dtype})"


def objective_coefficients(gating_output: Any, transform: Any) -> np.ndarray:
    """coeffs = gating_output @ T^T for a [rows, K] gating output and the [K, K] reward transform matrix.

    Row by row in a fixed order (elementwise products and sums over the
    objectives, k = 0..K-1), so a row's coefficients are bit-identical
    whatever else is in the batch; a BLAS product's summation order depends
    on the matrix shape.
    """
    g = np.asarray(gating_output.detach().cpu().numpy() if _is_torch(gating_output) else gating_output,
                   dtype=np.float32)
    if g.ndim != 2:
        raise ValueError(f"gating_output must be [rows, objectives], got shape {g.shape}")
    T = np.asarray(transform, dtype=np.float32)
    if g.shape[1] != T.shape[1]:
        raise ValueError(f"gating_output has {g.shape[1]} objectives, the model {T.shape[1]}")
    out = np.zeros((g.shape[0], T.shape[0]), dtype=np.float32)
    for k in range(T.shape[1]):
        out += g[:, k:k + 1] * T[:, k]
    return out


def top_objectives(weights: Any, k: int) -> List[int]:
    """Indexes of the `k` largest |weights|, largest first (ties: the lower index first)."""
    return [int(j) for j in np.argsort(-np.abs(np.asarray(weights)), kind="stable")[:k]]


def _rename_sequence(message: str, names: Optional[Sequence[str]]) -> str:
    """The core names a bad sequence "sequence N"; with `names`, say names[N] instead."""
    m = re.match(r"sequence (\d+)", message)
    if names is None or not m or int(m.group(1)) >= len(names):
        return message
    return names[int(m.group(1))] + message[m.end():]


def _min_shared(share_prefixes: Union[bool, int], default: int) -> int:
    """score_sequences' `share_prefixes` as a minimum prefix length (0: no sharing)."""
    if isinstance(share_prefixes, (bool, np.bool_)):
        return int(default) if share_prefixes else 0
    if not isinstance(share_prefixes, (int, np.integer)) or share_prefixes < 0:
        raise ValueError(f"share_prefixes must be True, False or a token count >= 0, got {share_prefixes!r}")
    return int(share_prefixes)
