"""Turning records into token ids: chat templates, prompt rendering, assistant-only loss masks."""

from __future__ import annotations

from typing import Any

from heed.data.records import Message, Prompt, SFTExample
from heed.errors import DataError


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def use_chat(tokenizer: Any, chat: str) -> bool:
    """Resolve the ``chat: auto | true | false`` setting for a tokenizer."""
    if chat == "auto":
        return has_chat_template(tokenizer)
    return chat in (True, "true")


def require_chat_template(tokenizer: Any, where: str) -> None:
    if not has_chat_template(tokenizer):
        raise DataError(
            f"{where}: chat data needs a tokenizer with a chat template, and this tokenizer has none "
            "(set tokenizer.chat_template, or use plain prompt/completion strings with `chat: false`)"
        )


def as_messages(prompt: Prompt) -> list[Message]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def render_prompt(tokenizer: Any, prompt: Prompt, chat: bool, where: str = "prompt") -> str:
    """The text a model continues: the chat template with a generation prompt, or the raw string."""
    if isinstance(prompt, list) or chat:
        require_chat_template(tokenizer, where)
        return tokenizer.apply_chat_template(as_messages(prompt), tokenize=False, add_generation_prompt=True)
    return prompt


def completion_suffix(tokenizer: Any, chat: bool) -> str:
    """What closes a completion: the template's end-of-turn (rendered) or the EOS token."""
    if chat:
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "\x00"}]
        text = tokenizer.apply_chat_template(probe, tokenize=False)
        return text.split("\x00", 1)[1]
    return tokenizer.eos_token or ""


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_chat(tokenizer: Any, messages: list[Message], where: str) -> tuple[list[int], list[bool]]:
    """Token ids of a chat and a mask that is True on every assistant turn (its content and end-of-turn).

    Renders the conversation incrementally: for assistant turn i, ``render(messages[:i], gen prompt)``
    is context and the rest of ``render(messages[:i+1])`` is trained on.
    """
    require_chat_template(tokenizer, where)
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise DataError(f"{where}: the tokenizer's chat template does not render turns incrementally")
        context, target = prefix[len(done) :], full[len(prefix) :]
        c, t = _encode(tokenizer, context), _encode(tokenizer, target)
        ids += c + t
        mask += [False] * len(c) + [True] * len(t)
        done = full
    rest = tokenizer.apply_chat_template(messages, tokenize=False)[len(done) :]
    r = _encode(tokenizer, rest)
    return ids + r, mask + [False] * len(r)


def encode_sft(tokenizer: Any, ex: SFTExample, chat: bool) -> tuple[list[int], list[bool]]:
    """Ids and loss mask (True on assistant / completion tokens) of one SFT example."""
    if ex.messages is not None:
        return encode_chat(tokenizer, ex.messages, ex.where)
    assert ex.prompt is not None and ex.completion is not None
    if chat or isinstance(ex.prompt, list):
        msgs = [*as_messages(ex.prompt), {"role": "assistant", "content": ex.completion}]
        return encode_chat(tokenizer, msgs, ex.where)
    p = _encode(tokenizer, ex.prompt)
    c = _encode(tokenizer, ex.completion + (tokenizer.eos_token or ""))
    return p + c, [False] * len(p) + [True] * len(c)


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[bool]]:
    """Plain language modelling: every token counts; EOS closes the document."""
    ids = _encode(tokenizer, text + (tokenizer.eos_token or ""))
    return ids, [True] * len(ids)
