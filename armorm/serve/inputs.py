"""Request bodies -> the token sequences the model scores, with errors that name the item.

Three input forms reach the model:

- chat-formatted text (OpenRLHF's `query`, vLLM/SGLang's `input` strings):
  special-token text is parsed as special tokens; exactly one BOS starts the
  sequence (added when the text lacks it, never doubled); trailing padding is
  removed: pad and eos tokens after the content go, and an end-of-turn marker
  right after the content is kept once (the form the chat template writes);
- token ids (`input` as a list of integers): scored exactly as sent;
- message lists (`messages`, `conversations`): rendered with the model's chat
  template, as offline scoring does.

Every sequence must fit `max_length` and the vocabulary. For a gated
(ArmoRM) model, a sequence must contain the header that opens the final
assistant turn, and a text must not continue with another turn after it.
Structural errors (not JSON, missing or mistyped fields) are 422 or 400;
content errors are 400; each message says which item (`query[3]`, ...).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..tokenizer import find_gating_position, format_conversations


#: bodies larger than this are refused with 413 (about 8M tokens of text)
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024


class RequestError(Exception):
    """A request the server refuses: HTTP `status`, a message, the offending `param`, a metrics `kind`."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, kind: str = "bad_request",
                 headers: Optional[Dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.kind = kind
        self.headers = headers or {}


def schema_error(message: str, param: Optional[str] = None) -> RequestError:
    return RequestError(422, message, param=param, kind="invalid_request")


#: (kind, value, where): kind is "text", "ids" or "messages"; where names the item in messages
Item = Tuple[str, Any, str]


def _end_of_turn_ids(tokenizer: Any) -> List[int]:
    """Token ids the chat template writes after a message's content (Llama 3: <|eot_id|>); [] if unknown."""
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False,
                                             add_generation_prompt=False)
        tail = text[text.rindex("X") + 1:]
        return [int(t) for t in tokenizer.encode(tail, add_special_tokens=False)] if tail else []
    except Exception:  # noqa: BLE001 - no template, or an unusual one: no end-of-turn handling
        return []


class Encoder:
    """Turns the three input forms into checked int32 token sequences for one model."""

    def __init__(self, model: Any, max_length: int) -> None:
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_length = int(max_length)
        self.vocab_size = int(model.config.core["vocab_size"])
        self.gated = model.config.kind == "armorm"
        self.pattern = list(model.gating_pattern or [])
        tok = self.tokenizer
        self.bos: Optional[int] = None
        self.end_of_turn: List[int] = []
        self.filler: set = set()
        if model.config.pad_token_id is not None:
            self.filler.add(int(model.config.pad_token_id))
        if tok is not None:
            if getattr(tok, "add_bos_token", False):
                self.bos = tok.bos_token_id
            self.end_of_turn = _end_of_turn_ids(tok)
            for t in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None)):
                if t is not None:
                    self.filler.add(int(t))
        self.filler.discard(self.bos)

    # ---- the three forms ---------------------------------------------------

    def encode(self, item: Item, add_special_tokens: bool = True) -> np.ndarray:
        kind, value, where = item
        if kind == "text":
            return self.text(value, where, add_special_tokens)
        if kind == "ids":
            try:
                ids = np.asarray(value, dtype=np.int64)
            except OverflowError:
                raise RequestError(400, f"{where}: a token id is outside the vocabulary "
                                        f"(0..{self.vocab_size - 1})", param=where) from None
            return self.check(ids, where)
        return self.messages(value, where)

    def text(self, text: str, where: str, add_special_tokens: bool = True) -> np.ndarray:
        if self.tokenizer is None:
            raise RequestError(400, f"{where}: this model directory has no tokenizer.json, so text cannot be "
                                    "scored; send token ids instead", param=where)
        ids = [int(t) for t in self.tokenizer.encode(text, add_special_tokens=False)]
        if add_special_tokens and self.bos is not None and (not ids or ids[0] != self.bos):
            ids.insert(0, self.bos)
        ids = self._strip_tail(ids)
        seq = self.check(np.asarray(ids, dtype=np.int64), where)
        if self.gated and self.end_of_turn:
            self._check_final_turn(seq, where)
        return seq

    def messages(self, messages: Any, where: str) -> np.ndarray:
        if self.tokenizer is None:
            raise RequestError(400, f"{where}: this model directory has no chat template (no tokenizer.json)",
                               param=where)
        if not isinstance(messages, list) or not messages:
            raise schema_error(f"{where}: a conversation must be a non-empty list of messages", where)
        last = messages[-1]
        role = last.get("role") if isinstance(last, Mapping) else None
        if role != "assistant":
            raise RequestError(400, f"{where}: the conversation ends with a {role!r} message; a reward is given "
                                    "to the final assistant turn, so the last message must be the assistant's",
                               param=where, kind="no_assistant_turn")
        try:
            ids = format_conversations(self.tokenizer, [messages])[0]
        except (TypeError, ValueError) as e:
            raise schema_error(f"{where}: {e}", where) from None
        except Exception as e:  # noqa: BLE001 - a template error is the input's fault, not the server's
            raise RequestError(400, f"{where}: the chat template failed on this conversation: {e}",
                               param=where) from None
        return self.check(np.asarray(ids, dtype=np.int64), where)

    # ---- checks ------------------------------------------------------------

    def check(self, ids: np.ndarray, where: str) -> np.ndarray:
        """Length, vocabulary and (gated models) the final assistant header."""
        if ids.ndim != 1 or ids.size == 0:
            raise RequestError(400, f"{where}: the sequence is empty", param=where)
        if ids.size > self.max_length:
            raise RequestError(400, f"{where}: the sequence has {ids.size} tokens, more than the server's "
                                    f"--max-length {self.max_length}", param=where, kind="too_long")
        bad = (ids < 0) | (ids >= self.vocab_size)
        if bad.any():
            j = int(np.argmax(bad))
            raise RequestError(400, f"{where}: token {j} is {int(ids[j])}, outside the vocabulary "
                                    f"(0..{self.vocab_size - 1})", param=where)
        seq = ids.astype(np.int32)
        if self.gated and find_gating_position(seq, self.pattern) < 0:
            raise RequestError(400, f"{where}: no final assistant turn: the tokens that open it "
                                    f"({self.pattern}) do not occur; the text must be a conversation in the "
                                    "model's chat format ending with an assistant message",
                               param=where, kind="no_assistant_turn")
        return seq

    def _strip_tail(self, ids: List[int]) -> List[int]:
        """Drops trailing pad/eos tokens; an end-of-turn marker right after the content is kept once."""
        eot = self.end_of_turn
        end, ends_with_turn = len(ids), False
        while end > 1:
            if eot and end - len(eot) >= 1 and ids[end - len(eot):end] == eot:
                end -= len(eot)
                ends_with_turn = True
            elif ids[end - 1] in self.filler:
                end -= 1
                ends_with_turn = False
            else:
                break
        return ids[:end] + (eot if ends_with_turn else [])

    def _check_final_turn(self, seq: np.ndarray, where: str) -> None:
        """A text must end in its final assistant turn, not continue with another turn after it."""
        eot = self.end_of_turn
        start = find_gating_position(seq, self.pattern) + len(self.pattern)
        stop = seq.size - (len(eot) if seq[-len(eot):].tolist() == eot else 0)
        if stop - start >= len(eot) and find_gating_position(seq[start:stop], eot) >= 0:
            raise RequestError(400, f"{where}: the conversation continues after its last assistant turn "
                                    "(it ends with another turn); a reward is given to the final assistant "
                                    "turn, so the text must end with the assistant's message",
                               param=where, kind="no_assistant_turn")


