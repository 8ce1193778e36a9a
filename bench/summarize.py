"""Several ``make bench`` runs side by side: how often each target was met.

    .venv/bin/python -m bench.summarize bench/results/A.json bench/results/B.json ...

On this shared 2-core machine the peers' own numbers move by half from run to run
(nginx's added p50 on the same small request: 61–106 µs on one afternoon), so a ratio
target's verdict can flip between two runs of the same commit. This prints, as a
Markdown table, each target's verdict in every run given, and its measured value as a
fraction of its limit (≤ 1 meets a ``<=`` target, ≥ 1 a ``>=`` one) per run and their
median. It says so when the runs are not all of one commit with no files modified.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TargetRuns:
    """One target across runs: each run's verdict and measured value / limit."""

    target: str
    met: list[bool]
    fractions: list[float | None]  # None where the limit is 0 (a peer at or below 0)

    def median_fraction(self) -> float | None:
        known = [f for f in self.fractions if f is not None]
        return statistics.median(known) if known else None


def fraction_of_limit(check: dict[str, Any]) -> float | None:
    limit = check["limit"]
    return None if limit == 0 else check["measured"] / limit


def targets_across(runs: list[dict[str, Any]]) -> list[TargetRuns]:
    """Every target of the first run, with its verdict and fraction in each run (a run
    without the target, e.g. LiteLLM could not start, counts as not met)."""
    by_run = [{check["target"]: check for check in run["targets"]} for run in runs]
    rows = []
    for check in runs[0]["targets"]:
        name = check["target"]
        found = [checks.get(name) for checks in by_run]
        rows.append(
            TargetRuns(
                name,
                [c is not None and bool(c["met"]) for c in found],
                [None if c is None else fraction_of_limit(c) for c in found],
            )
        )
    return rows


def provenance_warnings(runs: list[dict[str, Any]], names: list[str]) -> list[str]:
    """Why these runs may not measure one and the same code."""
    commits = {run["git"]["commit"] for run in runs}
    warnings = []
    if len(commits) > 1:
        warnings.append(f"the runs are of {len(commits)} commits: {', '.join(sorted(commits))}")
    for run, name in zip(runs, names, strict=True):
        if run["git"]["modified_files"]:
            warnings.append(f"{name} ran with {run['git']['modified_files']} modified files")
    return warnings


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(rows: list[TargetRuns], names: list[str]) -> str:
    lines = [
        "| target | met | measured / limit, " + " / ".join(names) + " | median |",
        "|---|---|---|---:|",
    ]
    for row in rows:
        per_run = " / ".join(_cell(f) for f in row.fractions)
        met = f"{sum(row.met)} of {len(row.met)}"
        lines.append(f"| {row.target} | {met} | {per_run} | {_cell(row.median_fraction())} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench/results/<stamp>.json")
    args = parser.parse_args()
    runs = [json.loads(path.read_text()) for path in args.results]
    names = [path.stem for path in args.results]
    for warning in provenance_warnings(runs, names):
        print(f"warning: {warning}")
    print(markdown(targets_across(runs), names))


if __name__ == "__main__":
    main()
