"""Chat-template tokenization for ArmoRM without torch or transformers.

:class:`ChatTokenizer` loads a Hugging Face model directory's ``tokenizer.json``
with the ``tokenizers`` library, reads the chat template and special tokens from
``tokenizer_config.json`` (``special_tokens_map.json`` as the legacy fallback,
``chat_template.jinja`` if present), and reproduces
``PreTrainedTokenizerFast.apply_chat_template`` of transformers 5.x token for
token: the template is rendered with a sandboxed Jinja environment set up like
transformers' one, and the rendered text is encoded with
``add_special_tokens=False`` (the template writes the BOS text itself).

Nothing from the model directory is executed: ``auto_map`` / custom tokenizer
classes are ignored, only JSON and Jinja text are read.

Module-level helpers, which accept a :class:`ChatTokenizer` or any transformers
tokenizer:

* :func:`gating_pattern` - token ids that open the final assistant turn, derived
  from the chat template (Llama 3: ``[128009, 128006, 78191, 128007, 271]``).
* :func:`find_gating_position` - start of the last occurrence of a pattern.
* :func:`format_conversations` - chat-template a batch into token id lists.
* :func:`conversation_from_record` - dataset record -> message list.

Runtime dependencies: ``tokenizers``, ``jinja2``, ``numpy``; ``torch`` only for
``return_tensors="pt"`` (imported lazily).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

import numpy as np

__all__ = [
    "ChatTokenizer",
    "conversation_from_record",
    "find_gating_position",
    "format_conversations",
    "gating_pattern",
]

Message = dict[str, Any]
Conversation = list[Message]

# Named special-token attributes that transformers passes to the chat template.
_SPECIAL_TOKEN_ATTRS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# transformers treats model_max_length above this as "no limit" (VERY_LARGE_INTEGER is 1e30).
_LARGE_INTEGER = int(1e20)
_VERY_LARGE_INTEGER = int(1e30)
# Message fields under which a reasoning trace may be given; transformers copies it under all of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


# --------------------------------------------------------------------------- Jinja


def _make_jinja_env():
    """A sandboxed Jinja environment with the same options, filters and globals as transformers'."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _GenerationTag(jinja2.ext.Extension):
        """Accepts ``{% generation %}...{% endgeneration %}`` and renders the body unchanged.

        transformers uses the tag to compute assistant-token masks; for plain rendering
        it is transparent, but a template using it would not even parse without the tag.
        """

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Unlike Jinja's own tojson this does not HTML-escape.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _DictFactory:
        """``dict(...)`` / ``dict.fromkeys(...)`` for templates, without exposing the type object."""

        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class _Namespace(jinja2.utils.Namespace):
        """``namespace(...)`` that refuses underscore-prefixed attribute names."""

        def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2.utils.Namespace
            self, rest = args[0], args[1:]
            attrs = dict(*rest, **kwargs)
            for name in attrs:
                _Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            _Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot set underscore-prefixed namespace attributes (got {name!r})"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = _DictFactory()
    env.globals["namespace"] = _Namespace
    return env


@lru_cache(maxsize=32)
def _compile_template(template: str):
    return _make_jinja_env().from_string(template)


def _plain(value: Any) -> Any:
    """Deep copy of template data into plain JSON-like Python types."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


# --------------------------------------------------------------------------- validation


def _is_batch(conversation: Any) -> bool:
    return (
        isinstance(conversation, (list, tuple))
        and len(conversation) > 0
        and isinstance(conversation[0], (list, tuple))
    )


def _validate_conversation(conversation: Any, where: str = "") -> Conversation:
    """Check a message list and return a normalised copy (None-valued keys dropped)."""
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"{where}conversation must be a list of message dicts, got {type(conversation).__name__}")
    if len(conversation) == 0:
        raise ValueError(f"{where}empty conversation" if where else "empty conversation")
    out: Conversation = []
    for i, message in enumerate(conversation):
        if not isinstance(message, Mapping):
            raise TypeError(f"{where}message {i} must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise ValueError(f"{where}message {i} has no {key!r}")
            if not isinstance(message[key], str):
                raise TypeError(
                    f"{where}message {i}: {key!r} must be a string, got {type(message[key]).__name__}"
                )
        msg = {k: _plain(v) for k, v in message.items() if v is not None}
        # transformers aliases reasoning traces under all known names.
        reasoning = next((msg[k] for k in _REASONING_FIELDS if msg.get(k) is not None), None)
        if reasoning is not None:
            msg = {"thinking": reasoning, **msg, "reasoning_content": reasoning}
        out.append(msg)
    return out


# --------------------------------------------------------------------------- tokenizer


def _token_content(value: Any) -> str | None:
    """A special token from a config value: a string, or a dict with 'content'."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"special token must be a string or a dict with 'content', got {value!r}")


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


