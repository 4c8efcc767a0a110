"""Tests for armorm.tokenizer: parity with transformers' apply_chat_template, gating pattern, errors.

The Llama-3 tokenizer is built from Meta's tiktoken file in the ``llama-models``
wheel (see tests/llama3_tokenizer.py), cached under ``$ARMORM_TEST_CACHE`` or
``~/.cache/armorm-tests``. If it cannot be downloaded the fixture raises, so
the dependent tests ERROR rather than skip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from armorm.tokenizer import (
    ChatTokenizer,
    conversation_from_record,
    find_gating_position,
    format_conversations,
    gating_pattern,
)
from chat_data import LLAMA3_GATING, A, S, U, hf_ids
from llama3_tokenizer import LLAMA3_CHAT_TEMPLATE, LLAMA3_PATTERN, load_llama3_ranks, llama3_tokenizer_dir

GATING_TEXT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def cache_root() -> Path:
    return Path(os.environ.get("ARMORM_TEST_CACHE", "~/.cache/armorm-tests")).expanduser()


@pytest.fixture(scope="session")
def llama3_dir(cache_root) -> Path:
    # No try/except: a failed download must make the tests error, not skip.
    return llama3_tokenizer_dir(cache_root)


@pytest.fixture(scope="session")
def tok(llama3_dir) -> ChatTokenizer:
    return ChatTokenizer.from_pretrained(llama3_dir)


@pytest.fixture(scope="session")
def hf_tok(llama3_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(llama3_dir))


LONG = ("The quick brown fox jumps over the lazy dog. " * 600) + ("1234567890" * 300) + (" " * 3000) + "end"

CONVERSATIONS = {
    "simple": [U("Hello, how are you?"), A("I'm fine, thanks!")],
    "system": [S("You are a helpful assistant."), U("What is 2+2?"), A("4")],
    "multi_turn": [U("Hi"), A("Hello!"), U("Tell me a joke."), A("Why did the chicken cross the road?"),
                   U("Why?"), A("To get to the other side.")],
    "system_multi": [S("Be terse."), U("a"), A("b"), U("c"), A("d")],
    "user_only": [U("Just a question?")],
    "emoji": [U("Family: 👨‍👩‍👧‍👦 thumbs 👍🏽 flags 🇫🇷🇯🇵"), A("🎉🎉🎉 party 🥳")],
    "cjk": [U("你好，世界。今天天气怎么样？"), A("日本語のテキストと한국어 텍스트")],
    "combining": [U("e\u0301 n\u0303 a\u030a Z\u0324\u0308 q\u0323\u0307"), A("Cafe\u0301 vs Café")],
    "rtl_indic": [U("مرحبا بالعالم שלום עולם"), A("नमस्ते दुनिया ภาษาไทย")],
    "whitespace": [U("   leading and trailing   \n\n"), A("\t\ttabbed\t\n  ")],
    "whitespace_only": [U("   \n\t  "), A(" ")],
    "empty_assistant": [U("Say nothing."), A("")],
    "empty_user": [U(""), A("Nothing was said.")],
    "long": [U(LONG), A("ok " * 2000)],
    "special_text_in_content": [U("Ignore <|eot_id|> and <|start_header_id|>assistant<|end_header_id|>\n\nthis"),
                                A("<|begin_of_text|>fake bos <|end_of_text|> <|reserved_special_token_5|>")],
    "code": [U("Fix this:\n```python\ndef f(x):\n    return x  +1\n```"),
             A("```python\ndef f(x):\n    return x + 1\n```\n\nDone.")],
    "numbers_punct": [U("3.14159, 1,000,000; $42.00!!! 12345678901234 ...?!"), A("-0.5e-10 ≈ 0 ∑∫√")],
    "crlf": [U("line one\r\nline two\r\n\r\nline four"), A("ok\r\n")],
    "contractions": [U("I'm sure you'll see they'VE it's JOHN'S"), A("We'd've")],
    "control_chars": [U("null\x00 bell\x07 del\x7f esc\x1b"), A("zero\u200bwidth nbsp\u00a0here")],
    "math_letters": [U("𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕋𝕖𝕩𝕥 and ﬁ ligature"), A("Ⅻ ⅓ ² ₂")],
    "tool_role": [U("weather?"), {"role": "tool", "content": "{\"temp\": 21}"}, A("It is 21 degrees.")],
    "markdown": [S(""), U("| a | b |\n|---|---|\n| 1 | 2 |"), A("* item\n  * nested\n\n> quote")],
}


# --------------------------------------------------------------------------- the test tokenizer itself


def test_llama3_tokenizer_matches_tiktoken(llama3_dir, tok):
    """The converted tokenizer.json encodes like Meta's tiktoken ranks (validates the test helper)."""
    import tiktoken

    from llama3_tokenizer import LLAMA3_SPECIAL_TOKENS

    ranks = load_llama3_ranks(llama3_dir / "tokenizer.model")
    enc = tiktoken.Encoding(
        name="llama3",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL_TOKENS)},
    )
    texts = [m["content"] for conv in CONVERSATIONS.values() for m in conv] + [GATING_TEXT, "hello world"]
    for text in texts:
        assert tok.encode(text, add_special_tokens=False) == enc.encode(text, allowed_special="all"), text[:80]
    assert len(tok) == 128256 and tok.vocab_size == 128000


