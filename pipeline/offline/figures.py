"""The evaluation figures (matplotlib PNG, drawn without pyplot so no GUI backend is ever touched).

    loss.png              training loss per epoch, edge vs cloud, both modes (the paper's Fig. 3)
    accuracy_epochs.png   validation accuracy per epoch, final test accuracy marked (Fig. 4)
    missing_one.png       accuracy with one camera missing, each camera in turn (Fig. 5)
    missing_n.png         accuracy with n cameras missing at random, mean +- std (Fig. 6)
    tradeoff.png          overall accuracy vs edge-exit rate over the T1 x T2 sweep, Pareto front
    bytes_pareto.png      overall accuracy vs bytes per camera per frame over wire dtypes and thresholds

Each function takes the evaluation entries (`report`, `optimistic`, `history` per checkpoint) and
returns the path written, or None when no entry has what it needs.
"""

from __future__ import annotations

import logging
import math
import os

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

log = logging.getLogger(__name__)

COLORS = {"ada": "tab:blue", "ddnn": "tab:orange"}
NAMES = {"ada": "ADA-DDNN", "ddnn": "DDNN"}
DPI = 120  # pixels per inch of the saved PNGs


def label(entry: dict, entries: list[dict]) -> str:
    """ADA-DDNN / DDNN; checkpoints of the same mode are told apart by their fusion, by the
    codes they were trained for and by their epochs, where those differ ("ADA-DDNN, max fusion",
    "DDNN, concat fusion, trained for int1", "DDNN, 35 epochs"), else a second one as the baseline."""
    mode = entry["report"]["mode"]
    name = NAMES.get(mode, mode)
    same = [e for e in entries if e["report"]["mode"] == mode]
    if len(same) == 1:
        return name
    parts = [name]
    keys = (("fusion", "{} fusion"), ("trained_wire_dtype", "trained for {}"), ("epochs_total", "{} epochs"))
    for key, text in keys:
        if len({e["report"].get(key) for e in same}) > 1:
            value = entry["report"].get(key)
            parts.append("1 epoch" if key == "epochs_total" and value == 1 else text.format(value))
    twins = [e for e in same if all(e["report"].get(k) == entry["report"].get(k) for k, _ in keys)]
    return ", ".join(parts) + ("" if twins[0] is entry else " (baseline)")


def _color(entry: dict, entries: list[dict]) -> str:
    if sum(e["report"]["mode"] == entry["report"]["mode"] for e in entries) > 1:
        return f"C{entries.index(entry)}"
    return COLORS.get(entry["report"]["mode"], f"C{entries.index(entry)}")


def _nan(x: float | None) -> float:
    return math.nan if x is None else 100.0 * x