# ---- request bodies -----------------------------------------------------------


def _is_message(x: Any) -> bool:
    return isinstance(x, Mapping) and isinstance(x.get("role"), str)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _token_list(value: Any, where: str) -> List[int]:
    if not all(_is_int(t) for t in value):
        raise schema_error(f"{where}: a token-id list must hold integers only", where)
    return value


def openrlhf_items(body: Mapping[str, Any]) -> List[Item]:
    """OpenRLHF's /get_reward: {"query": [text, ...], "prompts": ..., "labels": ...} (the last two unused)."""
    if "query" not in body:
        raise schema_error("missing field 'query' (a list of chat-formatted texts)", "query")
    q = body["query"]
    if isinstance(q, str):
        q = [q]
    if not isinstance(q, list) or not q:
        raise schema_error("'query' must be a non-empty list of strings", "query")
    for i, t in enumerate(q):
        if not isinstance(t, str):
            raise schema_error(f"query[{i}] must be a string, got {type(t).__name__}", f"query[{i}]")
    return [("text", t, f"query[{i}]") for i, t in enumerate(q)]


def pooling_items(body: Mapping[str, Any]) -> List[Item]:
    """vLLM /classify and /pooling, SGLang /v1/embeddings: `input` (text(s) or token ids) or `messages`."""
    if "messages" in body and body["messages"] is not None:
        msgs = body["messages"]
        if isinstance(msgs, list) and msgs and all(isinstance(c, list) for c in msgs):
            return [("messages", c, f"messages[{i}]") for i, c in enumerate(msgs)]
        return [("messages", msgs, "messages")]
    if "input" not in body:
        raise schema_error("missing field 'input' (a text, a list of texts, token ids) or 'messages'", "input")
    x = body["input"]
    if isinstance(x, str):
        return [("text", x, "input")]
    if not isinstance(x, list) or not x:
        raise schema_error("'input' must be a string, a non-empty list of strings, a list of token ids, "
                           "or a list of token-id lists", "input")
    if all(_is_int(t) for t in x):
        return [("ids", x, "input")]
    if all(_is_message(m) for m in x):
        return [("messages", x, "input")]
    items: List[Item] = []
    for i, v in enumerate(x):
        where = f"input[{i}]"
        if isinstance(v, str):
            items.append(("text", v, where))
        elif isinstance(v, list) and v:
            items.append(("ids", _token_list(v, where), where))
        else:
            raise schema_error(f"{where} must be a string or a non-empty list of token ids", where)
    return items


def score_items(body: Mapping[str, Any]) -> List[Item]:
    """armorm's /v1/score: {"messages": [...]} (one conversation) or {"conversations": [[...], ...]}."""
    if body.get("conversations") is not None:
        convs = body["conversations"]
        if not isinstance(convs, list) or not convs:
            raise schema_error("'conversations' must be a non-empty list of message lists", "conversations")
        return [("messages", c, f"conversations[{i}]") for i, c in enumerate(convs)]
    if body.get("messages") is not None:
        return [("messages", body["messages"], "messages")]
    raise schema_error("missing field 'messages' (one conversation) or 'conversations' (a list of them)",
                       "messages")


def optional_bool(body: Mapping[str, Any], *names: str) -> Optional[bool]:
    """The first of `names` present and not null, which must be a boolean."""
    for n in names:
        v = body.get(n)
        if v is not None:
            if not isinstance(v, bool):
                raise schema_error(f"'{n}' must be true or false", n)
            return v
    return None
