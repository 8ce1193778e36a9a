"""Model profiles: how an OpenAI request becomes Triton tensors, and Triton's responses
become text, a finish reason and token counts.

A *text model* has a BYTES input ``text_input`` and an output ``text_output``. Its
profile is set per model in the config (``[models.NAME] profile``) or detected from
its Triton config: ``vllm`` when it has a ``sampling_parameters`` input (Triton's vLLM
backend), else ``triton-llm`` (TensorRT-LLM ensemble style, and ``tiny_lm``).
"""

from __future__ import annotations

import codecs
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from fastpath import framing
from fastpath.errors import FramingError

from .config import ConfigError
from .errors import BadRequest, UpstreamError
from .fleet import ModelInfo
from .tensors import raw_to_json

TEXT_INPUT = "text_input"
TEXT_OUTPUT = "text_output"


@dataclass(frozen=True)
class Sampling:
    """What one OpenAI request asks the model for; None leaves the model's default."""

    prompt: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    user: str | None = None


class Profile(ABC):
    name: str

    def request(
        self, info: ModelInfo, sampling: Sampling, request_id: str, stream: bool
    ) -> dict[str, Any]:
        """The generate-API body (fields named like inputs, the rest request parameters)
        for ``sampling`` on this model version, as Triton's HTTP ``generate_stream``
        takes it (``kserve_codec.encode_generate`` makes a gRPC request of it)."""
        fields = self._fields(info, sampling)
        # ``stream`` is for decoupled models (others answer once and may refuse it).
        if "stream" in info.inputs:
            fields["stream"] = stream and info.decoupled
        if sampling.user is not None:
            fields["user"] = sampling.user  # not an input: becomes a request parameter
        return {"id": request_id, **fields}

    @abstractmethod
    def _fields(self, info: ModelInfo, sampling: Sampling) -> dict[str, Any]:
        """Generate-API fields (inputs by name) for the prompt and sampling parameters."""


def _requested(sampling: Sampling) -> dict[str, Any]:
    """The sampling parameters the request set, by OpenAI name."""
    values = {
        "max_tokens": sampling.max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "stop": list(sampling.stop) or None,
    }
    return {k: v for k, v in values.items() if v is not None}


class TritonLLM(Profile):
    """TensorRT-LLM ensemble style: one input tensor per sampling parameter."""

    name = "triton-llm"
    # OpenAI parameter -> candidate input names, first present wins
    # (TensorRT-LLM's ensemble calls the seed ``random_seed``).
    _INPUTS: ClassVar[dict[str, tuple[str, ...]]] = {
        "max_tokens": ("max_tokens",),
        "temperature": ("temperature",),
        "top_p": ("top_p",),
        "seed": ("seed", "random_seed"),
        "stop": ("stop_words",),
    }

    def _fields(self, info: ModelInfo, sampling: Sampling) -> dict[str, Any]:
        fields: dict[str, Any] = {TEXT_INPUT: sampling.prompt}
        for param, value in _requested(sampling).items():
            candidates = self._INPUTS[param]
            name = next((n for n in candidates if n in info.inputs), None)
            if name is None:
                raise BadRequest(
                    f"model '{info.name}' has no input for '{param}'"
                    f" (looked for {', '.join(candidates)})",
                    param=param,
                )
            fields[name] = value
        return fields


class VLLM(Profile):
    """Triton's vLLM backend: sampling parameters travel as one JSON string tensor."""

    name = "vllm"
    # Optional BOOL inputs that make the backend report what OpenAI's answer needs.
    _ADDITIONAL_OUTPUTS = (
        "return_finish_reason",
        "return_num_input_tokens",
        "return_num_output_tokens",
    )

    def _fields(self, info: ModelInfo, sampling: Sampling) -> dict[str, Any]:
        fields: dict[str, Any] = {
            TEXT_INPUT: sampling.prompt,
            "sampling_parameters": orjson.dumps(_requested(sampling)).decode(),
            "exclude_input_in_output": True,
        }
        for flag in self._ADDITIONAL_OUTPUTS:
            if flag in info.inputs:
                fields[flag] = True
        return fields


PROFILES: dict[str, Profile] = {p.name: p for p in (TritonLLM(), VLLM())}


def check_profile_name(model: str, name: str | None) -> None:
    """Refuse (at startup) a configured profile that does not exist."""
    if name is not None and name not in PROFILES:
        raise ConfigError(
            f"[models.{model}] profile must be one of {sorted(PROFILES)}, got {name!r}"
        )


def is_text_model(info: ModelInfo) -> bool:
    spec = info.inputs.get(TEXT_INPUT)
    return spec is not None and spec.datatype == "BYTES" and TEXT_OUTPUT in info.outputs


def profile_for(info: ModelInfo, configured: str | None) -> Profile:
    """The configured profile, else the one detected from the model's inputs."""
    if configured is not None:
        return PROFILES[configured]
    return PROFILES["vllm" if "sampling_parameters" in info.inputs else "triton-llm"]


