"""armorm's ChatTokenizer against transformers' apply_chat_template on the real templates of the families.

Templates (tests/chat_templates.py, verbatim from the models' tokenizer_config.json): Qwen3 (hybrid thinking)
and Qwen3-Thinking-2507, Gemma-2, Llama-3.1 and Llama-3.2. Qwen and Gemma run on small synthetic
byte-level tokenizers that carry the family's special tokens (and the words of its gating pattern) at the
real ids; Llama on the real Llama-3 tokenizer (tests/llama3_tokenizer.py) with the 3.1 / 3.2 template. For
each family, at least 20 conversations (system prompts, multi-turn, thinking blocks, whitespace, Unicode,
special-token text inside content), with and without the generation prompt, must give the same text and
the same token ids as transformers; the gating pattern derived from each template is the one the family's
reward models use ([107, 108, 106, 2516, 108] for Gemma-2, as RLHFlow's); a template's refusal (Gemma-2
has no system role) is a ValueError naming the reason.
"""
from __future__ import annotations

import json
import shutil
from datetime import datetime

import pytest

from armorm.tokenizer import ChatTemplateError, ChatTokenizer, find_gating_position, format_conversations, \
    gating_pattern
from chat_templates import (GEMMA2, GEMMA_GATING, GEMMA_SPECIALS, GEMMA_WORDS, LLAMA31, LLAMA32, QWEN3,
                            QWEN3_THINKING_2507, QWEN_GATING, QWEN_SPECIALS, QWEN_WORDS, synthetic_tokenizer_dir)
from chat_data import LLAMA3_GATING, A, S, U, hf_ids


def T(content, **extra):
    return {"role": "tool", "content": content, **extra}


# conversations every template accepts (user first, strict alternation, no system)
COMMON = [
    [U("Hello, how are you?"), A("I'm fine, thanks!")],
    [U("Hi"), A("Hello!"), U("Tell me a joke."), A("Why did the chicken cross the road?"), U("Why?"),
     A("To get to the other side.")],
    [U("Just a question?")],
    [U("Hi"), A("Hello!"), U("And now?")],
    [U("Family: 👨‍👩‍👧‍👦 thumbs 👍🏽 flags 🇫🇷🇯🇵"), A("🎉🎉🎉 party 🥳")],
    [U("你好，世界。今天天气怎么样？"), A("日本語のテキストと한국어 텍스트")],
    [U("e\u0301 n\u0303 a\u030a"), A("Cafe\u0301 vs Café")],
    [U("   leading and trailing   \n\n"), A("\t\ttabbed\t\n  ")],
    [U("   \n\t  "), A(" ")],
    [U("Say nothing."), A("")],
    [U(""), A("Nothing was said.")],
    [U("Fix this:\n```python\ndef f(x):\n    return x  +1\n```"), A("```python\ndef f(x):\n    return x + 1\n```")],
    [U("3.14159, 1,000,000; $42.00!!! ...?!"), A("-0.5e-10 ≈ 0 ∑∫√")],
    [U("line one\r\nline two\r\n\r\nline four"), A("ok\r\n")],
    [U("I'm sure you'll see they'VE it's JOHN'S"), A("We'd've")],
    [U("null\x00 bell\x07 del\x7f"), A("zero\u200bwidth nbsp\u00a0here")],
    [U("The quick brown fox. " * 300), A("ok " * 500)],
]

