"""The JSON record every scenario benchmark writes: what ran, when, on what machine."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")


def utc_stamp(when: time.struct_time | None = None) -> str:
    """``YYYYMMDD-HHMMSS`` in UTC: the suffix (or name) of every result file."""
    return time.strftime("%Y%m%d-%H%M%S", when or time.gmtime())


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_record(
    benchmark: str, file_stem: str, fields: dict[str, Any], stamp: str | None = None
) -> Path:
    """Write ``bench/results/<file_stem>-<stamp>.json`` (``<stamp>.json`` when the stem is
    empty; ``stamp`` defaults to now, UTC) and return its path."""
    now = time.gmtime()
    stamp = stamp or utc_stamp(now)
    record = {
        "benchmark": benchmark,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", now),
        "machine": {
            "cpu_model": cpu_model(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        **fields,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / (f"{file_stem}-{stamp}.json" if file_stem else f"{stamp}.json")
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return out
