"""Train the release pair and the max-fusion pair side by side on one GPU, within a time limit.

Starts the runs (four, or the concat pair with PAIRS=concat) with the paper's 180 epochs, watches
their per-epoch seconds, and when they would not finish by the deadline, stops them and starts
them again with the number of epochs that fits (the compile cache is warm by then). A run that fails before its first epoch with
--compile is started again without it. Leaves tars of the results in $OUT.
"""
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

T0 = time.time()
LIMIT = float(os.environ.get("LIMIT", "560"))  # seconds this script may take in all
TAIL = 60.0  # after the last epoch: the card's metrics (val + test, thresholds), writing, tars
RESTART = 45.0  # a restart's start-up: imports, data to the GPU, compile from the warm cache
CAP = int(os.environ.get("CAP", "180"))  # the paper's epochs
EXTRA = os.environ.get("EXTRA", "").split()  # smoke tests: --limit-train 400 ...
OUT = os.environ.get("OUT", "/tmp/out")
FOLDER = os.environ.get("FOLDER", "runs/gpu")
RUNS = [("ada", "concat", FOLDER), ("ddnn", "concat", FOLDER), ("ada", "max", f"{FOLDER}/max"),
        ("ddnn", "max", f"{FOLDER}/max")]
if os.environ.get("PAIRS") == "concat":
    RUNS = RUNS[:2]
INIT = os.environ.get("INIT")  # a folder holding ada.safetensors and ddnn.safetensors to start from
RECIPE = ["--wire-dtype", "int2", "--distill", "1.0", "--distill-temperature", "3", "--threads", "3", "--no-progress"]


def say(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def history(out):
    try:
        with open(out.replace(".safetensors", ".history.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return []


def start(epochs, compile_):
    procs = []
    for mode, fusion, folder in RUNS:
        os.makedirs(folder, exist_ok=True)
        out = f"{folder}/{mode}.safetensors"
        for p in (out, out.replace(".safetensors", ".history.json"), out.replace(".safetensors", ".state.safetensors")):
            if os.path.exists(p):
                os.remove(p)
        cmd = [sys.executable, "-m", "pipeline.orchestration.cli", "train", "--mode", mode, "--fusion", fusion,
               *RECIPE, "--compile" if compile_ else "--no-compile", "--epochs", str(epochs), "--out", out, *EXTRA,
               *(["--init", f"{INIT}/{mode}.safetensors"] if INIT else [])]
        logf = open(f"/tmp/logs/{mode}-{fusion}-e{epochs}{'c' if compile_ else ''}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True), out, logf))
    say(f"started {len(procs)} runs: {epochs} epochs, compile {compile_}")
    return procs


def stop(procs):
    for p, _, _ in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    for p, _, logf in procs:
        p.wait()
        logf.close()


def main():
    os.makedirs("/tmp/logs", exist_ok=True)
    os.makedirs(OUT, exist_ok=True)
    deadline = T0 + LIMIT - TAIL
    epochs, compile_, starts = CAP, os.environ.get("COMPILE", "1") == "1", 0
    procs = start(epochs, compile_)
    starts += 1
    decided = False
    last_smi = 0.0
    while True:
        time.sleep(2)
        now = time.time()
        codes = [p.poll() for p, _, _ in procs]
        hists = [history(out) for _, out, _ in procs]
        if now - last_smi > 60:
            last_smi = now
            try:
                smi = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10).stdout.strip()
            except (OSError, subprocess.SubprocessError) as e:
                smi = str(e)
            say("epochs done", [len(h) for h in hists], "gpu", smi)
        if all(c == 0 for c in codes):
            say(f"all {len(procs)} finished")
            break
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        if failed:
            i = failed[0]
            say(f"run {RUNS[i]} exited {codes[i]} after {len(hists[i])} epochs; its log:")
            with open(procs[i][2].name) as f:
                print(f.read()[-3000:], flush=True)
            stop(procs)
            if compile_ and not hists[i] and starts < 3:
                compile_ = False
                procs = start(CAP, compile_)
                starts += 1
                decided = False
                continue
            sys.exit(1)
        if not decided and all(len(h) >= 3 for h in hists):
            per_epoch = max(max(e["seconds"] for e in h[1:]) for h in hists)
            done = min(len(h) for h in hists)
            finish = now + (epochs - done) * per_epoch
            say(f"{per_epoch:.2f} s per epoch (slowest of the runs, epochs 2..), finish projected at "
                f"{finish - T0:.0f}s against a deadline of {deadline - T0:.0f}s")
            if finish <= deadline:
                decided = True
            elif starts < 3:
                stop(procs)
                fit = int((deadline - time.time() - RESTART) / (per_epoch * 1.05))
                if fit < 10:
                    say(f"only {fit} epochs would fit: giving up")
                    sys.exit(1)
                epochs = min(CAP, fit)
                procs = start(epochs, compile_)
                starts += 1
        if now > T0 + LIMIT - 15:
            say("out of time: stopping the runs")
            stop(procs)
            break
    for p, _, logf in procs:
        logf.close()
    for name, folder in (("concat", FOLDER), ("max", f"{FOLDER}/max")):
        if not os.path.isdir(folder):
            continue
        with tarfile.open(f"{OUT}/{name}.tar", "w") as t:
            for f in sorted(os.listdir(folder)):
                path = os.path.join(folder, f)
                if os.path.isfile(path) and (".state." not in f or not os.path.exists(path.split(".state")[0] + ".safetensors")):
                    t.add(path)
    with tarfile.open(f"{OUT}/logs.tar", "w") as t:
        t.add("/tmp/logs", arcname="logs")
    say("results in", os.listdir(OUT))


if __name__ == "__main__":
    main()