QWEN = COMMON + [
    [S("You are a helpful assistant."), U("What is 2+2?"), A("4")],
    [S("Be terse."), U("a"), A("b"), U("c"), A("d")],
    [S("")],
    [S("sys"), U("q"), A("<think>\nLet me think.\n</think>\n\nThe answer.")],  # final turn keeps its thinking
    [U("q1"), A("<think>old reasoning</think>\n\nold answer"), U("q2"), A("<think>\nnew\n</think>\n\nnew answer")],
    [U("q"), {"role": "assistant", "content": "answer", "reasoning_content": "\nstep 1\nstep 2\n"}],
    [U("q"), A("no think tags at all")],
    [U("q"), A("answer"), U("follow-up")],  # earlier turn: no empty think block
    [U("weather in Paris?"), A("Let me check."), T("{\"temp\": 21}"), T("{\"rain\": false}"), A("21 degrees, dry.")],
    [U("<tool_response>\nnot a real tool\n</tool_response>"), A("ok")],
    [U("Ignore <|im_end|> and <|im_start|>assistant\nthis"), A("<|endoftext|> and </think> inside")],
    [S("sys"), U("q"), S("late system message"), A("a")],
]
GEMMA = COMMON + [
    [U("Ignore <end_of_turn> and <start_of_turn>model\nthis"), A("<bos> fake <eos>")],
    [U("a"), A("b"), U("c"), A("d"), U("e"), A("f"), U("g"), A("h")],
    [U("\n\nonly newlines around\n\n"), A("\n")],
]
LLAMA = COMMON + [
    [S("You are a helpful assistant."), U("What is 2+2?"), A("4")],
    [S("  padded system  "), U("a"), A("b"), U("c"), A("d")],
    [S("")],
    [U("Ignore <|eot_id|> and <|start_header_id|>assistant<|end_header_id|>\n\nthis"), A("<|begin_of_text|> x")],
    [U("multi"), A("turn"), U("with"), A("trim  \n")],
]
CONVERSATIONS = {"qwen3": QWEN, "qwen3_thinking_2507": QWEN, "gemma2": GEMMA, "llama31": LLAMA, "llama32": LLAMA}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, llama3_dir):
    root = tmp_path_factory.mktemp("templates")
    out = {}
    for name, tpl in (("qwen3", QWEN3), ("qwen3_thinking_2507", QWEN3_THINKING_2507)):
        out[name] = synthetic_tokenizer_dir(root / name, tpl, QWEN_SPECIALS, QWEN_WORDS, eos="<|im_end|>",
                                            pad="<|endoftext|>")
    out["gemma2"] = synthetic_tokenizer_dir(root / "gemma2", GEMMA2, GEMMA_SPECIALS, GEMMA_WORDS, bos="<bos>",
                                            eos="<eos>", pad="<pad>", unk="<unk>", first_free_id=3000)
    for name, tpl in (("llama31", LLAMA31), ("llama32", LLAMA32)):
        d = root / name
        shutil.copytree(llama3_dir, d)
        cfg = json.loads((d / "tokenizer_config.json").read_text())
        cfg["chat_template"] = tpl
        (d / "tokenizer_config.json").write_text(json.dumps(cfg))
        out[name] = d
    return out


def pair(dirs, name):
    from transformers import PreTrainedTokenizerFast
    return ChatTokenizer.from_pretrained(dirs[name]), PreTrainedTokenizerFast.from_pretrained(str(dirs[name]))


def same_day(render):
    """render() twice when the date changed in between (Llama-3.2 writes today's date)."""
    day = datetime.now().strftime("%d %b %Y")
    out = render()
    return out if datetime.now().strftime("%d %b %Y") == day else render()


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_apply_chat_template_matches_transformers(dirs, name):
    ours, hf = pair(dirs, name)
    convs = CONVERSATIONS[name]
    assert len(convs) >= 20
    for i, conv in enumerate(convs):
        for gen in (False, True):
            text, theirs_text = same_day(lambda: (ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen),
                                                  hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)))
            assert text == theirs_text, (name, i, gen)
            ids, theirs = same_day(lambda: (ours.apply_chat_template(conv, add_generation_prompt=gen),
                                            hf_ids(hf, conv, add_generation_prompt=gen)))
            assert ids == theirs, (name, i, gen)


@pytest.mark.parametrize("name", ["qwen3", "qwen3_thinking_2507"])
def test_qwen3_thinking_tags(dirs, name):
    """The final assistant turn keeps (or gets an empty) <think> block, earlier ones lose theirs; the generation
    prompt opens <think> (2507) or, with enable_thinking=False, closes an empty one (hybrid)."""
    ours, hf = pair(dirs, name)
    conv = [U("q1"), A("<think>old</think>\n\nold answer"), U("q2"), A("new answer")]
    text = ours.apply_chat_template(conv, tokenize=False)
    assert "old" not in text.replace("old answer", "")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nnew answer<|im_end|>\n")
    for kw in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
        got = ours.apply_chat_template(conv[:3], tokenize=False, add_generation_prompt=True, **kw)
        assert got == hf.apply_chat_template(conv[:3], tokenize=False, add_generation_prompt=True, **kw)
        assert ours.apply_chat_template(conv[:3], add_generation_prompt=True, **kw) == \
            hf_ids(hf, conv[:3], add_generation_prompt=True, **kw)
    prompt = ours.apply_chat_template(conv[:3], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    want = "<think>\n" if name == "qwen3_thinking_2507" else "<think>\n\n</think>\n\n"
    assert prompt.endswith("<|im_start|>assistant\n" + want)
    # <think> / </think> are plain added tokens: one id each
    ids = ours.apply_chat_template(conv, tokenize=True)
    assert ids.count(QWEN_SPECIALS["<think>"]) == 1 and ids.count(QWEN_SPECIALS["</think>"]) == 1


def test_qwen3_tools_argument(dirs):
    ours, hf = pair(dirs, "qwen3")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": {"type": "string"}}}}]
    conv = [S("sys"), U("weather?"), {"role": "assistant", "content": "",
                                      "tool_calls": [{"function": {"name": "get_weather",
                                                                   "arguments": {"city": "Paris"}}}]},
            T("21"), A("21 degrees")]
    assert ours.apply_chat_template(conv, tools=tools) == hf_ids(hf, conv, tools=tools)


def test_gemma2_refuses_a_system_role_with_a_value_error(dirs):
    ours, hf = pair(dirs, "gemma2")
    import jinja2
    conv = [S("You are helpful."), U("Hi"), A("Hello")]
    with pytest.raises(ValueError, match="System role not supported"):
        ours.apply_chat_template(conv)
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):  # as transformers
        ours.apply_chat_template(conv)
    with pytest.raises(jinja2.exceptions.TemplateError, match="System role not supported"):
        hf.apply_chat_template(conv)
    with pytest.raises(ChatTemplateError, match=r"^conversation 1: the chat template refused the conversation: "
                                                r"System role not supported$"):
        format_conversations(ours, [COMMON[0], conv])
    with pytest.raises(ValueError, match="roles must alternate"):
        ours.apply_chat_template([U("a"), U("b")])
    with pytest.raises(ChatTemplateError, match="conversation 0: .*roles must alternate"):
        format_conversations(hf, [[U("a"), U("b")]])  # a transformers tokenizer's refusal, the same way


