"""The JSON record every scenario benchmark writes: what ran, when, on what machine."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).with_name("results")


def write_record(benchmark: str, file_stem: str, fields: dict[str, Any]) -> Path:
    """Write ``bench/results/<file_stem>-<UTC stamp>.json`` and return its path."""
    now = time.gmtime()
    record = {
        "benchmark": benchmark,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", now),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        **fields,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{file_stem}-{time.strftime('%Y%m%d-%H%M%S', now)}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return out
