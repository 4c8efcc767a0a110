"""`ArmoRMPipeline`: the model card's pipeline, plus batched scoring.

    rm = ArmoRMPipeline("RLHFlow/ArmoRM-Llama3-8B-v0.1", trust_remote_code=True)
    rm([{"role": "user", "content": p}, {"role": "assistant", "content": r}])  # {"score": ...}
    rm.score_batch(conversations)  # every field, for many conversations at once
    rm.score_responses(messages, [response, ...])  # N responses to one prompt, the prompt computed once
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .model import ArmoRM, GatingPatternError, RewardOutput
from .progress import make_progress
from .tokenizer import ChatTokenizer, conversation_from_record, format_conversations

Conversation = List[Dict[str, str]]


class ArmoRMPipeline:
    """Scores chat conversations with an ArmoRM-style model.

    The constructor takes the model card's arguments (`model_id`,
    `device_map`, `torch_dtype`, `truncation`, `trust_remote_code`,
    `max_length`); `tokenizer` may be a ChatTokenizer or any transformers
    tokenizer; `model` reuses an already loaded ArmoRM.
    `harness_tokenization=True` renders the chat template to text and
    tokenizes that text again with the tokenizer's special tokens, as
    allenai/reward-bench feeds classifier reward models (two BOS tokens for
    Llama 3); the default is the model card's single-BOS tokenization.
    `check_finite`, `prepack`, `num_threads`, `gating_pattern` are
    `ArmoRM.from_pretrained`'s.
    """

    def __init__(self, model_id: Union[str, os.PathLike, None] = None, device_map: Any = "auto",
                 torch_dtype: Any = "bfloat16", truncation: bool = True, trust_remote_code: bool = False,
                 max_length: int = 4096, *, tokenizer: Any = None, model: Optional[ArmoRM] = None,
                 num_threads: Optional[int] = None, gating_pattern: Optional[Sequence[int]] = None,
                 batch_tokens: int = 8192, check_finite: bool = True,
                 harness_tokenization: bool = False, prepack: Optional[bool] = None) -> None:
        if model is None:
            if model_id is None:
                raise ValueError("give model_id (a model directory or hub id) or model=")
            model = ArmoRM.from_pretrained(model_id, device_map=device_map, torch_dtype=torch_dtype,
                                           trust_remote_code=trust_remote_code, num_threads=num_threads,
                                           gating_pattern=gating_pattern, tokenizer=tokenizer,
                                           check_finite=check_finite, prepack=prepack)
        elif gating_pattern is not None:
            model.gating_pattern = [int(t) for t in gating_pattern]
        if tokenizer is None:
            tokenizer = model.tokenizer
        if tokenizer is None:
            if model_id is None:
                raise ValueError("the model has no tokenizer; pass tokenizer=")
            tokenizer = ChatTokenizer.from_pretrained(model.name_or_path)
        self.model = model
        self.tokenizer = tokenizer
        self.truncation = truncation
        self.max_length = int(max_length)
        self.batch_tokens = int(batch_tokens)
        self.harness_tokenization = bool(harness_tokenization)
        self.device = model.device

    def encode(self, conversations: Sequence[Union[Conversation, Mapping[str, Any]]],
               names: Optional[Sequence[str]] = None) -> List[np.ndarray]:
        """Chat-formats and tokenizes conversations, checking the gating pattern.

        Raises GatingPatternError when a conversation has no final assistant
        header, and ValueError when truncation to `max_length` would cut it;
        the message names the conversation `names[i]` when given (e.g.
        "file.jsonl:7"), else "conversation i".
        """
        if names is not None and len(names) != len(conversations):
            raise ValueError("names must have one entry per conversation")
        label = (lambda i: names[i]) if names is not None else (lambda i: f"conversation {i}")
        convs = [conversation_from_record(c) if isinstance(c, Mapping) else c for c in conversations]
        ids = format_conversations(self.tokenizer, convs, names=names, retokenize_text=self.harness_tokenization)
        for i, conv in enumerate(convs):
            # an earlier assistant turn would still hold the pattern: score the wrong turn, silently
            last = conv[-1] if isinstance(conv, (list, tuple)) and conv else None
            role = last.get("role") if isinstance(last, Mapping) else None
            if role != "assistant":
                raise GatingPatternError(
                    f"{label(i)} ends with a {role!r} message; the reward model scores the final "
                    "assistant turn, so a conversation must end with an assistant message")
        seqs = [np.asarray(seq, dtype=np.int32) for seq in ids]
        gpos = self.model.gating_positions(seqs, what="conversation", names=names)
        n_pattern = len(self.model.gating_pattern)
        out = []
        for i, (arr, p) in enumerate(zip(seqs, gpos)):
            if self.truncation and arr.size > self.max_length:
                if p + n_pattern > self.max_length:
                    raise ValueError(
                        f"{label(i)}: truncation to max_length={self.max_length} tokens would cut off the "
                        f"final assistant header (it starts at token {p} of {arr.size}); raise max_length or "
                        "shorten the conversation")
                arr = arr[: self.max_length]
            out.append(arr)
        return out

    def __call__(self, messages: Conversation) -> Dict[str, float]:
        """Scores one conversation: {"score": float}, as the model card's pipeline."""
        if not isinstance(messages, (list, tuple)):
            raise TypeError("messages must be a list of {'role', 'content'} dicts")
        out = self.model.score_sequences(self.encode([messages]), fields=["score"])
        return {"score": float(out.score[0])}

    def score_batch(self, conversations: Sequence[Union[Conversation, Mapping[str, Any]]],
                    batch_tokens: Optional[int] = None, progress: bool = False,
                    share_prefixes: Union[bool, int] = True) -> RewardOutput:
        """Scores many conversations in packed batches of at most `batch_tokens` tokens.

        Returns every field as NumPy arrays (row i = conversation i); in
        Jupyter the result shows as a table of scores and top objectives.
        Conversations that start alike (responses to one prompt) compute their
        common tokens once (`share_prefixes`, as ArmoRM.score_sequences).
        """
        seqs = self.encode(conversations)
        cb = make_progress(len(seqs), progress)
        out = self.model.score_sequences(seqs, batch_tokens=batch_tokens or self.batch_tokens, progress=cb,
                                         share_prefixes=share_prefixes)
        out._display["conversations"] = list(conversations)  # for the notebook display (no copy of the text)
        return out

    def score_responses(self, messages: Conversation, responses: Sequence[str], batch_tokens: Optional[int] = None,
                        progress: bool = False) -> RewardOutput:
        """Scores each of `responses` as the final assistant turn after `messages`, the prompt computed once.

        `messages`: the conversation without its final turn (it must not end
        with an assistant message). Row i of the result (every field, NumPy)
        is `messages + [{"role": "assistant", "content": responses[i]}]`,
        equal to scoring that conversation alone.
        """
        if not isinstance(messages, (list, tuple)):
            raise TypeError("messages must be a list of {'role', 'content'} dicts")
        if isinstance(responses, str) or not isinstance(responses, Sequence):
            raise TypeError("responses must be a list of strings")
        if len(responses) == 0:
            raise ValueError("responses is empty")
        for i, r in enumerate(responses):
            if not isinstance(r, str):
                raise TypeError(f"response {i} must be a string, got {type(r).__name__}")
        last = messages[-1] if messages else None
        if isinstance(last, Mapping) and last.get("role") == "assistant":
            raise ValueError("messages ends with an assistant message; score_responses appends each response as "
                             "the final assistant turn, so pass the conversation without it")
        convs = [list(messages) + [{"role": "assistant", "content": r}] for r in responses]
        # explicit: the conversation before the final turn is shared whatever its length
        return self.score_batch(convs, batch_tokens=batch_tokens, progress=progress, share_prefixes=1)

    def explain(self, conversation_or_output: Union[Conversation, Mapping], k: int = 3) -> List[Tuple[str, float]]:
        """Top-`k` objectives by |coefficient| for one conversation (or row 0 of an output).

        A list of (objective, coefficient) that shows as a table in Jupyter.
        """
        out = conversation_or_output
        if not isinstance(out, Mapping):
            out = self.score_batch([conversation_or_output])
        return self.model.explain(out, k)[0]
