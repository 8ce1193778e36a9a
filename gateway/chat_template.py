"""OpenAI chat messages to one prompt string, through a Jinja chat template.

Templates follow Hugging Face's ``chat_template`` convention: they see ``messages``
(a list of ``{"role", "content"[, "name"]}`` with string content),
``add_generation_prompt`` (always true: the model answers next), ``bos_token`` and
``eos_token`` (empty: Triton's tokenizers add their own special tokens), and may call
``raise_exception(message)`` to refuse a conversation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .config import ConfigError
from .errors import BadRequest

# The template of a model without one of its own: a "role: content" line per message,
# then the cue for the assistant's turn.
DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ message.role }}: {{ message.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_ROLES = frozenset({"system", "user", "assistant"})


class ChatTemplate:
    """A compiled chat template; rendering is sandboxed (templates come from model repos)."""

    def __init__(self, source: str, origin: str = "default") -> None:
        # Hugging Face renders with these options; templates written for it rely on them.
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"chat template {origin}: {exc}") from None

    @classmethod
    def from_file(cls, path: Path) -> ChatTemplate:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"chat template {path}: {exc}") from None
        return cls(source, str(path))

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt for ``messages`` (as returned by ``template_messages``); a template
        that refuses the conversation is the client's 400."""
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, bos_token="", eos_token=""
            )
        except TemplateError as exc:
            raise BadRequest(
                f"the chat template refused the messages: {exc}", param="messages"
            ) from None


def template_messages(value: Any) -> list[dict[str, str]]:
    """Validate OpenAI ``messages`` and reduce them to what a template sees: the role
    (``developer`` becomes ``system``), text content (text parts joined by newlines)
    and the optional ``name``."""
    if not isinstance(value, list) or not value:
        raise BadRequest("'messages' must be a non-empty array", param="messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise BadRequest(f"{where} must be an object", param="messages")
        role = message.get("role")
        if role == "developer":
            role = "system"
        if not isinstance(role, str) or role not in _ROLES:
            raise BadRequest(
                f"{where}.role must be one of 'system', 'developer', 'user', 'assistant',"
                f" got {role!r} (tools are not supported)",
                param="messages",
            )
        if message.get("tool_calls"):
            raise BadRequest(f"{where}: tool calls are not supported", param="messages")
        entry = {"role": role, "content": _text_content(message.get("content"), role, where)}
        name = message.get("name")
        if name is not None:
            if not isinstance(name, str):
                raise BadRequest(f"{where}.name must be a string", param="messages")
            entry["name"] = name
        messages.append(entry)
    return messages


def _text_content(content: Any, role: str, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(
                    f"{where}.content: only text parts are supported, got {kind!r}",
                    param="messages",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise BadRequest(
                    f"{where}.content: a text part needs a string 'text'", param="messages"
                )
            texts.append(text)
        return "\n".join(texts)
    raise BadRequest(
        f"{where}.content must be a string or an array of text parts", param="messages"
    )


def _raise_exception(message: str) -> NoReturn:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None) -> str:
    # Jinja's own tojson escapes for HTML; prompts need the plain JSON text.
    return json.dumps(value, ensure_ascii=False, indent=indent)