def count_words(text: str) -> int:
    """The counting rule for models that report no token counts: whitespace-separated words."""
    return len(text.split())


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def as_json(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class ReplyReader:
    """Reads one request's Triton responses in order.

    Understands the outputs of both profiles: ``text_output`` (each response carries
    the text generated since the previous one), ``finish_reason`` (empty or "None"
    until the end), token counts as ``prompt_tokens``/``completion_tokens`` (running
    totals, tiny_lm style) or ``num_input_tokens``/``num_output_tokens`` (vLLM: the
    output count is per response, so it is summed).
    """

    def __init__(self) -> None:
        # A multi-byte character may be split across two responses.
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending = False  # the decoder holds the start of a character
        self._texts: list[str] = []
        self.finish_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None

    def read(self, reply: Any) -> str:
        """The new text in ``reply`` (a decoded gRPC response, or the JSON payload of one
        of Triton's HTTP events); records its finish reason and counts."""
        if isinstance(reply, dict):
            return self._read_payload(reply)
        text = ""
        for name, value in _grpc_outputs(reply):
            if name == TEXT_OUTPUT:
                text = self._decode(value)
            elif name == "finish_reason":
                self._record_finish(value.decode("utf-8", "replace"))
            else:
                self._record_count(name, value)
        self._texts.append(text)
        return text

    def _read_payload(self, payload: dict[str, Any]) -> str:
        """``read`` of one of Triton's HTTP events, which give each output by name, one
        element unwrapped (a list otherwise). Text may hold surrogate escapes for bytes
        that are not UTF-8 (gateway/http_generate.py). Looked up by name: an event has
        more fields than outputs (model_name, id). Per streamed token, so no more work
        than it needs: ASCII text with nothing held back by the decoder is the text."""
        text = ""
        value = payload.get(TEXT_OUTPUT)
        if value is not None:
            if type(value) is not str:
                value = _joined_text(TEXT_OUTPUT, value)
            if self._pending or not value.isascii():
                text = self._decode(value.encode("utf-8", "surrogateescape"))
            else:
                text = value
        value = payload.get("finish_reason")
        if value is not None:
            if type(value) is not str:
                value = _joined_text("finish_reason", value)
            if not value.isascii():
                value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            self._record_finish(value)
        for name in _COUNT_OUTPUTS:
            count = payload.get(name)
            if count is not None:
                self._record_count(name, count if type(count) is int else _one_integer(name, count))
        self._texts.append(text)
        return text

    def _record_finish(self, reason: str) -> None:
        if reason and reason != "None":  # empty or "None" until the end
            self.finish_reason = reason

    def _record_count(self, name: str, count: int) -> None:
        """One of ``_COUNT_OUTPUTS``: running totals, except vLLM's per-response
        ``num_output_tokens``, which is summed."""
        if name == "num_output_tokens":
            self.completion_tokens = (self.completion_tokens or 0) + count
        elif name == "completion_tokens":
            self.completion_tokens = count
        else:
            self.prompt_tokens = count

    def _decode(self, data: bytes) -> str:
        text = self._decoder.decode(data)
        self._pending = bool(self._decoder.getstate()[0])
        return text

    def flush(self) -> str:
        """Text held back by the UTF-8 decoder (an incomplete final character)."""
        text = self._decoder.decode(b"", final=True)
        self._pending = False
        self._texts.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self._texts)

    def usage(self, prompt: str) -> Usage:
        """The model's own counts where it reported them, else ``count_words``."""
        return Usage(
            self.prompt_tokens if self.prompt_tokens is not None else count_words(prompt),
            self.completion_tokens
            if self.completion_tokens is not None
            else count_words(self.text),
        )

    def final_reason(self, usage: Usage, max_tokens: int | None) -> str:
        """The model's finish reason, else "length" when it produced ``max_tokens``."""
        if self.finish_reason is not None:
            return self.finish_reason
        if max_tokens is not None and usage.completion_tokens >= max_tokens:
            return "length"
        return "stop"


# The outputs a reader understands: text (as bytes), and counts.
_TEXT_OUTPUTS = (TEXT_OUTPUT, "finish_reason")
_COUNT_OUTPUTS = ("prompt_tokens", "num_input_tokens", "completion_tokens", "num_output_tokens")


def _grpc_outputs(reply: Any) -> list[tuple[str, Any]]:
    outputs: list[tuple[str, Any]] = []
    for (name, datatype, _shape, _params), raw in zip(
        reply.outputs, reply.raw_outputs, strict=True
    ):
        if name in _TEXT_OUTPUTS:
            outputs.append((name, _joined_bytes(name, datatype, raw)))
        elif name in _COUNT_OUTPUTS:
            outputs.append((name, _count(name, datatype, raw)))
    return outputs


def _joined_text(name: str, value: Any) -> str:
    if not (isinstance(value, list) and all(type(part) is str for part in value)):
        raise UpstreamError(f"model output '{name}' must be text, got {value!r}", 502)
    return "".join(value)


def _joined_bytes(name: str, datatype: str, raw: memoryview) -> bytes:
    if datatype != "BYTES":
        raise UpstreamError(f"model output '{name}' must be BYTES, got {datatype}", 502)
    try:
        return b"".join(framing.deserialize_bytes_tensor(raw))
    except FramingError as exc:
        raise UpstreamError(f"model output '{name}': {exc}", 502) from None


def _count(name: str, datatype: str, raw: memoryview) -> int:
    return _one_integer(name, raw_to_json(datatype, raw))


def _one_integer(name: str, values: Any) -> int:
    """The integer of a one-element list."""
    if not (isinstance(values, list) and len(values) == 1 and type(values[0]) is int):
        raise UpstreamError(f"model output '{name}' must be one integer, got {values!r}", 502)
    result: int = values[0]
    return result