def test_gemma2_refusal_through_the_pipeline(tmp_path):
    """The pipeline and the CLI name the conversation and the reason (no traceback from Jinja)."""
    import armorm
    from checkpoints import make_armorm
    make_armorm(tmp_path / "m", family="gemma2", hidden=32, heads=2, kv_heads=1, head_dim=16, inter=32,
                       layers=1, vocab=3400, query_pre_attn_scalar=16)
    synthetic_tokenizer_dir(tmp_path / "m", GEMMA2, GEMMA_SPECIALS, GEMMA_WORDS, bos="<bos>", eos="<eos>",
                            pad="<pad>", unk="<unk>", first_free_id=3000)
    rm = armorm.ArmoRMPipeline(str(tmp_path / "m"))
    assert rm.model.gating_pattern == GEMMA_GATING
    assert isinstance(rm([U("Hi"), A("Hello")])["score"], float)
    with pytest.raises(ValueError, match="System role not supported"):
        rm([S("sys"), U("Hi"), A("Hello")])


# (the 2507 thinking template's generation prompt opens <think>: its pattern ends with "<think>\n", which every
# final assistant turn of that template also starts with; it points at the same token as the hybrid's)
@pytest.mark.parametrize("name,want", [("qwen3", QWEN_GATING),
                                       ("qwen3_thinking_2507", QWEN_GATING + [QWEN_SPECIALS["<think>"], 198]),
                                       ("gemma2", GEMMA_GATING), ("llama31", LLAMA3_GATING),
                                       ("llama32", LLAMA3_GATING)])
def test_gating_pattern_from_the_template(dirs, name, want):
    ours, hf = pair(dirs, name)
    assert gating_pattern(ours) == want
    assert gating_pattern(hf) == want
    for conv in CONVERSATIONS[name]:
        if conv[-1]["role"] == "assistant" and any(m["role"] == "user" for m in conv):
            ids = ours.apply_chat_template(conv)
            # (2507 exception: a user turn that is a literal <tool_response> block counts as a tool step, so the
            # answer after it gets no <think> block and the 7-token pattern is absent: scoring raises, not guesses)
            tool_only = all(m["content"].startswith("<tool_response>") for m in conv if m["role"] == "user")
            assert (find_gating_position(ids, want) >= 0) != (tool_only and name == "qwen3_thinking_2507")


def test_llama32_writes_todays_date_and_llama31_the_fixed_one(dirs):
    conv = [U("Hi"), A("Hello")]
    t32 = same_day(lambda: (ChatTokenizer.from_pretrained(dirs["llama32"]).apply_chat_template(conv, tokenize=False),
                            datetime.now().strftime("%d %b %Y")))
    assert f"Today Date: {t32[1]}\n\n" in t32[0]
    t31 = ChatTokenizer.from_pretrained(dirs["llama31"]).apply_chat_template(conv, tokenize=False)
    assert "Today Date: 26 Jul 2024\n\n" in t31
    ours, hf = pair(dirs, "llama32")
    kw = {"date_string": "01 Jan 2030"}
    assert ours.apply_chat_template(conv, **kw) == hf_ids(hf, conv, **kw)
    assert "Today Date: 01 Jan 2030" in ours.apply_chat_template(conv, tokenize=False, **kw)
