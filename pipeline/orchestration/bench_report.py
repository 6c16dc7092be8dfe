"""What `ada-ddnn bench stream` writes besides its JSON: a figure of the edge's capacity and the
benchmarks page (docs/BENCHMARKS.md), both made from the JSON so that every number there was
measured by the run it names."""

from __future__ import annotations

import os
import re
import time

from matplotlib.figure import Figure

from pipeline.fileio import atomic_write_text


def write_figure(result: dict, path: str) -> str:
    """Offered vs decided frames/s into one edge, with the broker ceiling; latency per step."""
    edge, broker = result["edge"], result["broker"]
    steps = edge["steps"] + [edge["overload"]]
    fig = Figure(figsize=(10, 4))
    ax, lat = fig.subplots(1, 2)
    offered = [s["offered_fps"] for s in steps]
    ax.plot(offered, offered, ls=":", color="grey", label="offered")
    ax.plot(offered, [s["decided_fps"] or 0 for s in steps], marker="o", label="decided")
    ax.axhline(broker["received_per_s"] / 6, color="tab:red", ls="--", label="broker ceiling / 6 cameras")
    ax.set_xlabel("frames/s offered (6 observations each)")
    ax.set_ylabel("frames/s")
    ax.set_title(f"one edge process: holds {edge['capacity_fps']} fps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    for exit_name in ("exit1", "exit2", "cloud"):
        ax_x = [s["offered_fps"] for s in steps if s["latency_ms"].get(exit_name)]
        lat.plot(ax_x, [s["latency_ms"][exit_name]["p99"] for s in steps if s["latency_ms"].get(exit_name)],
                 marker="o", label=f"{exit_name} p99")
    lat.set_yscale("log")
    lat.set_xlabel("frames/s offered")
    lat.set_ylabel("capture to decision (ms)")
    lat.set_title("latency per exit path")
    lat.grid(alpha=0.3)
    lat.legend(fontsize="small")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _ms(lat: dict | None) -> str:
    return "-" if not lat else f"{lat['p50']:.0f} / {lat['p95']:.0f} / {lat['p99']:.0f}"


def render(result: dict, figure: str | None, page_dir: str) -> str:
    c, b, e, e2e, t = (result["compute"], result["broker"], result["edge"], result["end_to_end"], result["targets"])
    m = result["machine"]
    lines = [
        "# Benchmarks: the streaming pipeline on this machine",
        "",
        f"Measured by `{result.get('command', 'ada-ddnn bench stream')}` on {time.strftime('%Y-%m-%d')} "
        f"({m['cpus']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']}); {result['seconds']:.0f} s "
        "in all. Private Mosquitto and Redis on loopback; every role a process of its own. The JSON of the "
        "run holds every number below and more.",
        "",
        "## Targets (ratios from this one run)",
        "",
        "| target | wanted | measured |",
        "|---|---:|---:|",
        f"| edge observations/s as a share of the broker ceiling | >= {t['edge_fraction_of_broker_ceiling']['target']}"
        f" | {t['edge_fraction_of_broker_ceiling']['measured']} |",
        f"| offered twice its capacity, decided share of capacity (rest named) | >= "
        f"{t['overload_decided_share_of_capacity']['target']} | {t['overload_decided_share_of_capacity']['measured']}"
        f" ({'none lost' if t['overload_decided_share_of_capacity']['named_or_decided'] else 'frames lost unnamed'}) |",
        f"| end-to-end frames/s, all roles on these cores | >= {t['end_to_end_fps']['target']} | "
        f"{t['end_to_end_fps']['measured']} paced, {t['end_to_end_fps']['full_speed']} at full speed |",
        f"| end to end as a share of the batched compute ceiling | >= "
        f"{t['end_to_end_share_of_compute_ceiling']['target']} | "
        f"{t['end_to_end_share_of_compute_ceiling']['measured']} |",
        "",
        "## Ceilings",
        "",
        f"- Compute, one process, {c['threads']} threads: cameras {c['cameras_batched_fps']:.0f} frames/s in batches "
        f"of {c['batch']}; the adaptive path {c['adaptive_batched_fps']:.0f} frames/s batched, "
        f"{c['adaptive_one_by_one_fps']:.0f} one frame at a time.",
        f"- Broker: {b['received_per_s']:.0f} QoS 1 messages/s of {b['message_bytes']} bytes from a paho publisher "
        f"process to a subscriber process ({b['received']} of {b['sent']} received).",
        "",
        "## One edge process (with one cloud worker), fed pre-encoded observations",
        "",
        f"It holds **{e['capacity_fps']} frames/s** ({e['observations_per_s']} observations/s, "
        f"{e['fraction_of_broker_ceiling']:.2f} of the broker ceiling).",
        "",
        "| offered fps | decided fps | decided | shed (named) | lost | duplicates | late obs. | p50/p95/p99 ms exit1 | exit2 | cloud |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in e["steps"] + [dict(e["overload"], offered_fps=f"{e['overload']['offered_fps']} (2x)")]:
        lat = s["latency_ms"]
        lines.append(f"| {s['offered_fps']} | {s['decided_fps']} | {s['decided']} | {s['shed_frames']} | {s['lost']} |"
                     f" {s['duplicates']} | {s['late']} | {_ms(lat['exit1'])} | {_ms(lat['exit2'])} | "
                     f"{_ms(lat['cloud'])} |")
    if figure:
        lines += ["", f"![edge capacity]({os.path.relpath(figure, page_dir)})"]
    prof = result["edge_profile"]
    lines += ["", f"Top 10 functions by own time in the edge process at {prof['offered_fps']} frames/s offered "
              "(cProfile):", "", "| function | own s | share | calls |", "|---|---:|---:|---:|"]
    lines += [f"| `{r['function']}` | {r['own_s']} | {r['share']:.1%} | {r['calls']} |" for r in prof["top10_own_time"]]
    lines += ["", "## End to end: cameras, edge and cloud as processes", "",
              f"Highest sustained paced rate: **{e2e['sustainable_fps']} frames/s**; at full speed "
              f"{e2e['full_speed']['throughput_fps']} frames/s.", "",
              "| fps asked | frames/s | lost | duplicates | incomplete | sustained |", "|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {s['fps']:.0f} | {s['throughput_fps']} | {s['lost']} | {s['duplicates']} | {s['incomplete']} | "
              f"{s['sustained']} |" for s in e2e["steps"]]
    lines += ["", "Capture-to-decision latency, ms (p50 / p95 / p99):", "",
              "| load | exit 1 | exit 2 | cloud |", "|---|---:|---:|---:|"]
    for share, rep in e2e["latency_at"].items():
        lat = rep["latency_ms"]
        lines.append(f"| {share} of sustainable ({rep['fps']:.0f} fps) | {_ms(lat['exit1'])} | {_ms(lat['exit2'])} | "
                     f"{_ms(lat['cloud'])} |")
    lines += ["", "## Scaling at full speed (on 2 cores this shows correctness and overhead more than speed)", "",
              "| aggregators | workers | frames/s | lost | duplicates |", "|---:|---:|---:|---:|---:|"]
    lines += [f"| {s['aggregators']} | {s['workers']} | {s['throughput_fps']} | {s['lost']} | {s['duplicates']} |"
              for s in result["scaling"]]
    if result.get("memory"):
        mem = result["memory"]
        lines += ["", f"## Memory over {mem['frames']} frames", "", "| process | RSS start MiB | RSS end MiB |",
                  "|---|---:|---:|"]
        lines += [f"| {name} | {mem['rss_mib_start'][name]} | {mem['rss_mib_end'][name]} |"
                  for name in mem["rss_mib_start"]]
    return "\n".join(lines) + "\n"


def write_page(result: dict, path: str, figure: str | None) -> str:
    """The page, keeping the sections other benchmark commands keep on it (between `<!-- NAME -->`
    and `<!-- /NAME -->` markers, e.g. `bench broker`'s)."""
    kept = ""
    try:
        with open(path) as f:
            old = f.read()
        kept = "".join(m.group(0) + "\n" for m in re.finditer(r"<!-- ([^/][^>]*?) -->.*?<!-- /\1 -->", old, re.S))
    except FileNotFoundError:
        pass
    page = render(result, figure, os.path.dirname(os.path.abspath(path)))
    return atomic_write_text(path, page.rstrip("\n") + ("\n\n" + kept if kept else "\n"))
