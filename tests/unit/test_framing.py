"""fastpath.framing: both twins, against tritonclient's BYTES codec and each other."""

import json
import random
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.utils import deserialize_bytes_tensor as triton_deserialize
from tritonclient.utils import serialize_byte_tensor as triton_serialize

from fastpath import framing
from fastpath.errors import FramingError
from tests.conftest import twin_params

IMPLS = twin_params(framing.framing_py, framing.framing_c)

elements = st.lists(st.binary(max_size=20) | st.text(max_size=10), max_size=30)


@pytest.fixture(params=IMPLS, scope="module")
def impl(request: pytest.FixtureRequest) -> ModuleType:
    return request.param


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[str, Any]:
    """("ok", value with views as bytes) or ("error", message): comparable across twins."""
    try:
        value = fn(*args)
    except FramingError as exc:
        return "error", str(exc)
    if isinstance(value, (list, tuple)):
        value = [bytes(v) if isinstance(v, memoryview) else v for v in value]
    return "ok", value


def both(name: str, *args: Any) -> tuple[str, Any]:
    """Outcome of ``name`` in every loaded twin, asserting they agree."""
    results = [
        outcome(getattr(m, name), *args) for m in (framing.framing_py, framing.framing_c) if m
    ]
    assert all(r == results[0] for r in results), results
    return results[0]


# ---------------------------------------------------------------------------- BYTES tensors


@settings(max_examples=300)
@given(items=elements)
def test_bytes_round_trip_matches_tritonclient(impl: ModuleType, items: list[bytes | str]) -> None:
    encoded = impl.serialize_bytes_tensor(items)
    reference = triton_serialize(np.array(items, dtype=np.object_).reshape(-1))
    assert encoded == (reference.item() if reference.size else b"")
    decoded = impl.deserialize_bytes_tensor(encoded)
    assert decoded == [i.encode() if isinstance(i, str) else i for i in items]
    assert decoded == list(triton_deserialize(encoded))


def test_bytes_tensor_edge_elements(impl: ModuleType) -> None:
    items = [b"", "", "\x00", b"\x00\xff", "héllo ✓", "𝄞"]
    encoded = impl.serialize_bytes_tensor(items)
    assert encoded[:8] == b"\x00\x00\x00\x00\x00\x00\x00\x00"
    assert impl.deserialize_bytes_tensor(encoded) == [
        b"",
        b"",
        b"\x00",
        b"\x00\xff",
        "héllo ✓".encode(),
        "𝄞".encode(),
    ]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["a", 3], "BYTES element 1 must be bytes or str, found int"),
        ([None], "BYTES element 0 must be bytes or str, found NoneType"),
        (["ok", "\ud800"], "BYTES element 1 is a str that is not encodable as UTF-8"),
    ],
)
def test_serialize_rejects_bad_elements(impl: ModuleType, items: list[Any], message: str) -> None:
    with pytest.raises(FramingError, match=message):
        impl.serialize_bytes_tensor(items)


@settings(max_examples=200)
@given(items=st.lists(st.binary(max_size=12), min_size=1, max_size=10), data=st.data())
def test_deserialize_truncation_fails_unless_at_element_boundary(
    items: list[bytes], data: st.DataObject
) -> None:
    encoded = framing.framing_py.serialize_bytes_tensor(items)
    boundaries = {0}
    for item in items:
        boundaries.add(max(boundaries) + 4 + len(item))
    cut = data.draw(st.integers(0, len(encoded) - 1))
    kind, value = both("deserialize_bytes_tensor", encoded[:cut])
    if cut in boundaries:
        assert (kind, value) == ("ok", items[: sorted(boundaries).index(cut)])
    else:
        assert kind == "error"


@settings(max_examples=200)
@given(items=st.lists(st.binary(max_size=12), min_size=1, max_size=10), data=st.data())
def test_deserialize_rejects_lying_length(items: list[bytes], data: st.DataObject) -> None:
    encoded = bytearray(framing.framing_py.serialize_bytes_tensor(items))
    index = data.draw(st.integers(0, len(items) - 1))
    offset = sum(4 + len(i) for i in items[:index])
    remaining = len(encoded) - offset - 4
    encoded[offset : offset + 4] = data.draw(st.integers(remaining + 1, 2**32 - 1)).to_bytes(
        4, "little"
    )
    kind, message = both("deserialize_bytes_tensor", bytes(encoded))
    assert kind == "error"
    assert f"BYTES element {index} at offset {offset} declares" in message


