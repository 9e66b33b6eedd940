"""Turning records into token ids: chat templates, prompt rendering, assistant-only loss masks.

The chat template is applied exactly once. Two kinds of prompt already carry a format of their own,
and are not wrapped in the template a second time (a warning names the file, once):

- HH-RLHF markup (``"\\n\\nHuman: ...\\n\\nAssistant:"``): with the template on, its turns become chat
  messages;
- a prompt already rendered with this tokenizer's template (it holds the template's role markers):
  it is used as it is, the answer and the template's end of turn follow it.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Literal

from heed.data.records import Message, Prompt, SFTExample, as_messages, hh_messages, is_hh_text
from heed.errors import DataError

__all__ = [
    "as_messages",
    "completion_suffix",
    "encode_chat",
    "encode_sft",
    "encode_text",
    "has_chat_template",
    "prepare_prompt",
    "render_prompt",
    "require_chat_template",
    "use_chat",
]


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


# ---------------------------------------------------------------------------------------------
# prompts that carry their own format
# ---------------------------------------------------------------------------------------------
_warned: set[tuple[str, str]] = set()
_markers: dict[tuple[int, str], list[str]] = {}
_LOCATION = re.compile(r"(?::\d+(?::\d+)?| row \d+|: row \d+)$")


def _warn_once(where: str, what: str, message: str) -> None:
    source = _LOCATION.sub("", where)
    if (source, what) not in _warned:
        _warned.add((source, what))
        warnings.warn(f"{source}: {message} (first at {where})", stacklevel=3)


def template_markers(tokenizer: Any) -> list[str]:
    """The role markers of the tokenizer's chat template (``<|user|>``, ``<|im_start|>assistant``):
    the last line around a user message and the generation prompt, when they hold more than words."""
    key = (id(tokenizer), tokenizer.chat_template)
    if key in _markers:
        return _markers[key]
    markers: list[str] = []
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "\x00"}], tokenize=False, add_generation_prompt=True
        )
        before, after = text.split("\x00", 1)
        for part in (before, after):
            lines = [ln.strip() for ln in part.strip().splitlines() if ln.strip()]
            if lines and len(lines[-1]) >= 3 and not lines[-1].replace(" ", "").isalnum():
                markers.append(lines[-1])
    except Exception:  # a template that cannot render a lone user turn: nothing to detect with
        markers = []
    _markers[key] = markers
    return markers


def is_rendered(tokenizer: Any, text: str) -> bool:
    """Whether ``text`` already holds the chat template's role markers."""
    return any(m in text for m in template_markers(tokenizer))


PromptForm = Literal["plain", "hh", "rendered"]


def prepare_prompt(tokenizer: Any, prompt: Prompt, chat: bool, where: str) -> tuple[Prompt, PromptForm]:
    """The prompt to template, and the form it came in.

    With the template on, an HH-RLHF string prompt becomes chat messages (``"hh"``: its answers'
    leading space belongs to the markup), and a string that already holds the template's markers is
    used as it is (``"rendered"``); each is said once per file.
    """
    if not chat or not isinstance(prompt, str):
        return prompt, "plain"
    if is_hh_text(prompt):
        msgs = hh_messages(prompt)
        if msgs and msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
            msgs = msgs[:-1]  # the open "Assistant:" the answer follows
        _warn_once(
            where,
            "hh",
            "prompts carry their own 'Human:'/'Assistant:' markup (HH-RLHF); they are turned into chat "
            "messages rather than wrapped in the chat template",
        )
        return msgs, "hh"
    if is_rendered(tokenizer, prompt):
        _warn_once(
            where,
            "rendered",
            "prompts are already rendered with the chat template (they hold its role markers); "
            "they are used as they are, not templated a second time",
        )
        return prompt, "rendered"
    return prompt, "plain"


def render_prompt(tokenizer: Any, prompt: Prompt, chat: bool, where: str = "prompt") -> str:
    """The text a model continues: the chat template with a generation prompt, or the raw string."""
    prompt, form = prepare_prompt(tokenizer, prompt, chat, where)
    if form == "rendered":
        assert isinstance(prompt, str)
        return prompt
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


def encode_chat(
    tokenizer: Any, messages: list[Message], where: str, last_only: bool = False
) -> tuple[list[int], list[bool]]:
    """Token ids of a chat and a mask that is True on every assistant turn (its content and end-of-turn),
    or with ``last_only`` on the final assistant turn only (the earlier ones are the prompt's context).

    Renders the conversation incrementally: for assistant turn i, ``render(messages[:i], gen prompt)``
    is context and the rest of ``render(messages[:i+1])`` is trained on.
    """
    require_chat_template(tokenizer, where)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    ids: list[int] = []
    mask: list[bool] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or (last_only and i != last):
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
    """Ids and loss mask of one SFT example: True on every assistant turn of a chat, and on the
    completion only of a prompt/completion pair (assistant turns inside its prompt are context)."""
    if ex.messages is not None:
        return encode_chat(tokenizer, ex.messages, ex.where)
    assert ex.prompt is not None and ex.completion is not None
    prompt, form = prepare_prompt(tokenizer, ex.prompt, chat, ex.where)
    if form == "rendered":
        assert isinstance(prompt, str)
        p = _encode(tokenizer, prompt)
        c = _encode(tokenizer, ex.completion + completion_suffix(tokenizer, True))
        return p + c, [False] * len(p) + [True] * len(c)
    if chat or isinstance(prompt, list):
        completion = ex.completion.strip() if form == "hh" else ex.completion
        msgs = [*as_messages(prompt), {"role": "assistant", "content": completion}]
        return encode_chat(tokenizer, msgs, ex.where, last_only=True)
    p = _encode(tokenizer, prompt)
    c = _encode(tokenizer, ex.completion + (tokenizer.eos_token or ""))
    return p + c, [False] * len(p) + [True] * len(c)


def encode_text(tokenizer: Any, text: str) -> tuple[list[int], list[bool]]:
    """Plain language modelling: every token counts; EOS closes the document."""
    ids = _encode(tokenizer, text + (tokenizer.eos_token or ""))
    return ids, [True] * len(ids)