def test_basic_token_api(tok, hf_tok):
    assert tok.bos_token == "<|begin_of_text|>" and tok.bos_token_id == 128000
    assert tok.eos_token == "<|eot_id|>" and tok.eos_token_id == 128009
    assert tok.pad_token is None and tok.pad_token_id is None
    assert tok.encode("hello world") == [128000, 15339, 1917]  # post-processor prepends BOS
    assert tok.encode("hello world", add_special_tokens=False) == [15339, 1917]
    assert tok.add_bos_token is True
    assert tok("hello world")["input_ids"] == hf_tok("hello world")["input_ids"]
    assert tok("hello world", add_special_tokens=False)["input_ids"] == [15339, 1917]
    assert tok.convert_tokens_to_ids("<|eot_id|>") == 128009
    assert tok.convert_tokens_to_ids(["<|start_header_id|>", "<|end_header_id|>"]) == [128006, 128007]
    assert tok.convert_tokens_to_ids("<|definitely not a token|>") is None
    assert (tok.vocab_size, len(tok)) == (hf_tok.vocab_size, len(hf_tok))
    ids = tok.encode("Café 你好 👍🏽")
    assert tok.decode(ids) == "<|begin_of_text|>Café 你好 👍🏽"
    assert tok.decode(ids, skip_special_tokens=True) == "Café 你好 👍🏽"
    assert tok.decode(np.asarray(ids)) == hf_tok.decode(ids)


# --------------------------------------------------------------------------- (a) gating pattern


def test_gating_pattern_llama3(tok, hf_tok):
    assert tok.encode(GATING_TEXT, add_special_tokens=False) == LLAMA3_GATING
    assert hf_tok.encode(GATING_TEXT, add_special_tokens=False) == LLAMA3_GATING
    assert gating_pattern(tok) == LLAMA3_GATING
    assert gating_pattern(hf_tok) == LLAMA3_GATING


def test_gating_position_in_formatted_conversation(tok, hf_tok):
    conv = CONVERSATIONS["multi_turn"]
    [ids] = format_conversations(tok, [conv])
    assert ids == format_conversations(hf_tok, [conv])[0]
    pos = find_gating_position(ids, LLAMA3_GATING)
    # the last user turn ends right before the final assistant header
    last_header = len(ids) - 1 - ids[::-1].index(78191)  # 'assistant' token of the final header
    assert pos == last_header - 2 and ids[pos] == 128009
    assert ids[pos : pos + 5] == LLAMA3_GATING


# --------------------------------------------------------------------------- (b) parity with transformers


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_apply_chat_template_matches_transformers(tok, hf_tok, name, add_generation_prompt):
    conv = CONVERSATIONS[name]
    ours = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
    theirs = hf_ids(hf_tok, conv, add_generation_prompt=add_generation_prompt)
    assert isinstance(ours, list) and all(type(i) is int for i in ours)
    assert ours == theirs
    assert ours[0] == 128000
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == hf_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") == add_generation_prompt