@settings(max_examples=500)
@given(blob=st.binary(max_size=64))
def test_deserialize_arbitrary_bytes(blob: bytes) -> None:
    kind, value = both("deserialize_bytes_tensor", blob)
    if kind == "ok":
        assert framing.framing_py.serialize_bytes_tensor(value) == blob


@pytest.mark.parametrize(
    "wrap",
    [bytes, bytearray, memoryview, lambda b: np.frombuffer(b, dtype=np.uint8)],
    ids=["bytes", "bytearray", "memoryview", "ndarray"],
)
def test_deserialize_accepts_buffers(impl: ModuleType, wrap: Callable[[bytes], Any]) -> None:
    encoded = impl.serialize_bytes_tensor(["ab", b"", "c"])
    assert impl.deserialize_bytes_tensor(wrap(encoded)) == [b"ab", b"", b"c"]


# ---------------------------------------------------------------------------- binary bodies


@settings(max_examples=300)
@given(
    body=st.binary(max_size=40), header_length=st.integers(-(2**70), 2**70) | st.integers(-2, 45)
)
def test_split_infer_body(body: bytes, header_length: int) -> None:
    kind, value = both("split_infer_body", body, header_length)
    if 0 <= header_length <= len(body):
        assert (kind, value) == ("ok", [body[:header_length], body[header_length:]])
    else:
        assert kind == "error"
        assert "Inference-Header-Content-Length" in value


def test_split_infer_body_message_and_zero_copy(impl: ModuleType) -> None:
    body = b"x" * 120
    with pytest.raises(
        FramingError, match="Inference-Header-Content-Length 5000 exceeds body length 120"
    ):
        impl.split_infer_body(body, 5000)
    header, tail = impl.split_infer_body(body, 20)
    assert header.obj is body and tail.obj is body


@settings(max_examples=300)
@given(
    tail=st.binary(max_size=40), sizes=st.lists(st.integers(-3, 45) | st.just(2**80), max_size=5)
)
def test_slice_binary_inputs(tail: bytes, sizes: list[int]) -> None:
    kind, value = both("slice_binary_inputs", tail, sizes)
    if all(s >= 0 for s in sizes) and sum(sizes) == len(tail):
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        assert (kind, value) == (
            "ok",
            [tail[o : o + s] for o, s in zip(offsets, sizes, strict=True)],
        )
    else:
        assert kind == "error"
        assert "input" in value


def test_slice_binary_inputs_names_the_input(impl: ModuleType) -> None:
    with pytest.raises(FramingError, match="binary_data_size of input 1 is 10 but only 2 bytes"):
        impl.slice_binary_inputs(b"abcd", [2, 10])
    with pytest.raises(FramingError, match=r"2 bytes after the last input \(input 1\)"):
        impl.slice_binary_inputs(b"abcdef", [2, 2])
    with pytest.raises(FramingError, match="binary_data_size of input 0 must be >= 0"):
        impl.slice_binary_inputs(b"", [-1])
    floats = np.arange(4, dtype=np.float32)
    views = impl.slice_binary_inputs(floats.data, [4, 12])
    assert [bytes(v) for v in views] == [floats.tobytes()[:4], floats.tobytes()[4:]]
    assert all(v.obj is floats for v in views)


def test_build_infer_body(impl: ModuleType) -> None:
    tensor = np.arange(3, dtype=np.float32)
    body = impl.build_infer_body(
        b'{"outputs":[]}', [tensor, b"", bytearray(b"xy"), memoryview(b"z")]
    )
    assert body == b'{"outputs":[]}' + tensor.tobytes() + b"xyz"
    assert impl.build_infer_body(b"{}", []) == b"{}"


# ---------------------------------------------------------------------------- SSE


@settings(max_examples=300)
@given(data=st.binary(max_size=30), event=st.none() | st.binary(max_size=10))
def test_sse_event(data: bytes, event: bytes | None) -> None:
    kind, value = both("sse_event", data, event)
    if any(c in (event or b"") + data for c in b"\r\n"):
        assert kind == "error"
    else:
        expected = (
            (b"" if event is None else b"event: " + event + b"\n") + b"data: " + data + b"\n\n"
        )
        assert (kind, value) == ("ok", expected)


