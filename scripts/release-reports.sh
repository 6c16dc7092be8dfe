#!/usr/bin/env bash
# The release evaluation and replay reports, from the release checkpoints in models/: what
# docs/RESULTS.md, reports/release/, reports/link/ and the README's results table are made of.
#
#   bash scripts/release-reports.sh            # everything (about 40 minutes on 2 cores)
#   bash scripts/release-reports.sh evaluate   # only the offline evaluation and docs/RESULTS.md
#   bash scripts/release-reports.sh page       # docs/RESULTS.md again from those reports, measuring nothing
#   bash scripts/release-reports.sh replays    # only the replays (the latency runs included)
#   bash scripts/release-reports.sh latency    # only the 30 fps latency replays (about 10 minutes;
#                                               # ROUNDS=4 for four lazy/eager pairs instead of two)
#   LATENCY=0 bash scripts/release-reports.sh replays   # the replays without the latency runs
#
# Every replay runs each role as a process with embedded Mosquitto and Redis (as `make replay`).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
ADA=${ADA:-models/ada.safetensors}
DDNN=${DDNN:-models/ddnn.safetensors}
what=${1:-all}
case $what in
  all|evaluate|page|replays|latency) ;;
  *) echo "usage: $0 [all|evaluate|page|replays|latency]" >&2; exit 2 ;;
esac

run() { echo "+ $*" >&2; "$@"; }

# The paper's comparison: the same recipe and budget with max fusion (DDNN's aggregation) and with concat
# (the release's first stage, e35/), rows of the page's tables;
# and both release checkpoints fine-tuned for 1-bit codes, pooled with them in the bytes comparison.
ALSO=()
for m in e35/ada e35/ddnn max/ada max/ddnn int1/ada int1/ddnn; do [[ -f models/$m.safetensors ]] && ALSO+=("models/$m.safetensors"); done

if [[ $what == all || $what == evaluate || $what == page ]]; then
  FROM=(); [[ $what == page ]] && FROM=(--from-reports)
  run "$BIN/ada-ddnn" evaluate --checkpoint "$ADA" --baseline "$DDNN" ${ALSO[@]+--also "${ALSO[@]}"} \
    --out reports/release/ --results docs/RESULTS.md ${FROM[@]+"${FROM[@]}"}
fi

R=("$BIN/ada-ddnn" replay --no-progress)
if [[ $what == all || $what == replays ]]; then
  # The main job as `make replay` runs it (lazy upload, the trained wire code), and with two
  # aggregators and two workers.
  run "${R[@]}" --n 0 --checkpoint "$ADA" --json reports/release/replay.json
  run "${R[@]}" --n 0 --checkpoint "$ADA" --aggregators 2 --workers 2 --json reports/release/replay_2x2.json
  # The camera link: eager against lazy, every summary awaited (evaluate's exit mix exactly),
  # DDNN (eager by necessity), and latency at 30 fps.
  run "${R[@]}" --n 0 --checkpoint "$ADA" --upload eager --json reports/link/r10k_eager.json
  run "${R[@]}" --n 0 --checkpoint "$ADA" --site eval --deadline-ms 200 --no-early-exit1 \
    --json reports/link/r10k_agree.json
  run "${R[@]}" --n 0 --checkpoint "$ADA" --wire-dtype int1 --json reports/link/r10k_lazy_int1.json
  run "${R[@]}" --n 0 --checkpoint "$DDNN" --json reports/link/r10k_ddnn.json
  # The 1-bit pair (models/int1/): ADA-DDNN with every summary awaited (evaluate's exit mix), and DDNN.
  run "${R[@]}" --n 0 --checkpoint models/int1/ada.safetensors --site eval --deadline-ms 200 --no-early-exit1 \
    --json reports/link/r10k_int1_ada_agree.json
  run "${R[@]}" --n 0 --checkpoint models/int1/ddnn.safetensors --site eval --json reports/link/r10k_int1_ddnn.json
  # ADA-DDNN's choices at DDNN's two bit-width steps in docs/RESULTS.md ("at equal overall accuracy"),
  # every summary awaited with a 1 s deadline (evaluate's exit mix): 1-bit codes at T1 0.020 / T2 0.200, 2-bit
  # at 0.005 / 0.175.
  run "${R[@]}" --n 0 --checkpoint "$ADA" --site eval --deadline-ms 1000 --no-early-exit1 --wire-dtype int1 \
    --t1 0.02 --t2 0.2 --json reports/link/r10k_equal_int1.json
  run "${R[@]}" --n 0 --checkpoint "$ADA" --site eval --deadline-ms 1000 --no-early-exit1 --wire-dtype int2 \
    --t1 0.005 --t2 0.175 --json reports/link/r10k_equal_int2.json
  # and DDNN's two steps themselves (site eval as above; its bytes do not depend on T2).
  run "${R[@]}" --n 0 --checkpoint models/int1/ddnn.safetensors --site eval --deadline-ms 1000 --t2 0.2 \
    --json reports/link/r10k_equal_ddnn_int1.json
  run "${R[@]}" --n 0 --checkpoint "$DDNN" --site eval --deadline-ms 1000 --t2 0.15 \
    --json reports/link/r10k_equal_ddnn_int2.json
fi

if [[ $what == latency || ( ( $what == all || $what == replays ) && ${LATENCY:-1} != 0 ) ]]; then
  # Latency: 3,000 frames at 30 fps, lazy and eager alternating, ROUNDS times (default 2; on an
  # otherwise idle machine: each run takes about 2 minutes).
  rounds=("")
  for ((i = 2; i <= ${ROUNDS:-2}; i++)); do rounds+=("_round$i"); done
  for round in "${rounds[@]}"; do
    lazy=reports/link/f30_lazy$round.json
    [[ -z $round ]] && lazy=reports/release/replay_fps30.json
    run "${R[@]}" --n 3000 --fps 30 --checkpoint "$ADA" --json "$lazy"
    run "${R[@]}" --n 3000 --fps 30 --checkpoint "$ADA" --upload eager --json "reports/link/f30_eager$round.json"
  done
  run "${R[@]}" --n 3000 --fps 30 --checkpoint "$ADA" --no-early-exit1 --json reports/link/f30_lazy_noearly.json
fi