def test_special_token_text_in_content_is_a_special_token(tok):
    # Like transformers (without sanitize_control_tokens), special-token text in content becomes the token.
    ids = tok.apply_chat_template([U("a<|eot_id|>b")])
    assert ids.count(128009) == 2


def test_batch_matches_transformers(tok, hf_tok):
    convs = [CONVERSATIONS[n] for n in ("simple", "system", "cjk", "empty_assistant")]
    ours = tok.apply_chat_template(convs)
    assert ours == hf_ids(hf_tok, convs)
    assert ours == [tok.apply_chat_template(c) for c in convs]
    assert tok.apply_chat_template(convs, tokenize=False) == hf_tok.apply_chat_template(convs, tokenize=False)
    assert format_conversations(tok, convs) == ours
    assert format_conversations(hf_tok, convs) == ours


def test_return_tensors_np_pt(tok, hf_tok):
    import torch

    conv = CONVERSATIONS["system"]
    expected = hf_ids(hf_tok, conv)
    arr = tok.apply_chat_template(conv, return_tensors="np")
    assert isinstance(arr, np.ndarray) and arr.dtype == np.int64 and arr.shape == (1, len(expected))
    hf_arr = hf_ids(hf_tok, conv, return_tensors="np")
    assert arr.shape == hf_arr.shape and np.array_equal(arr, hf_arr)
    t = tok.apply_chat_template(conv, return_tensors="pt")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.long and tuple(t.shape) == (1, len(expected))
    assert torch.equal(t, hf_ids(hf_tok, conv, return_tensors="pt"))
    # batch of equal lengths -> [B, L]
    batch = tok.apply_chat_template([conv, conv], return_tensors="np")
    assert batch.shape == (2, len(expected))
    # return_dict
    d = tok.apply_chat_template(conv, return_dict=True, return_tensors="np")
    hf_d = hf_tok.apply_chat_template(conv, return_dict=True, return_tensors="np")
    assert set(d) == {"input_ids", "attention_mask"}
    assert np.array_equal(d["input_ids"], hf_d["input_ids"])
    assert np.array_equal(d["attention_mask"], hf_d["attention_mask"])
    d = tok.apply_chat_template(conv, return_dict=True)
    assert d == {"input_ids": expected, "attention_mask": [1] * len(expected)}


def test_unequal_batch_tensors_need_padding(tok):
    convs = [CONVERSATIONS["simple"], CONVERSATIONS["system"]]
    with pytest.raises(ValueError, match="padding"):
        tok.apply_chat_template(convs, return_tensors="np")
    with pytest.raises(ValueError, match="pad token"):
        tok.apply_chat_template(convs, padding=True)


def test_padding_matches_transformers(llama3_dir):
    from transformers import AutoTokenizer

    ours = ChatTokenizer.from_pretrained(llama3_dir, pad_token="<|end_of_text|>")
    hf = AutoTokenizer.from_pretrained(str(llama3_dir), pad_token="<|end_of_text|>")
    convs = [CONVERSATIONS["simple"], CONVERSATIONS["system"], CONVERSATIONS["cjk"]]
    d = ours.apply_chat_template(convs, padding=True, return_dict=True, return_tensors="np")
    hd = hf.apply_chat_template(convs, padding=True, return_dict=True, return_tensors="np")
    assert np.array_equal(d["input_ids"], hd["input_ids"])
    assert np.array_equal(d["attention_mask"], hd["attention_mask"])
    assert (d["input_ids"][d["attention_mask"] == 0] == 128001).all() and (d["attention_mask"] == 0).any()
    d = ours.apply_chat_template(convs, padding="max_length", max_length=60, return_dict=True)
    hd = hf.apply_chat_template(convs, padding="max_length", max_length=60, return_dict=True)
    assert d["input_ids"] == hd["input_ids"] and d["attention_mask"] == hd["attention_mask"]
    assert all(len(s) == 60 for s in d["input_ids"])


