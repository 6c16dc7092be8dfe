"""The tables of reports/link/README.md, from the reports themselves.

    .venv/bin/python scripts/link_table.py reports/release/replay.json="ada-ddnn replay --n 0" ...
    .venv/bin/python scripts/link_table.py --medians

Each argument is REPORT=COMMAND (the command shown in the row); prints the Markdown table, one row
per replay report. --medians prints the lazy against eager latency table of the 30 fps rounds
(`ROUNDS=N bash scripts/release-reports.sh latency`): per exit, the median over the rounds of each
round's p50 and p99, with the range over the rounds in brackets.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys

EXITS = ("exit1", "exit2", "cloud")


def _b(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _wait(w: dict | None) -> str:
    """The feature requests' wait, p50 / p99 ms ("-": eager, or a report from before it was measured)."""
    return "-" if not w or not w.get("n") else f"{w['p50']:.1f}/{w['p99']:.1f}"


def row(path: str, command: str) -> str:
    with open(path) as f:
        r = json.load(f)
    link = r["link"]["bytes_per_camera_frame"]
    lat = r["latency_ms"]
    latency = "; ".join(f"{lat[e]['p50']:.1f}/{lat[e]['p99']:.1f}" if lat.get(e) and lat[e].get("n") else "-"
                        for e in EXITS)
    inc = r["incomplete_by_exit"]
    cells = [
        f"`{os.path.splitext(os.path.basename(path))[0]}`",
        f"`{command}`",
        f"{100 * r['accuracy']['overall']:.2f}%",
        " / ".join(f"{100 * r['exit_rate'][e]:.2f}" for e in EXITS),
        f"{_b(link['all'])}; " + " / ".join(_b(link[e]) for e in EXITS),
        " / ".join(str(inc.get(e, 0)) for e in EXITS),
        f"{r['throughput_fps']:.1f}",
        latency,
        _wait(r.get("feature_wait_ms")),
        f"{r['lost']} / {r['duplicates']}",
        f"{r['offline']['decisions_equal']}",
    ]
    return "| " + " | ".join(cells) + " |"


def _rounds(upload: str) -> list[dict]:
    first = "reports/release/replay_fps30.json" if upload == "lazy" else "reports/link/f30_eager.json"
    paths = [first] + sorted(glob.glob(f"reports/link/f30_{upload}_round*.json"))
    out = []
    for path in paths:
        with open(path) as f:
            out.append(json.load(f))
    return out


def _stat(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def medians() -> None:
    lazy, eager = _rounds("lazy"), _rounds("eager")
    print(f"Medians over the {len(lazy)} lazy and {len(eager)} eager rounds (range over the rounds in brackets), ms:")
    print()
    print("| | lazy p50 | eager p50 | lazy - eager | lazy p99 | eager p99 |")
    print("|---|---:|---:|---:|---:|---:|")
    for e, name in zip(EXITS, ("exit 1", "exit 2", "cloud")):
        lp50 = [r["latency_ms"][e]["p50"] for r in lazy]
        ep50 = [r["latency_ms"][e]["p50"] for r in eager]
        diff = statistics.median(lp50) - statistics.median(ep50)
        lp99 = [r["latency_ms"][e]["p99"] for r in lazy]
        ep99 = [r["latency_ms"][e]["p99"] for r in eager]
        print(f"| {name} | {_stat(lp50)} | {_stat(ep50)} | {diff:+.1f} | {_stat(lp99)} | {_stat(ep99)} |")
    waits = [r["feature_wait_ms"] for r in lazy if r.get("feature_wait_ms", {}).get("n")]
    if waits:
        wp50, wp99 = [w["p50"] for w in waits], [w["p99"] for w in waits]
        print(f"| feature wait (lazy) | {_stat(wp50)} | | | {_stat(wp99)} | |")


def main(argv: list[str]) -> int:
    if argv == ["--medians"]:
        medians()
        return 0
    if not argv or any("=" not in a for a in argv):
        print(__doc__, file=sys.stderr)
        return 2
    print("| report | command | overall | exit 1 / exit 2 / cloud | bytes/camera/frame (all; exit 1 / exit 2 / cloud) "
          "| incomplete (exit 1 / 2 / cloud) | frames/s | latency p50 / p99 ms (exit 1; exit 2; cloud) "
          "| feature wait p50 / p99 ms | lost / dup "
          "| equal to offline |")
    print("|---|---|---:|---|---|---|---:|---|---|---|---:|")
    for arg in argv:
        path, command = arg.split("=", 1)
        print(row(path, command))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
