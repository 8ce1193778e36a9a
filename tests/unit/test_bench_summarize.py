"""bench/summarize.py: targets across several `make bench` runs."""

from __future__ import annotations

from typing import Any

from bench.summarize import markdown, provenance_warnings, targets_across


def check(target: str, measured: float, limit: float, met: bool) -> dict[str, Any]:
    return {"target": target, "measured": measured, "limit": limit, "met": met}


def run(commit: str, modified: int, *checks: dict[str, Any]) -> dict[str, Any]:
    return {"git": {"commit": commit, "modified_files": modified}, "targets": list(checks)}


LATENCY = "added p50 <= 2x nginx's"
THROUGHPUT = "throughput >= 80% of direct"
ITL = "inter-token p50 <= 2x nginx's"


def test_verdicts_and_fractions_per_run() -> None:
    runs = [
        run("a", 0, check(LATENCY, 180, 120, False), check(THROUGHPUT, 2400, 2000, True)),
        run("a", 0, check(LATENCY, 190, 200, True), check(THROUGHPUT, 2600, 3600, False)),
        run("a", 0, check(LATENCY, 200, 100, False), check(THROUGHPUT, 2700, 3000, False)),
    ]
    latency, throughput = targets_across(runs)
    assert latency.met == [False, True, False]
    assert latency.fractions == [1.5, 0.95, 2.0]
    assert latency.median_fraction() == 1.5
    assert throughput.met == [True, False, False]
    assert throughput.median_fraction() == 0.9


def test_a_zero_limit_has_no_fraction_and_a_missing_target_is_not_met() -> None:
    runs = [
        run("a", 0, check(ITL, -20, 0, True)),
        run("a", 0),
        run("a", 0, check(ITL, 30, 60, True)),
    ]
    (itl,) = targets_across(runs)
    assert itl.met == [True, False, True]
    assert itl.fractions == [None, None, 0.5]
    assert itl.median_fraction() == 0.5


def test_runs_of_other_code_are_named() -> None:
    runs = [run("a", 0), run("b", 2)]
    warnings = provenance_warnings(runs, ["one", "two"])
    assert warnings == ["the runs are of 2 commits: a, b", "two ran with 2 modified files"]
    assert provenance_warnings([run("a", 0), run("a", 0)], ["one", "two"]) == []


def test_markdown_table() -> None:
    runs = [
        run("a", 0, check(LATENCY, 180, 120, False)),
        run("a", 0, check(LATENCY, 90, 100, True)),
    ]
    table = markdown(targets_across(runs), ["r1", "r2"])
    assert table.splitlines() == [
        "| target | met | measured / limit, r1 / r2 | median |",
        "|---|---|---|---:|",
        f"| {LATENCY} | 1 of 2 | 1.50 / 0.90 | 1.20 |",
    ]
