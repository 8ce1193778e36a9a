"""A parser for the Prometheus text exposition format, limited to the samples asked for.

Written with ``str`` methods (``startswith``, ``find``, ``split``) instead of a regex per
line: a scrape of a busy Triton is hundreds of lines every 250 ms, and most of them
belong to families nobody asked for, which are rejected by a name-prefix test before
anything else is looked at.

Handled: ``#`` comments (``# HELP``/``# TYPE`` included), label values with the escapes
``\\\\``, ``\\"`` and ``\\n``, values such as ``NaN``/``+Inf``/``-Inf``/``1e+06``, and an
optional timestamp after the value (ignored). A malformed line of a wanted sample is
skipped: one bad line must not cost the rest of the scrape.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import TypeAlias

# Label pairs sorted by label name, so the order a server prints them in does not matter.
Labels: TypeAlias = tuple[tuple[str, str], ...]
Samples: TypeAlias = dict[tuple[str, Labels], float]

_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


class _Malformed(Exception):
    """A line that does not follow the text format; the caller skips it."""


def parse_samples(text: str, names: Collection[str]) -> Samples:
    """``{(sample name, sorted label pairs): value}`` for every sample whose name is in
    ``names`` (exact names: ``foo_bucket``, not ``foo``, for a histogram's buckets)."""
    wanted = frozenset(names)
    prefixes = tuple(wanted)
    samples: Samples = {}
    if not prefixes:
        return samples
    # Lines end at "\n" only: splitlines() would also split inside a label value at
    # characters such as U+2028 that the format allows there unescaped.
    for line in text.split("\n"):
        # Comments start with '#', so they fail the prefix test too.
        if not line.startswith(prefixes):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name, rest = line[:brace], line[brace + 1 :]
        else:
            name, _, rest = line.partition(" ")
            rest = "}" + rest  # no labels: an empty label set, closed
        if name not in wanted:
            continue  # a longer name sharing a wanted prefix
        try:
            labels, value_part = _parse_labels(rest)
            samples[(name, labels)] = _parse_value(value_part)
        except _Malformed:
            continue
    return samples


def _parse_labels(text: str) -> tuple[Labels, str]:
    """Parse ``name="value",...}`` (the text after ``{``); return labels and what follows."""
    labels: list[tuple[str, str]] = []
    pos = 0
    while True:
        pos = _skip(text, pos, " \t,")
        if pos >= len(text):
            raise _Malformed("unterminated label set")
        if text[pos] == "}":
            return tuple(sorted(labels)), text[pos + 1 :]
        equals = text.find("=", pos)
        if equals == -1:
            raise _Malformed("label without '='")
        label = text[pos:equals].strip()
        quote = _skip(text, equals + 1, " \t")
        if not label or quote >= len(text) or text[quote] != '"':
            raise _Malformed("label value must be quoted")
        value, pos = _parse_quoted(text, quote + 1)
        labels.append((label, value))


def _parse_quoted(text: str, start: int) -> tuple[str, int]:
    """The label value starting at ``start`` (after its opening quote), unescaped, and
    the position after its closing quote."""
    end = text.find('"', start)
    backslash = text.find("\\", start, end if end != -1 else len(text))
    if end != -1 and backslash == -1:
        return text[start:end], end + 1  # the common case: nothing escaped
    parts: list[str] = []
    pos = start
    while True:
        backslash = text.find("\\", pos)
        end = text.find('"', pos)
        if end == -1:
            raise _Malformed("unterminated label value")
        if backslash == -1 or end < backslash:
            parts.append(text[pos:end])
            return "".join(parts), end + 1
        parts.append(text[pos:backslash])
        escaped = text[backslash + 1 : backslash + 2]
        # An unknown escape is kept as written, as Prometheus itself does.
        parts.append(_ESCAPES.get(escaped, "\\" + escaped))
        pos = backslash + 2


def _parse_value(text: str) -> float:
    """The value after the labels; a timestamp may follow it and is ignored."""
    fields = text.split()
    if not 1 <= len(fields) <= 2:
        raise _Malformed("expected a value and an optional timestamp")
    try:
        return float(fields[0])  # float() reads NaN, +Inf, -Inf and exponents
    except ValueError:
        raise _Malformed(f"not a number: {fields[0]!r}") from None


def _skip(text: str, pos: int, chars: str) -> int:
    while pos < len(text) and text[pos] in chars:
        pos += 1
    return pos