def test_sse_event_names_first_line_break(impl: ModuleType) -> None:
    with pytest.raises(
        FramingError, match=r"SSE data must be a single line, found b'\\r' at offset 3"
    ):
        impl.sse_event(b'{"a\r\n')
    with pytest.raises(
        FramingError, match=r"SSE event must be a single line, found b'\\n' at offset 1"
    ):
        impl.sse_event(b"{}", b"x\ny")
    assert impl.sse_event(memoryview(b'{"t":1}'), b"token") == b'event: token\ndata: {"t":1}\n\n'


def test_long_json_strings_are_elided_and_the_rest_kept(impl: ModuleType) -> None:
    text = json.dumps({"name": "TEXT", "data": ["a" * 40, 'q"\\' * 10, "short"], "n": [1]})
    elided = impl.elide_long_strings(text.encode(), 20)
    assert json.loads(elided) == {"name": "TEXT", "data": ["", "", "short"], "n": [1]}
    assert impl.elide_long_strings(b'["' + b"x" * 30 + b'\\"', 5) == b'["' + b"x" * 30 + b'\\"'


def test_twins_elide_alike() -> None:
    """Random texts of quotes, backslashes and JSON punctuation (escaped quotes, runs of
    backslashes, unterminated strings): the same result from both twins."""
    if framing.framing_c is None:
        pytest.skip("compiled framing not loaded")
    rng = random.Random(5)
    alphabet = b'ab"\\ :{}[],'
    for _ in range(20_000):
        text = bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        limit = rng.randint(0, 6)
        expected = framing.framing_py.elide_long_strings(text, limit)
        assert framing.framing_c.elide_long_strings(text, limit) == expected, (text, limit)


def decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Text around each kind of byte sequence UTF-8 forbids or allows at its edges: overlong
# forms, surrogates, above U+10FFFF, truncated sequences, stray continuation bytes.
utf8_edges = [
    b"\xc0\xaf",
    b"\xc1\xbf",
    b"\xc2\x80",
    b"\xdf\xbf",
    b"\xe0\x9f\xbf",
    b"\xe0\xa0\x80",
    b"\xed\x9f\xbf",
    b"\xed\xa0\x80",
    b"\xed\xbf\xbf",
    b"\xee\x80\x80",
    b"\xef\xbf\xbf",
    b"\xf0\x8f\xbf\xbf",
    b"\xf0\x90\x80\x80",
    b"\xf4\x8f\xbf\xbf",
    b"\xf4\x90\x80\x80",
    b"\xf5\x80\x80\x80",
    b"\xff",
    b"\x80",
    b"\xe2\x82",
    b"\xf0\x9f\x98",
    b"\xc3",
]


@pytest.mark.parametrize("edge", utf8_edges)
def test_is_utf8_agrees_with_the_strict_decoder_at_the_edges(impl: ModuleType, edge: bytes) -> None:
    for text in (edge, b"ascii ascii " + edge, edge + b" and ascii after it", b"x" * 7 + edge):
        assert impl.is_utf8(text) is decodes(text), text
        assert impl.is_utf8(memoryview(bytearray(text))) is decodes(text), text


@given(st.lists(st.binary(max_size=6) | st.text(max_size=12).map(str.encode), max_size=12))
@settings(max_examples=800, deadline=None)
def test_is_utf8_agrees_with_the_strict_decoder(pieces: list[bytes]) -> None:
    """Valid text (every plane) mixed with arbitrary bytes: both twins say what
    ``bytes.decode`` says, wherever a bad sequence falls against the 8-byte ASCII runs."""
    text = b"".join(pieces)
    for impl in (framing.framing_py, framing.framing_c):
        if impl is not None:
            assert impl.is_utf8(text) is decodes(text), text


def test_is_utf8_reads_a_large_ascii_body_and_finds_its_last_byte(impl: ModuleType) -> None:
    body = bytearray(b'{"data":["' + b"a" * (4 << 20) + b'"]}')
    assert impl.is_utf8(body)
    body[-3] = 0xFF
    assert not impl.is_utf8(body)