# transformers' AutoTokenizer.from_pretrained options that do not change the tokenizer
_HF_LOADING_KWARGS = ("use_fast", "trust_remote_code", "revision", "cache_dir", "local_files_only", "token",
                      "force_download", "legacy")


class ChatTokenizer:
    """A ``tokenizers.Tokenizer`` plus the chat template and special tokens of a HF model directory.

    Mirrors the parts of transformers' ``PreTrainedTokenizerFast`` (5.x) that
    reward-model scoring needs, with identical token ids.

    Attributes:
        chat_template: The Jinja chat template (``None`` if the directory has none).
        chat_templates: All named templates (``{"default": ...}`` for a single one).
        model_max_length: Default ``max_length`` for truncation (huge = no limit).
        padding_side: ``"right"`` or ``"left"``.
        truncation_side: ``"right"`` or ``"left"``.
        config_add_bos_token: ``add_bos_token`` from ``tokenizer_config.json`` (or ``None``).
            Like transformers 5.x with a ``tokenizer.json``, it does not change encoding:
            whether :meth:`encode` adds BOS follows the tokenizer.json post-processor
            (see :attr:`add_bos_token`).
        name_or_path: The directory it was loaded from.
    """

    def __init__(
        self,
        tokenizer: Any,
        chat_template: str | Mapping[str, str] | Sequence[Mapping[str, str]] | None = None,
        *,
        bos_token: str | Mapping[str, Any] | None = None,
        eos_token: str | Mapping[str, Any] | None = None,
        pad_token: str | Mapping[str, Any] | None = None,
        unk_token: str | Mapping[str, Any] | None = None,
        sep_token: str | Mapping[str, Any] | None = None,
        cls_token: str | Mapping[str, Any] | None = None,
        mask_token: str | Mapping[str, Any] | None = None,
        extra_template_tokens: Mapping[str, str] | None = None,
        additional_special_tokens: Sequence[str] = (),
        added_tokens_decoder: Mapping[str, Mapping[str, Any]] | None = None,
        add_bos_token: bool | None = None,
        model_max_length: int | None = None,
        padding_side: str = "right",
        truncation_side: str = "right",
        split_special_tokens: bool = False,
        name_or_path: str = "",
    ) -> None:
        """Wrap a loaded ``tokenizers.Tokenizer``; see :meth:`from_pretrained` for loading a directory.

        Args:
            tokenizer: The ``tokenizers.Tokenizer`` (it is modified in place: truncation and
                padding are switched off and missing special tokens are added, as transformers does).
            chat_template: A template string, a ``{name: template}`` dict, or a list of
                ``{"name", "template"}`` dicts; the one named ``"default"`` is used.
            bos_token, eos_token, pad_token, unk_token, sep_token, cls_token, mask_token:
                Named special tokens (string or ``{"content": ...}`` dict).
            extra_template_tokens: Other ``*_token`` strings passed to the template.
            additional_special_tokens: More special tokens (added if the tokenizer lacks them).
            added_tokens_decoder: ``tokenizer_config.json``'s ``added_tokens_decoder``; entries
                the tokenizer does not know as added tokens are added.
            add_bos_token: The config's value, kept for information only.
            model_max_length: Limit used when truncating without ``max_length``.
            padding_side: Side to pad on.
            truncation_side: Side to truncate on.
            split_special_tokens: Encode special-token text as ordinary text.
            name_or_path: Where the tokenizer came from, for messages.
        """
        from tokenizers import AddedToken

        self._tok = tokenizer
        self._tok.no_truncation()
        self._tok.no_padding()
        self._tok.encode_special_tokens = bool(split_special_tokens)
        self.name_or_path = str(name_or_path)
        self.config_add_bos_token = add_bos_token
        self.model_max_length = int(model_max_length) if model_max_length is not None else _VERY_LARGE_INTEGER
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if truncation_side not in ("right", "left"):
            raise ValueError(f"truncation_side must be 'right' or 'left', got {truncation_side!r}")
        self.padding_side = padding_side
        self.truncation_side = truncation_side

        self._special: dict[str, str] = {}
        for attr, value in (
            ("bos_token", bos_token),
            ("eos_token", eos_token),
            ("unk_token", unk_token),
            ("sep_token", sep_token),
            ("pad_token", pad_token),
            ("cls_token", cls_token),
            ("mask_token", mask_token),
        ):
            content = _token_content(value)
            if content is not None:
                self._special[attr] = content
        self._extra_template_tokens = {k: str(v) for k, v in (extra_template_tokens or {}).items()}

        # Like transformers: tokens listed in the config's added_tokens_decoder, and named
        # special tokens, that the tokenizer does not hold as added tokens are added to it.
        known = {t.content for t in self._tok.get_added_tokens_decoder().values()}
        to_add = []
        for _, entry in sorted((added_tokens_decoder or {}).items(), key=lambda kv: int(kv[0])):
            if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
                raise ValueError(f"bad added_tokens_decoder entry: {entry!r}")
            if entry["content"] not in known:
                to_add.append(
                    AddedToken(
                        entry["content"],
                        single_word=bool(entry.get("single_word", False)),
                        lstrip=bool(entry.get("lstrip", False)),
                        rstrip=bool(entry.get("rstrip", False)),
                        normalized=bool(entry.get("normalized", not entry.get("special", False))),
                        special=bool(entry.get("special", False)),
                    )
                )
                known.add(entry["content"])
        if to_add:
            self._tok.add_tokens(to_add)
        missing = []
        for content in [*self._special.values(), *self._extra_template_tokens.values(), *additional_special_tokens]:
            if content not in known:
                missing.append(AddedToken(content, special=True, normalized=False))
                known.add(content)
        if missing:
            self._tok.add_special_tokens(missing)

        self.chat_templates: dict[str, str] = self._normalise_templates(chat_template)
        self.chat_template: str | None = self.chat_templates.get("default")

    # ------------------------------------------------------------------ loading

    @staticmethod
    def _normalise_templates(chat_template: Any) -> dict[str, str]:
        if chat_template is None:
            return {}
        if isinstance(chat_template, str):
            return {"default": chat_template}
        if isinstance(chat_template, Mapping):
            items = list(chat_template.items())
        elif isinstance(chat_template, (list, tuple)):
            items = []
            for entry in chat_template:
                if not (isinstance(entry, Mapping) and "name" in entry and "template" in entry):
                    raise ValueError(f"chat_template list entries must be {{'name', 'template'}} dicts, got {entry!r}")
                items.append((entry["name"], entry["template"]))
        else:
            raise ValueError(f"chat_template must be a string, dict or list, got {type(chat_template).__name__}")
        out = {}
        for name, template in items:
            if not isinstance(name, str) or not isinstance(template, str):
                raise ValueError(f"chat template {name!r} must be a string")
            out[name] = template
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> ChatTokenizer:
        """Load from a Hugging Face model directory (no Python from it is executed).

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json``,
        ``special_tokens_map.json`` (as in transformers 5.x, read only when the config has no
        ``added_tokens_decoder``, and then its tokens take precedence), ``chat_template.jinja`` and
        ``additional_chat_templates/*.jinja`` (which take priority over the config's template).

        Args:
            path: The model directory.
            **overrides: Constructor keyword arguments that replace the config's values.
                The loading options transformers takes (``use_fast``, ``trust_remote_code``,
                ``revision``, ...) are accepted and ignored, so model-card code runs unchanged.

        Raises:
            FileNotFoundError: ``path`` is not a directory or has no ``tokenizer.json``.
            ValueError: a file is malformed.
        """
        from tokenizers import Tokenizer

        for key in _HF_LOADING_KWARGS:
            overrides.pop(key, None)

        root = Path(path).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {root}")
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(
                f"{root} has no tokenizer.json; armorm needs the fast-tokenizer file "
                "(slow-only formats such as tokenizer.model or vocab.json are not supported)"
            )
        try:
            raw = tok_file.read_text(encoding="utf-8")
            json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{tok_file} is not valid JSON: {exc}") from exc
        try:
            backend = Tokenizer.from_str(raw)
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise ValueError(f"{tok_file} is not a valid tokenizers file: {exc}") from exc

        config: dict[str, Any] = {}
        cfg_file = root / "tokenizer_config.json"
        if cfg_file.is_file():
            config = _read_json(cfg_file)
            if not isinstance(config, dict):
                raise ValueError(f"{cfg_file} must hold a JSON object")

        specials: dict[str, Any] = {k: config.get(k) for k in _SPECIAL_TOKEN_ATTRS}
        stm_file = root / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and stm_file.is_file():
            stm = _read_json(stm_file)
            if not isinstance(stm, dict):
                raise ValueError(f"{stm_file} must hold a JSON object")
            for k in _SPECIAL_TOKEN_ATTRS:
                if stm.get(k) is not None:
                    specials[k] = stm[k]

        # Other "*_token" strings (e.g. image_token) reach the template in transformers 5.x.
        extra = {
            k: v
            for k, v in config.items()
            if k.endswith("_token") and k not in _SPECIAL_TOKEN_ATTRS and isinstance(v, str)
        }
        additional: list[str] = []
        for key in ("additional_special_tokens", "extra_special_tokens"):
            value = config.get(key)
            if isinstance(value, dict):
                extra.update({k: _token_content(v) for k, v in value.items()})
            elif isinstance(value, list):
                additional.extend(t for t in map(_token_content, value) if t is not None)

        templates = cls._normalise_templates(config.get("chat_template"))
        jinja_file = root / "chat_template.jinja"
        file_templates: dict[str, str] = {}
        if jinja_file.is_file():
            file_templates["default"] = jinja_file.read_text(encoding="utf-8")
        extra_dir = root / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                file_templates[f.name[: -len(".jinja")]] = f.read_text(encoding="utf-8")
        if file_templates:
            templates = file_templates

        mml = config.get("model_max_length")
        kwargs: dict[str, Any] = dict(
            chat_template=templates or None,
            extra_template_tokens={k: v for k, v in extra.items() if v is not None},
            additional_special_tokens=additional,
            added_tokens_decoder=config.get("added_tokens_decoder"),
            add_bos_token=config.get("add_bos_token"),
            model_max_length=int(mml) if isinstance(mml, (int, float)) else None,
            padding_side=config.get("padding_side", "right") or "right",
            truncation_side=config.get("truncation_side", "right") or "right",
            split_special_tokens=bool(config.get("split_special_tokens", False)),
            name_or_path=str(root),
            **specials,
        )
        kwargs.update(overrides)
        return cls(backend, **kwargs)

    # ------------------------------------------------------------------ special tokens

    @property
    def backend_tokenizer(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens that are set, e.g. ``{"bos_token": "<|begin_of_text|>", ...}``."""
        return dict(self._special)

    def _special_id(self, attr: str) -> int | None:
        tok = self._special.get(attr)
        return None if tok is None else self._tok.token_to_id(tok)

    @property
    def bos_token(self) -> str | None:
        """Beginning-of-sequence token text, or ``None``."""
        return self._special.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        """End-of-sequence token text, or ``None``."""
        return self._special.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        """Padding token text, or ``None``."""
        return self._special.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        """Unknown-token text, or ``None``."""
        return self._special.get("unk_token")

    @property
    def bos_token_id(self) -> int | None:
        """Id of :attr:`bos_token`, or ``None``."""
        return self._special_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of :attr:`eos_token`, or ``None``."""
        return self._special_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of :attr:`pad_token`, or ``None``."""
        return self._special_id("pad_token")

    @property
    def unk_token_id(self) -> int | None:
        """Id of :attr:`unk_token`, or ``None``."""
        return self._special_id("unk_token")

    @property
    def add_bos_token(self) -> bool:
        """Whether ``encode(..., add_special_tokens=True)`` starts with BOS (from the post-processor)."""
        bos = self.bos_token_id
        if bos is None:
            return False
        return self._tok.encode("", add_special_tokens=True).ids[:1] == [bos]

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary without added tokens (as transformers' ``vocab_size``)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Full vocabulary size including added tokens (as ``len()`` of a transformers tokenizer)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        """Token -> id, including added tokens."""
        return self._tok.get_vocab(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens: str | Sequence[str]) -> int | None | list[int | None]:
        """Id of a token (or list of ids); unknown tokens give the unk id, or ``None`` without one."""
        if isinstance(tokens, str):
            tid = self._tok.token_to_id(tokens)
            return self.unk_token_id if tid is None else tid
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    def convert_ids_to_tokens(self, ids: int | Sequence[int]) -> str | None | list[str | None]:
        """Token text of an id (or list of ids); ``None`` for ids outside the vocabulary."""
        if isinstance(ids, (int, np.integer)):
            return self._tok.id_to_token(int(ids))
        return [self._tok.id_to_token(int(i)) for i in ids]

    # ------------------------------------------------------------------ plain encode / decode

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens (e.g. BOS) are added as the tokenizer.json post-processor says."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list, numpy array, torch tensor or a single id)."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            if len(ids) != 1:
                raise ValueError("decode takes one sequence; use batch_decode for several")
            ids = ids[0]
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences: Any, skip_special_tokens: bool = False) -> list[str]:
        """:meth:`decode` for each sequence."""
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def __call__(self, text: str | Sequence[str], add_special_tokens: bool = True) -> dict[str, list]:
        """``{"input_ids": ids, "attention_mask": [1] * len(ids)}`` (lists of lists for a list of texts)."""
        if isinstance(text, str):
            ids = self.encode(text, add_special_tokens=add_special_tokens)
            return {"input_ids": ids, "attention_mask": [1] * len(ids)}
        batch = [self.encode(t, add_special_tokens=add_special_tokens) for t in text]
        return {"input_ids": batch, "attention_mask": [[1] * len(ids) for ids in batch]}

    # ------------------------------------------------------------------ chat template

    def get_chat_template(self, chat_template: str | None = None) -> str:
        """The template to use: ``chat_template`` (a template text or a template name) or the default one."""
        if chat_template is not None:
            return self.chat_templates.get(chat_template, chat_template)
        if not self.chat_templates:
            raise ValueError(
                f"tokenizer {self.name_or_path!r} has no chat template (tokenizer_config.json 'chat_template' "
                "or chat_template.jinja); pass chat_template= explicitly"
            )
        if "default" not in self.chat_templates:
            raise ValueError(
                f"tokenizer has several chat templates ({sorted(self.chat_templates)}) and none named 'default'; "
                "pass chat_template=<name>"
            )
        return self.chat_templates["default"]

    def _render(
        self,
        template: str,
        conversation: Conversation,
        add_generation_prompt: bool,
        continue_final_message: bool | str,
        tools: Any,
        documents: Any,
        template_kwargs: dict[str, Any],
    ) -> str:
        compiled = _compile_template(template)
        chat = [dict(m) for m in conversation]
        final_text = None
        if continue_final_message:
            field = continue_final_message if isinstance(continue_final_message, str) else "content"
            final_text = chat[-1].get(field)
            if not isinstance(final_text, str):
                raise ValueError(f"continue_final_message is set but the final message has no string {field!r}")
            fields = [field]
            if field in _REASONING_FIELDS:
                fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_text]
            if not any(f in template for f in fields):
                raise ValueError(f"continue_final_message is set to {field!r} but the chat template never reads it")
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
        rendered = compiled.render(
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **template_kwargs,
        )
        if continue_final_message:
            tag = _CONTINUE_TAG.strip()
            if final_text.strip() not in rendered or tag not in rendered:
                raise ValueError(
                    "continue_final_message is set but the final message does not appear in the rendered chat "
                    "(the template changed or dropped it)"
                )
            loc = rendered.rindex(tag)
            if rendered[loc : loc + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
                rendered = rendered[:loc]
            else:
                rendered = rendered[:loc].rstrip()
        return rendered

    def apply_chat_template(
        self,
        messages: Conversation | Sequence[Conversation],
        tokenize: bool = True,
        add_generation_prompt: bool = False,
        return_tensors: str | None = None,
        truncation: bool | str = False,
        max_length: int | None = None,
        padding: bool | str = False,
        return_dict: bool = False,
        continue_final_message: bool | str = False,
        *,
        chat_template: str | None = None,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **template_kwargs: Any,
    ) -> Union[str, list[str], list[int], list[list[int]], np.ndarray, Any, dict[str, Any]]:
        """Render conversation(s) with the chat template and tokenize, like transformers.

        The rendered text is encoded with ``add_special_tokens=False``: the template is
        responsible for BOS and other control tokens (transformers 5.x does the same).

        Args:
            messages: One conversation (list of ``{"role", "content"}`` dicts, content a string,
                possibly empty) or a batch (list of conversations).
            tokenize: Return token ids; ``False`` returns the rendered string(s).
            add_generation_prompt: Passed to the template (appends the assistant header).
            return_tensors: ``None`` (lists), ``"np"`` (int64 array ``[1, L]`` / ``[B, L]``) or
                ``"pt"`` (torch LongTensor; needs torch).
            truncation: Truncate to ``max_length`` (default ``model_max_length``) on
                :attr:`truncation_side` (right by default).
            max_length: Length limit for truncation / ``padding="max_length"``.
            padding: ``False``, ``True``/``"longest"`` or ``"max_length"``; needs a pad token.
            return_dict: Return ``{"input_ids", "attention_mask"}`` instead of the ids.
            continue_final_message: Leave the last message open (no end-of-turn), for prefilling.
            chat_template: Template text or name, instead of the tokenizer's default.
            tools: Passed to the template as ``tools``.
            documents: Passed to the template as ``documents``.
            **template_kwargs: Extra variables for the template.

        Raises:
            ValueError: empty conversation, a message without role/content, unequal lengths
                for tensors without padding, padding without a pad token, no chat template.
            TypeError: a message that is not a dict, or role/content that are not strings.
        """
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot be used together")
        template = self.get_chat_template(chat_template)

        if isinstance(messages, (list, tuple)) and len(messages) == 0:
            raise ValueError("empty conversation")
        batched = _is_batch(messages)
        convs = list(messages) if batched else [messages]
        if batched:
            convs = [_validate_conversation(c, f"conversation {i}: ") for i, c in enumerate(convs)]
        else:
            convs = [_validate_conversation(convs[0])]

        variables = {**self._special, **self._extra_template_tokens, **_plain(template_kwargs)}
        texts = [
            self._render(
                template, c, add_generation_prompt, continue_final_message, _plain(tools), _plain(documents), variables
            )
            for c in convs
        ]
        if not tokenize:
            return texts if batched else texts[0]

        ids = [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]
        return self._finish(ids, batched, return_tensors, truncation, max_length, padding, return_dict)

    def _finish(
        self,
        ids: list[list[int]],
        batched: bool,
        return_tensors: str | None,
        truncation: bool | str,
        max_length: int | None,
        padding: bool | str,
        return_dict: bool,
    ) -> Any:
        """Truncate / pad / convert encoded sequences the way transformers' ``__call__`` does."""
        truncate = truncation not in (False, None, "do_not_truncate")
        if padding is True:
            pad_mode = "longest"
        elif padding in (False, None, "do_not_pad"):
            pad_mode = None
        elif padding in ("longest", "max_length"):
            pad_mode = padding
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")

        if max_length is None:
            if pad_mode == "max_length":
                if self.model_max_length > _LARGE_INTEGER:
                    pad_mode = None
                else:
                    max_length = self.model_max_length
            if truncate:
                if self.model_max_length > _LARGE_INTEGER:
                    truncate = False
                else:
                    max_length = self.model_max_length
        elif max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")

        if truncate and max_length is not None:
            if self.truncation_side == "right":
                ids = [s[:max_length] for s in ids]
            else:
                ids = [s[len(s) - max_length :] if len(s) > max_length else s for s in ids]
        masks = [[1] * len(s) for s in ids]

        if pad_mode is not None:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError(
                    "padding requested but the tokenizer has no pad token (set pad_token in tokenizer_config.json)"
                )
            target = max(len(s) for s in ids) if pad_mode == "longest" else int(max_length)  # type: ignore[arg-type]
            for i, s in enumerate(ids):
                n = target - len(s)
                if n > 0:
                    if self.padding_side == "right":
                        ids[i] = s + [pad_id] * n
                        masks[i] = masks[i] + [0] * n
                    else:
                        ids[i] = [pad_id] * n + s
                        masks[i] = [0] * n + masks[i]

        if return_tensors is None:
            out_ids: Any = ids if batched else ids[0]
            out_mask: Any = masks if batched else masks[0]
        elif return_tensors in ("np", "pt"):
            lengths = {len(s) for s in ids}
            if len(lengths) > 1:
                raise ValueError(
                    f"sequences have different lengths {sorted(lengths)}; use padding=True to return tensors"
                )
            arr_ids = np.asarray(ids, dtype=np.int64).reshape(len(ids), -1)
            arr_mask = np.asarray(masks, dtype=np.int64).reshape(len(ids), -1)
            if return_tensors == "pt":
                import torch  # optional dependency, only for "pt"

                out_ids, out_mask = torch.from_numpy(arr_ids), torch.from_numpy(arr_mask)
            else:
                out_ids, out_mask = arr_ids, arr_mask
        else:
            raise ValueError(f"return_tensors must be None, 'np' or 'pt', got {return_tensors!r}")

        if return_dict:
            return {"input_ids": out_ids, "attention_mask": out_mask}
        return out_ids

    def __repr__(self) -> str:
        return (
            f"ChatTokenizer(name_or_path={self.name_or_path!r}, vocab={len(self)}, "
            f"bos={self.bos_token!r}, eos={self.eos_token!r}, pad={self.pad_token!r}, "
            f"chat_template={'yes' if self.chat_templates else 'no'})"
        )


# --------------------------------------------------------------------------- helpers for either tokenizer kind


def _to_id_list(out: Any) -> list[int] | list[list[int]]:
    """Ids from whatever ``apply_chat_template`` returned (list, dict/BatchEncoding, array, tensor)."""
    if isinstance(out, Mapping) or hasattr(out, "keys"):  # dict / BatchEncoding
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    return out


def _render_text(tokenizer: Any, conversation: Conversation, add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, expected str")
    return text


def _encode_plain(tokenizer: Any, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [int(i) for i in _to_id_list(ids)]


def _chat_ids(tokenizer: Any, conversation: Conversation, add_generation_prompt: bool = False, **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False, **kwargs
    )
    ids = _to_id_list(out)
    if ids and isinstance(ids[0], list):  # a [1, L] tensor
        ids = ids[0]
    return [int(i) for i in ids]


_HOW_TO_OVERRIDE = (
    "pass gating_pattern=[...] explicitly (the token ids that open the final assistant turn, "
    "e.g. end-of-turn + assistant header)"
)


def gating_pattern(tokenizer: Any) -> list[int]:
    """Token ids of the text that opens the final assistant turn, derived from the chat template.

    Works for a :class:`ChatTokenizer` and for any transformers tokenizer with a chat
    template. The end-of-turn text is what the template writes after the content of a
    lone user message; the assistant header is what ``add_generation_prompt=True``
    appends. The pattern is ``encode(end_of_turn + header, add_special_tokens=False)``.
    For Llama 3 that is ``<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n``
    -> ``[128009, 128006, 78191, 128007, 271]``.

    Raises:
        ValueError: the template has no generation prompt, renders the probe conversation
            in an unexpected way, or the pattern does not occur in a tokenized sample
            conversation; the message explains how to pass ``gating_pattern=`` instead.
    """
    marker = "X"
    probe = [{"role": "user", "content": marker}]
    try:
        plain = _render_text(tokenizer, probe, add_generation_prompt=False)
        prompted = _render_text(tokenizer, probe, add_generation_prompt=True)
    except Exception as exc:
        raise ValueError(f"cannot derive the gating pattern: rendering a probe conversation failed ({exc}); "
                         f"{_HOW_TO_OVERRIDE}") from exc
    pos = plain.rfind(marker)
    if pos < 0:
        raise ValueError(
            f"cannot derive the gating pattern: the chat template dropped the user message text; {_HOW_TO_OVERRIDE}"
        )
    end_of_turn = plain[pos + len(marker) :]
    if not prompted.startswith(plain) or len(prompted) == len(plain):
        raise ValueError(
            "cannot derive the gating pattern: the chat template adds no generation prompt "
            f"(add_generation_prompt=True changes nothing at the end); {_HOW_TO_OVERRIDE}"
        )
    header = prompted[len(plain) :]
    pattern = _encode_plain(tokenizer, end_of_turn + header)
    if not pattern:
        raise ValueError(f"cannot derive the gating pattern: it encodes to no tokens; {_HOW_TO_OVERRIDE}")

    sample = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]
    for conv, gen in ((sample, False), (sample[:1], True)):
        ids = _chat_ids(tokenizer, conv, add_generation_prompt=gen)
        if find_gating_position(ids, pattern) < 0:
            raise ValueError(
                f"derived gating pattern {pattern} ({end_of_turn + header!r}) does not occur in the tokens of a "
                f"sample {'prompt' if gen else 'conversation'} rendered with the chat template; {_HOW_TO_OVERRIDE}"
            )
    return pattern


def find_gating_position(ids: Sequence[int] | np.ndarray, pattern: Sequence[int] | np.ndarray) -> int:
    """Start index of the LAST occurrence of ``pattern`` in ``ids``, or -1 if it does not occur.

    Raises:
        ValueError: ``pattern`` is empty.
    """
    a = np.asarray(ids, dtype=np.int64).reshape(-1)
    p = np.asarray(pattern, dtype=np.int64).reshape(-1)
    m = p.size
    if m == 0:
        raise ValueError("gating pattern is empty")
    if a.size < m:
        return -1
    windows = np.lib.stride_tricks.sliding_window_view(a, m)
    hits = np.flatnonzero((windows == p).all(axis=1))
    return int(hits[-1]) if hits.size else -1


def format_conversations(
    tokenizer: Any,
    conversations: Sequence[Conversation | Mapping[str, Any]],
    max_length: int | None = None,
    truncation: bool = False,
    names: Sequence[str] | None = None,
    *,
    retokenize_text: bool = False,
) -> list[list[int]]:
    """Chat-template and tokenize each conversation, with either tokenizer kind.

    Args:
        tokenizer: A :class:`ChatTokenizer` or a transformers tokenizer (anything with
            ``apply_chat_template``).
        conversations: Message lists; a dict element is taken as a dataset record
            (see :func:`conversation_from_record`).
        max_length: Truncation length (with ``truncation=True``).
        truncation: Truncate on the right to ``max_length``.
        names: What errors call conversation i (default ``"conversation i"``).
        retokenize_text: Render the template to text, then tokenize that text again
            with the tokenizer's special tokens, as evaluation harnesses that format a
            string first do (allenai/reward-bench for classifier reward models). The
            post-processor then adds its special tokens to the template's: a Llama-3
            sequence starts with two BOS tokens. The default is the model card's
            tokenization (the template's BOS only).

    Returns:
        One list of token ids per conversation.
    """
    if not hasattr(tokenizer, "apply_chat_template"):
        raise TypeError(f"{type(tokenizer).__name__} has no apply_chat_template")
    if isinstance(conversations, Mapping) or (
        isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], Mapping)
        and "role" in conversations[0]
    ):
        raise TypeError("format_conversations takes a list of conversations; wrap a single conversation in a list")
    import jinja2
    out = []
    for i, conv in enumerate(conversations):
        where = names[i] if names is not None else f"conversation {i}"
        if isinstance(conv, Mapping):
            conv = conversation_from_record(conv)
        if isinstance(tokenizer, ChatTokenizer):
            _validate_conversation(conv, f"{where}: ")
        kwargs: dict[str, Any] = {}
        if truncation:
            kwargs["truncation"] = True
            if max_length is not None:
                kwargs["max_length"] = max_length
        try:
            if retokenize_text:
                text = _render_text(tokenizer, conv, add_generation_prompt=False)
                ids = [int(t) for t in _to_id_list(tokenizer.encode(text, add_special_tokens=True))]
                out.append(ids[:max_length] if truncation and max_length is not None else ids)
            else:
                out.append(_chat_ids(tokenizer, conv, add_generation_prompt=False, **kwargs))
        except jinja2.TemplateError as e:  # the template's raise_exception(...): e.g. a role it does not support
            raise ValueError(f"{where}: the chat template refused it: {e}") from None
    return out


def conversation_from_record(record: Mapping[str, Any]) -> Conversation:
    """Message list of a dataset record.

    Accepts ``{"messages": [...]}`` (returned as a list of message dicts) or
    ``{"prompt": str, "response": str}`` (-> a user message and an assistant message).

    Raises:
        ValueError: the record is not a dict, or has neither form; the message names what is missing.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"record must be a dict with 'messages' or 'prompt' + 'response', got {type(record).__name__}")
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, (list, tuple)) or not all(isinstance(m, Mapping) for m in msgs):
            raise ValueError("record 'messages' must be a list of message dicts")
        return [dict(m) for m in msgs]
    has_p, has_r = "prompt" in record, "response" in record
    if has_p and has_r:
        prompt, response = record["prompt"], record["response"]
        for key, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise ValueError(f"record {key!r} must be a string, got {type(value).__name__}")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    if has_p:
        raise ValueError("record has 'prompt' but no 'response' (or give 'messages')")
    if has_r:
        raise ValueError("record has 'response' but no 'prompt' (or give 'messages')")
    raise ValueError(f"record has neither 'messages' nor 'prompt' + 'response' (keys: {sorted(map(str, record))})")