@pytest.mark.parametrize("max_length", [1, 7, 25, 10_000])
def test_truncation_matches_transformers(tok, hf_tok, max_length):
    conv = CONVERSATIONS["system_multi"]
    full = tok.apply_chat_template(conv)
    ours = tok.apply_chat_template(conv, truncation=True, max_length=max_length)
    assert ours == full[:max_length]
    assert ours == hf_ids(hf_tok, conv, truncation=True, max_length=max_length)
    arr = tok.apply_chat_template(conv, truncation=True, max_length=max_length, return_tensors="np")
    assert arr.shape == (1, min(max_length, len(full)))
    assert np.array_equal(arr, hf_ids(hf_tok, conv, truncation=True, max_length=max_length, return_tensors="np"))
    # max_length without truncation does not truncate (transformers' apply_chat_template default)
    assert tok.apply_chat_template(conv, max_length=max_length) == full == hf_ids(hf_tok, conv, max_length=max_length)
    assert format_conversations(tok, [conv], max_length=max_length, truncation=True) == [full[:max_length]]
    assert format_conversations(hf_tok, [conv], max_length=max_length, truncation=True) == [full[:max_length]]


def test_truncation_defaults_to_model_max_length(llama3_dir, tok, hf_tok):
    from transformers import AutoTokenizer

    conv = CONVERSATIONS["multi_turn"]
    full = tok.apply_chat_template(conv)
    # Llama-3's model_max_length is effectively unlimited: no truncation
    assert tok.apply_chat_template(conv, truncation=True) == full == hf_ids(hf_tok, conv, truncation=True)
    short = ChatTokenizer.from_pretrained(llama3_dir, model_max_length=10)
    hf_short = AutoTokenizer.from_pretrained(str(llama3_dir), model_max_length=10)
    assert short.apply_chat_template(conv, truncation=True) == full[:10] == hf_ids(hf_short, conv, truncation=True)


def test_continue_final_message_matches_transformers(tok, hf_tok):
    conv = [U("Write a haiku."), A("Autumn moonlight -  ")]
    ours = tok.apply_chat_template(conv, continue_final_message=True)
    assert ours == hf_ids(hf_tok, conv, continue_final_message=True)
    assert ours[-1] != 128009
    with pytest.raises(ValueError):
        tok.apply_chat_template(conv, continue_final_message=True, add_generation_prompt=True)


def test_message_extra_keys_and_none_values(tok, hf_tok):
    conv = [{"role": "user", "content": "hi", "name": None, "meta": {"x": 1}}, A("yo")]
    assert tok.apply_chat_template(conv) == hf_ids(hf_tok, conv)


# --------------------------------------------------------------------------- (c) a tiny synthetic tokenizer

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
TINY_WORDS = ["\n", "user", "assistant", "system", " ", "Hello", "there", "Hi", "How", "are", "you", "?", "!",
              ",", ".", "I", "am", "fine", "You", "a", "helpful", "bot", "ok", "\n\n", "[", "]", "{", "}", "\"",
              ":", "1", "x", "y", "tool"]


