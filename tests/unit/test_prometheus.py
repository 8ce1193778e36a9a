"""adapters.prometheus: a real Triton scrape, the format's corners, and a round trip."""

from __future__ import annotations

import math
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from adapters.prometheus import Labels, Samples, parse_samples

# Captured from the CPU tritonserver 2.51 of .venv-triton serving model_repository/
# while 6 concurrent tiny_lm requests queued behind its single instance.
TRITON_SAMPLE = (Path(__file__).parent / "data" / "triton_2.51_metrics.txt").read_text()

TINY_LM: Labels = (("model", "tiny_lm"), ("version", "1"))


def test_real_triton_scrape() -> None:
    samples = parse_samples(
        TRITON_SAMPLE,
        ["nv_inference_pending_request_count", "nv_inference_queue_duration_us"],
    )
    assert samples[("nv_inference_pending_request_count", TINY_LM)] == 4.0
    assert samples[("nv_inference_queue_duration_us", TINY_LM)] == 59.0
    models = {
        dict(labels)["model"]
        for name, labels in samples
        if name == "nv_inference_pending_request_count"
    }
    assert models == {"embed", "tiny_lm", "tokenize"}
    assert len(samples) == 6  # nothing else came along


def test_every_label_set_of_a_family() -> None:
    samples = parse_samples(TRITON_SAMPLE, ["nv_inference_request_failure"])
    key = (
        "nv_inference_request_failure",
        (("model", "tiny_lm"), ("reason", "CANCELED"), ("version", "1")),
    )
    assert samples[key] == 0.0
    assert len(samples) == 3 * 4  # 3 models x 4 failure reasons


def test_labels_are_sorted_whatever_order_the_server_printed() -> None:
    text = (
        'm{model="llm",version="1",request_type="waiting"} 3\n'
        'm{request_type="waiting",model="llm",version="1"} 4\n'
    )
    labels = (("model", "llm"), ("request_type", "waiting"), ("version", "1"))
    assert parse_samples(text, ["m"]) == {("m", labels): 4.0}


def test_unlabelled_sample_and_exact_names() -> None:
    samples = parse_samples(TRITON_SAMPLE, ["nv_cpu_memory_total_bytes", "nv_inference_count"])
    assert samples == {
        ("nv_cpu_memory_total_bytes", ()): 25276510208.0,
        ("nv_inference_count", (("model", "embed"), ("version", "1"))): 0.0,
        ("nv_inference_count", TINY_LM): 1.0,
        ("nv_inference_count", (("model", "tokenize"), ("version", "1"))): 0.0,
    }


def test_no_names_gives_nothing() -> None:
    assert parse_samples(TRITON_SAMPLE, []) == {}


def test_escapes_special_values_and_timestamps() -> None:
    text = "\n".join(
        [
            "# HELP m a metric with a \\ backslash",
            "# TYPE m gauge",
            'm{path="C:\\\\dir",quote="say \\"hi\\"",nl="a\\nb"} 1.5 1700000000000',
            'm{odd="\\t"} +Inf',
            'm{brace="}{,=",  space = "x y" ,} -Inf',
            "m NaN",
            "m{} 2e+06\r",
            'm{sep="a\u2028b"} 3',
            "m_total 7",
            "  ",
            "",
        ]
    )
    samples = parse_samples(text, ["m"])
    assert samples[("m", (("nl", "a\nb"), ("path", "C:\\dir"), ("quote", 'say "hi"')))] == 1.5
    assert samples[("m", (("odd", "\\t"),))] == math.inf
    assert samples[("m", (("brace", "}{,="), ("space", "x y")))] == -math.inf
    assert samples[("m", ())] == 2e6  # the later line with the same (empty) label set
    assert samples[("m", (("sep", "a\u2028b"),))] == 3.0
    assert ("m_total", ()) not in samples


def test_malformed_lines_are_skipped_not_fatal() -> None:
    text = "\n".join(
        [
            'm{a="1"} 1',
            'm{a="unterminated} 2',
            "m{a=unquoted} 3",
            "m{a} 4",
            'm{a="1"',
            'm{a="5"} not_a_number',
            'm{a="6"}',
            'm{a="7"} 1 2 3',
            'm{="8"} 8',
            'm{a="9"} 9',
            'm{a="\\',
            "m",
        ]
    )
    assert parse_samples(text, ["m"]) == {
        ("m", (("a", "1"),)): 1.0,
        ("m", (("a", "9"),)): 9.0,
    }


# -- round trip ------------------------------------------------------------------------

names = st.from_regex(r"[a-zA-Z_:][a-zA-Z0-9_:]{0,20}", fullmatch=True)
label_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,10}", fullmatch=True)
label_values = st.text(st.characters(codec="utf-8"), max_size=12)
values = st.floats(allow_nan=True, allow_infinity=True)
label_sets = st.dictionaries(label_names, label_values, max_size=4)


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def render(families: dict[str, list[tuple[dict[str, str], float]]], timestamps: bool) -> str:
    lines = []
    for name, samples in families.items():
        lines += [f"# HELP {name} help text for {name}", f"# TYPE {name} gauge"]
        for labels, value in samples:
            label_text = ",".join(f'{k}="{escape(v)}"' for k, v in labels.items())
            body = f"{name}{{{label_text}}}" if labels else name
            stamp = " 1700000000123" if timestamps else ""
            lines.append(f"{body} {render_value(value)}{stamp}")
    return "\n".join(lines) + "\n"


def same(expected: Samples, parsed: Samples) -> bool:
    return expected.keys() == parsed.keys() and all(
        (math.isnan(v) and math.isnan(parsed[k])) or v == parsed[k] for k, v in expected.items()
    )


@given(
    families=st.dictionaries(
        names,
        st.lists(
            st.tuples(label_sets, values),
            max_size=4,
            unique_by=lambda s: tuple(sorted(s[0].items())),
        ),
        max_size=6,
    ),
    wanted_share=st.integers(min_value=0, max_value=6),
    timestamps=st.booleans(),
)
def test_render_then_parse_round_trip(
    families: dict[str, list[tuple[dict[str, str], float]]], wanted_share: int, timestamps: bool
) -> None:
    wanted = list(families)[:wanted_share]
    expected: Samples = {
        (name, tuple(sorted(labels.items()))): value
        for name in wanted
        for labels, value in families[name]
    }
    parsed = parse_samples(render(families, timestamps), wanted)
    assert same(expected, parsed)


@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(text: str) -> None:
    parse_samples(text, ["m", "nv_inference_pending_request_count"])