def _save(fig: Figure, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_loss(entries: list[dict], path: str) -> str | None:
    with_history = [e for e in entries if e.get("history")]
    if not with_history:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for e in with_history:
        epochs = [h["epoch"] for h in e["history"]]
        c, name = _color(e, entries), label(e, entries)
        ax.plot(epochs, [h["train_loss_edge"] for h in e["history"]], color=c, ls="-", marker=".", label=f"{name} edge")
        ax.plot(epochs, [h["train_loss_cloud"] for h in e["history"]], color=c, ls="--", marker=".", label=f"{name} cloud")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training cross-entropy")
    ax.set_title("Training loss per epoch: edge vs cloud")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_accuracy_epochs(entries: list[dict], path: str) -> str | None:
    with_history = [e for e in entries if e.get("history")]
    if not with_history:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for e in with_history:
        hist = e["history"]
        epochs = [h["epoch"] for h in hist]
        c, name = _color(e, entries), label(e, entries)
        ax.plot(epochs, [_nan(h["val"]["edge_all"]) for h in hist], color=c, ls="-", marker=".", label=f"{name} edge (val)")
        ax.plot(epochs, [_nan(h["val"]["cloud_all"]) for h in hist], color=c, ls="--", marker=".", label=f"{name} cloud (val)")
        acc = e["report"]["accuracy"]
        ax.plot([epochs[-1]], [_nan(acc["edge_all"])], color=c, marker="o", ls="none", label=f"{name} edge (test, final)")
        ax.plot([epochs[-1]], [_nan(acc["cloud_all"])], color=c, marker="s", ls="none", label=f"{name} cloud (test, final)")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("accuracy on every frame (%)")
    ax.set_title("Accuracy per epoch (training never sees the test split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_missing_one(entries: list[dict], path: str) -> str | None:
    fig = Figure(figsize=(4.2 * len(entries) + 1.0, 4.0))
    axes = fig.subplots(1, len(entries), sharey=True, squeeze=False)[0]
    width = 0.27
    for ax, e in zip(axes, entries):
        rows = e["report"]["missing_one"]
        xs = [r["camera"] for r in rows]
        for j, (key, hatch) in enumerate((("edge", ""), ("cloud", "//"), ("overall", ".."))):
            ax.bar([x + (j - 1) * width for x in xs], [_nan(r[key]) for r in rows], width, hatch=hatch,
                   color=_color(e, entries), alpha=0.45 + 0.25 * j, label=key)
        ax.axhline(_nan(e["report"]["accuracy"]["overall"]), color="k", ls=":", label="overall, none missing")
        ax.set_xticks(xs)
        ax.set_xlabel("missing camera")
        ax.set_title(label(e, entries))
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize="small", loc="lower left")
    fig.suptitle("One camera missing (thresholds chosen with all cameras)")
    return _save(fig, path)


def plot_missing_n(entries: list[dict], path: str) -> str | None:
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    for e in entries:
        rows = e["report"]["missing_n"]
        ns = [r["n"] for r in rows]
        c, name = _color(e, entries), label(e, entries)
        ax.errorbar(ns, [_nan(r["overall_mean"]) for r in rows], yerr=[100.0 * r["overall_std"] for r in rows],
                    color=c, marker="o", capsize=3, label=f"{name} overall")
        ax.plot(ns, [_nan(r["edge_mean"]) for r in rows], color=c, ls="--", marker=".", label=f"{name} edge")
        ax.plot(ns, [_nan(r["cloud_mean"]) for r in rows], color=c, ls=":", marker=".", label=f"{name} cloud")
    ax.set_xlabel("cameras missing (random sets)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("n cameras missing: mean over draws, +- std")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_tradeoff(entries: list[dict], path: str) -> str | None:
    fig = Figure(figsize=(6.4, 4.6))
    ax = fig.add_subplot()
    for e in entries:
        r = e["report"]
        c, name = _color(e, entries), label(e, entries)
        pts, front = r["sweep"]["points"], r["sweep"]["pareto"]
        ax.scatter([100 * p["edge_rate"] for p in pts], [100 * p["overall"] for p in pts], s=6, color=c, alpha=0.15)
        ax.plot([100 * p["edge_rate"] for p in front], [100 * p["overall"] for p in front], color=c,
                drawstyle="steps-post", label=f"{name} Pareto front (test sweep)")
        er = r["exit_rate"]
        ax.plot([100 * (er["exit1"] + er["exit2"])], [100 * r["accuracy"]["overall"]], color=c, marker="*",
                ms=14, mec="k", ls="none", label=f"{name} thresholds from validation")
        o = e.get("optimistic")
        if o:
            oer = o["exit_rate"]
            ax.plot([100 * (oer["exit1"] + oer["exit2"])], [100 * o["accuracy"]["overall"]], color=c, marker="x",
                    ms=9, ls="none", label=f"{name} searched on test (optimistic)")
    ax.set_xlabel("frames leaving at the edge, exit 1 + exit 2 (%)")
    ax.set_ylabel("overall accuracy (%)")
    ax.set_title("Accuracy vs edge-exit rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_bytes_pareto(entries: list[dict], path: str) -> str | None:
    """Overall accuracy vs bytes per camera per frame: each checkpoint's front over every wire dtype
    and (T1, T2) on the test split, per upload, and its thresholds from validation per dtype."""
    with_link = [e for e in entries if e["report"].get("link")]
    if not with_link:
        return None
    fig = Figure(figsize=(7.2, 4.8))
    ax = fig.add_subplot()
    styles = {"lazy": "-", "eager": ":"}
    for e in with_link:
        link, c, name = e["report"]["link"], _color(e, entries), label(e, entries)
        for upload, front in link["pareto"].items():
            ax.plot([p["bytes"] for p in front], [100 * p["overall"] for p in front], color=c, ls=styles[upload],
                    drawstyle="steps-post", label=f"{name}, {upload} upload: front over dtypes and thresholds")
            rows = link["dtypes"]
            xs = [r["bytes_per_camera_frame"][upload]["all"] for r in rows]
            ys = [100 * r["accuracy"]["overall"] for r in rows]
            ax.plot(xs, ys, color=c, marker="o" if upload == "lazy" else "s", ms=5, ls="none", mfc="white",
                    label=f"{name}, {upload}: each dtype, thresholds from validation")
            if upload == link["default_upload"]:
                for r, x, y in zip(rows, xs, ys):
                    ax.annotate(r["wire_dtype"], (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7,
                                color=c)
    ref = with_link[0]["report"]["link"]["reference"]
    ax.axhline(100 * ref["overall"] - 0.5, color="grey", lw=0.8, ls="--")
    ax.axvline(256, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_xlabel("bytes per camera per frame, every message counted (log scale)")
    ax.set_ylabel("overall accuracy, test (%)")
    ax.set_title("Accuracy vs bytes on the camera link", fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="x-small", loc="lower right")
    return _save(fig, path)


FIGURES = {
    "loss": plot_loss,
    "accuracy_epochs": plot_accuracy_epochs,
    "missing_one": plot_missing_one,
    "missing_n": plot_missing_n,
    "tradeoff": plot_tradeoff,
    "bytes_pareto": plot_bytes_pareto,
}


def write_figures(entries: list[dict], folder: str) -> dict[str, str]:
    """Every figure into `folder`; {name: path} for those that were drawn."""
    out = {}
    for name, plot in FIGURES.items():
        path = plot(entries, os.path.join(folder, f"{name}.png"))
        if path:
            out[name] = path
        else:
            log.warning("figure %s skipped: no checkpoint has what it draws (a training history, link numbers)", name)
    return out
