"""gateway.chat_template: OpenAI messages to a prompt, default and Hugging Face-style templates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gateway.chat_template import DEFAULT_TEMPLATE, ChatTemplate, template_messages
from gateway.config import ConfigError
from gateway.errors import BadRequest

# A ChatML template in the shape Hugging Face tokenizer configs ship them.
CHATML = """{% for message in messages %}
{% if message['role'] == 'assistant' and loop.first %}
{{ raise_exception('the conversation must not start with the assistant') -}}
{% endif %}
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}
{% endfor %}
{% if add_generation_prompt %}
{{ '<|im_start|>assistant\\n' -}}
{% endif %}"""


def render(template: ChatTemplate, messages: Any) -> str:
    return template.render(template_messages(messages))


def test_default_template_is_role_lines_then_assistant_cue() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "We hold these truths"},
        {"role": "assistant", "content": None},
        {
            "role": "user",
            "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}],
        },
    ]
    assert render(ChatTemplate(DEFAULT_TEMPLATE), messages) == (
        "system: Be brief.\nuser: We hold these truths\nassistant: \nuser: one\ntwo\nassistant:"
    )


def test_hugging_face_template_file(tmp_path: Path) -> None:
    path = tmp_path / "chatml.jinja"
    path.write_text(CHATML)
    template = ChatTemplate.from_file(path)
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Hi", "name": "ann"},
    ]
    assert render(template, messages) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_template_sees_names_and_json() -> None:
    template = ChatTemplate("{{ messages | tojson }}")
    out = render(template, [{"role": "user", "content": "é", "name": "ann"}])
    assert out == '[{"role": "user", "content": "é", "name": "ann"}]'


def test_raise_exception_refuses_the_request() -> None:
    template = ChatTemplate(CHATML)
    with pytest.raises(BadRequest, match="must not start with the assistant") as caught:
        render(template, [{"role": "assistant", "content": "x"}])
    assert caught.value.param == "messages"


def test_templates_are_sandboxed() -> None:
    template = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(BadRequest):
        render(template, [{"role": "user", "content": "x"}])


def test_broken_template_files_fail_at_startup(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    with pytest.raises(ConfigError, match=r"broken\.jinja"):
        ChatTemplate.from_file(broken)
    with pytest.raises(ConfigError, match=r"missing\.jinja"):
        ChatTemplate.from_file(tmp_path / "missing.jinja")


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "non-empty array"),
        ("hello", "non-empty array"),
        (["hello"], r"messages\[0\] must be an object"),
        ([{"role": "tool", "content": "x"}], "tools are not supported"),
        ([{"content": "x"}], r"messages\[0\].role"),
        ([{"role": "user", "content": 3}], "string or an array of text parts"),
        ([{"role": "user", "content": None}], "string or an array of text parts"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "'image_url'"),
        ([{"role": "user", "content": [{"type": "text"}]}], "string 'text'"),
        ([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}], "tool calls"),
        ([{"role": "user", "content": "x", "name": 5}], "name must be a string"),
    ],
)
def test_invalid_messages_are_400_naming_the_field(messages: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as caught:
        template_messages(messages)
    assert caught.value.param == "messages"
