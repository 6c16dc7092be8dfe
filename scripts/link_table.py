"""The table of reports/link/README.md, one row per replay report, from the reports themselves.

    .venv/bin/python scripts/link_table.py reports/release/replay.json="ada-ddnn replay --n 0" ...

Each argument is REPORT=COMMAND (the command shown in the row); prints the Markdown table.
"""

from __future__ import annotations

import json
import os
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


def main(argv: list[str]) -> int:
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