def write_tiny_dir(path: Path, template=CHATML, config_extra=None, special_map=None, drop_keys=()) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel

    path.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + TINY_WORDS)}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]|\s+"), behavior="isolated")
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIALS])
    tk.save(str(path / "tokenizer.json"))
    config = {
        "chat_template": template,
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 64,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    config.update(config_extra or {})
    for k in drop_keys:
        config.pop(k, None)
    if template is None:
        config.pop("chat_template")
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if special_map is not None:
        (path / "special_tokens_map.json").write_text(json.dumps(special_map))
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_tiny_dir(tmp_path_factory.mktemp("tiny") / "chatml")


def tiny_id(token: str) -> int:
    return (TINY_SPECIALS + TINY_WORDS).index(token)


def test_tiny_gating_pattern_from_template(tiny_dir):
    from transformers import PreTrainedTokenizerFast

    ours = ChatTokenizer.from_pretrained(tiny_dir)
    hf = PreTrainedTokenizerFast.from_pretrained(str(tiny_dir))
    expected = [tiny_id("<|im_end|>"), tiny_id("\n"), tiny_id("<|im_start|>"), tiny_id("assistant"), tiny_id("\n")]
    assert expected == [2, 4, 1, 6, 4]
    assert gating_pattern(ours) == expected
    assert gating_pattern(hf) == expected
    assert ours.eos_token_id == 2 and ours.pad_token_id == 3 and ours.bos_token_id is None
    assert ours.encode("Hello there") == [tiny_id("Hello"), tiny_id(" "), tiny_id("there")]  # no BOS here


TINY_CONVS = [
    [U("Hello there"), A("Hi!")],
    [S("You are a helpful bot."), U("How are you?"), A("I am fine, ok.")],
    [U("unknown words here"), A("")],
    [U("Hello"), A("Hi"), U("How are you?"), A("fine")],
    [U(" Hello  \n\n"), A("<|im_end|> inside")],
]


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_tiny_matches_transformers(tiny_dir, add_generation_prompt):
    from transformers import PreTrainedTokenizerFast

    ours = ChatTokenizer.from_pretrained(tiny_dir)
    hf = PreTrainedTokenizerFast.from_pretrained(str(tiny_dir))
    for conv in TINY_CONVS:
        mine = ours.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
        assert mine == hf_ids(hf, conv, add_generation_prompt=add_generation_prompt)
        assert find_gating_position(mine, gating_pattern(ours)) >= 0 or len(conv) == 1
    d = ours.apply_chat_template(TINY_CONVS, padding=True, return_dict=True, return_tensors="np")
    hd = hf.apply_chat_template(TINY_CONVS, padding=True, return_dict=True, return_tensors="np")
    assert np.array_equal(d["input_ids"], hd["input_ids"])
    assert np.array_equal(d["attention_mask"], hd["attention_mask"])
    # model_max_length 64 is the default truncation length here
    long_conv = [U("Hello " * 40), A("ok")]
    got = ours.apply_chat_template(long_conv, truncation=True)
    assert len(got) == 64 and got == hf_ids(hf, long_conv, truncation=True)


KITCHEN_SINK = (
    "{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% if ns.n > 50 %}{% break %}{% endif %}"
    "{% endfor %}"
    "{% if extra is defined %}{{ extra | tojson }}{% endif %}"
    "{% if tools is not none %}{{ raise_exception('no tools') }}{% endif %}"
    "{{ eos_token if add_eos_at_end is defined and add_eos_at_end else '' }}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_features_match_transformers(tmp_path):
    """namespace, loop controls, {% generation %}, tojson, extra kwargs, raise_exception, tools=None."""
    import jinja2
    from transformers import PreTrainedTokenizerFast

    d = write_tiny_dir(tmp_path / "sink", template=KITCHEN_SINK)
    ours = ChatTokenizer.from_pretrained(d)
    hf = PreTrainedTokenizerFast.from_pretrained(str(d))
    conv = [S("You are a helpful bot."), U("Hello"), A("  Hi there  ")]
    kw = dict(extra={"x": "y", "1": [1]}, add_eos_at_end=True)
    assert ours.apply_chat_template(conv, tokenize=False, **kw) == hf.apply_chat_template(conv, tokenize=False, **kw)
    assert ours.apply_chat_template(conv, **kw) == hf_ids(hf, conv, **kw)
    assert "<|im_end|>" in ours.apply_chat_template(conv, tokenize=False, **kw)[-12:]
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        ours.apply_chat_template(conv, tools=[{"name": "f"}])
    assert gating_pattern(ours) == [2, 4, 1, 6, 4]


def test_config_variants(tmp_path):
    """Template as a list of named templates, dict-form special tokens, chat_template.jinja priority,
    special_tokens_map.json for a config without added_tokens_decoder; all as transformers reads them."""
    from transformers import PreTrainedTokenizerFast

    alt = CHATML.replace("'\n' + message['content']", "':' + message['content']")
    d = write_tiny_dir(
        tmp_path / "variants",
        template=[{"name": "default", "template": CHATML}, {"name": "alt", "template": alt}],
        config_extra={"eos_token": {"content": "<|im_end|>", "__type": "AddedToken", "special": True}},
        special_map={"bos_token": {"content": "<|im_start|>", "lstrip": False, "normalized": False,
                                   "rstrip": False, "single_word": False}},
    )
    ours = ChatTokenizer.from_pretrained(d)
    hf = PreTrainedTokenizerFast.from_pretrained(str(d))
    assert ours.eos_token == hf.eos_token == "<|im_end|>"
    assert ours.bos_token == hf.bos_token == "<|im_start|>"
    conv = [U("Hello"), A("Hi")]
    assert ours.apply_chat_template(conv) == hf_ids(hf, conv)
    assert ours.apply_chat_template(conv, chat_template="alt") == hf_ids(hf, conv, chat_template="alt")
    assert ours.apply_chat_template(conv, tokenize=False, chat_template="alt").startswith("<|im_start|>user:")
    # chat_template.jinja overrides the config's template
    (d / "chat_template.jinja").write_text("{{ bos_token }}" + CHATML)
    ours = ChatTokenizer.from_pretrained(d)
    hf = PreTrainedTokenizerFast.from_pretrained(str(d))
    assert ours.apply_chat_template(conv) == hf_ids(hf, conv)
    assert ours.apply_chat_template(conv)[:2] == [1, 1]


def test_loading_never_runs_model_code(tmp_path):
    d = write_tiny_dir(tmp_path / "evil", config_extra={
        "auto_map": {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]},
        "tokenizer_class": "EvilTokenizer",
    })
    marker = tmp_path / "pwned"
    (d / "tokenization_evil.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nclass EvilTokenizer: pass\n")
    t = ChatTokenizer.from_pretrained(d)
    assert t.apply_chat_template([U("Hello")]) == [1, 5, 4, 9, 2, 4]
    assert not marker.exists()


# --------------------------------------------------------------------------- (d) errors


def test_missing_or_malformed_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ChatTokenizer.from_pretrained(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        ChatTokenizer.from_pretrained(empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        ChatTokenizer.from_pretrained(bad)
    (bad / "tokenizer.json").write_text(json.dumps({"model": {"type": "Nonsense"}}))
    with pytest.raises(ValueError, match="tokenizer.json"):
        ChatTokenizer.from_pretrained(bad)
    good = write_tiny_dir(tmp_path / "badcfg")
    (good / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        ChatTokenizer.from_pretrained(good)


def test_message_validation(tok):
    with pytest.raises(ValueError, match="message 1 has no 'role'"):
        tok.apply_chat_template([U("hi"), {"content": "no role"}])
    with pytest.raises(ValueError, match="message 0 has no 'content'"):
        tok.apply_chat_template([{"role": "user"}])
    with pytest.raises(TypeError, match="message 1: 'content' must be a string"):
        tok.apply_chat_template([U("hi"), {"role": "assistant", "content": 42}])
    with pytest.raises(TypeError, match="message 0: 'content' must be a string"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}])
    with pytest.raises(TypeError, match="message 0: 'role' must be a string"):
        tok.apply_chat_template([{"role": 1, "content": "hi"}])
    with pytest.raises(TypeError, match="message 1 must be a dict"):
        tok.apply_chat_template([U("hi"), "hello"])
    with pytest.raises(ValueError, match="conversation 1: message 0 has no 'role'"):
        tok.apply_chat_template([[U("a")], [{"content": "b"}]])
    # empty content is fine
    assert tok.apply_chat_template([U("")])[-1] == 128009


def test_empty_conversation(tok):
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([])
    with pytest.raises(ValueError, match="empty conversation"):
        tok.apply_chat_template([[U("a")], []])
    with pytest.raises(ValueError, match="empty conversation"):
        format_conversations(tok, [[]])


def test_template_without_generation_prompt(tmp_path):
    from transformers import PreTrainedTokenizerFast

    no_gen = CHATML[: CHATML.index("{% if add_generation_prompt %}")]
    d = write_tiny_dir(tmp_path / "nogen", template=no_gen)
    for t in (ChatTokenizer.from_pretrained(d), PreTrainedTokenizerFast.from_pretrained(str(d))):
        with pytest.raises(ValueError, match="gating_pattern") as info:
            gating_pattern(t)
        assert "generation prompt" in str(info.value)


def test_llama3_template_without_generation_prompt(tmp_path, llama3_dir):
    d = tmp_path / "llama_nogen"
    d.mkdir()
    (d / "tokenizer.json").symlink_to(llama3_dir / "tokenizer.json")
    cfg = json.loads((llama3_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = LLAMA3_CHAT_TEMPLATE[: LLAMA3_CHAT_TEMPLATE.index("{% if add_generation_prompt %}")]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gating_pattern"):
        gating_pattern(ChatTokenizer.from_pretrained(d))


def test_gating_pattern_not_in_rendered_conversation(tmp_path):
    # The generation prompt says "assistant" but assistant turns are rendered as "bot".
    odd = CHATML.replace("message['role']", "('bot' if message['role'] == 'assistant' else message['role'])")
    d = write_tiny_dir(tmp_path / "odd", template=odd)
    with pytest.raises(ValueError, match="does not occur.*gating_pattern"):
        gating_pattern(ChatTokenizer.from_pretrained(d))


def test_no_chat_template(tmp_path):
    d = write_tiny_dir(tmp_path / "notpl", template=None)
    t = ChatTokenizer.from_pretrained(d)
    with pytest.raises(ValueError, match="no chat template"):
        t.apply_chat_template([U("Hello")])
    with pytest.raises(ValueError, match="gating_pattern"):
        gating_pattern(t)


def test_format_conversations_inputs(tok):
    conv = [U("Hello"), A("Hi")]
    assert format_conversations(tok, [{"prompt": "Hello", "response": "Hi"}]) == format_conversations(tok, [conv])
    assert format_conversations(tok, [{"messages": conv}]) == [tok.apply_chat_template(conv)]
    with pytest.raises(TypeError, match="list of conversations"):
        format_conversations(tok, conv)
    with pytest.raises(TypeError):
        format_conversations(object(), [conv])


# --------------------------------------------------------------------------- (e) find_gating_position


def test_find_gating_position():
    p = [7, 8, 9]
    assert find_gating_position([1, 7, 8, 9, 2, 7, 8, 9, 3], p) == 5  # last occurrence
    assert find_gating_position([1, 2, 3, 7, 8], p) == -1  # absent (partial at the end)
    assert find_gating_position([7, 8, 9, 1, 2], p) == 0  # at position 0
    assert find_gating_position([1, 2, 7, 8, 9], p) == 2  # at the very end
    assert find_gating_position([7, 8, 9], p) == 0  # whole sequence
    assert find_gating_position([7, 8], p) == -1  # shorter than the pattern
    assert find_gating_position([], p) == -1
    assert find_gating_position([1, 1, 1, 1], [1, 1]) == 2  # overlapping occurrences
    assert find_gating_position(np.array([[5, 7, 8, 9]]), np.array(p)) == 1  # numpy, [1, L]
    assert find_gating_position([128009, 128006, 78191, 128007, 271], LLAMA3_GATING) == 0
    with pytest.raises(ValueError):
        find_gating_position([1, 2], [])


# --------------------------------------------------------------------------- records


def test_conversation_from_record():
    msgs = [U("q"), A("a")]
    assert conversation_from_record({"messages": msgs, "score": 1}) == msgs
    assert conversation_from_record({"prompt": "q", "response": "a"}) == msgs
    with pytest.raises(ValueError, match="'response'"):
        conversation_from_record({"prompt": "q"})
    with pytest.raises(ValueError, match="'prompt'"):
        conversation_from_record({"response": "a"})
    with pytest.raises(ValueError, match="messages"):
        conversation_from_record({"chosen": msgs})
    with pytest.raises(ValueError, match="string"):
        conversation_from_record({"prompt": "q", "response": None})
    with pytest.raises(ValueError):
        conversation_from_record(["not", "a", "dict"])
    with pytest.raises(ValueError, match="list of message dicts"):
        conversation_from_record({"messages": "hello"})
