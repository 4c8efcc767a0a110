"""Conversation helpers the tokenizer and chat-template tests share.

`U`, `A`, `S`: a user, assistant or system message; `hf_ids`: transformers'
apply_chat_template as plain ids; `LLAMA3_GATING`: the ids of the text that
opens Llama 3's final assistant turn.
"""
from __future__ import annotations

LLAMA3_GATING = [128009, 128006, 78191, 128007, 271]


def hf_ids(hf, conv, **kw):
    """transformers apply_chat_template as plain ids (5.x returns a BatchEncoding by default)."""
    kw.setdefault("return_dict", False)
    out = hf.apply_chat_template(conv, **kw)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    return out


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def S(text):
    return {"role": "system", "content": text}
