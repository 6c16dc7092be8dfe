#!/usr/bin/env bash
# Packs what a GPU machine lent through the `device` tool needs to train the release checkpoints
# (scripts/gpu/README.md): .gpu/ in the repository root, ignored by git, named in `carry`.
#
#   bash scripts/gpu/pack.sh          # then, with the tool: run "export OUT; bash .gpu/run.sh 2>&1 | tee $OUT/run.log"
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${SHARED:-../shared/datasets/cifar10}
PY=${PY:-.venv/bin/python}
[[ -z $(git status --porcelain --untracked-files=no) ]] || { echo "commit first: the cards name the commit sent" >&2; exit 1; }
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl
git rev-parse HEAD > .gpu/COMMIT
cp scripts/gpu/run.sh scripts/gpu/driver.py scripts/gpu/materialize_parallel.py "$SHARED/materialize.py" .gpu/
# The JPEGs in one solid xz archive: 18.5 MB against the zip's 62 MB (each JPEG repeats its tables).
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
unzip -q "$SHARED/cifar10-jpeg.zip" -d "$tmp"
(cd "$tmp" && tar cf - train test | xz -9e -T2) > .gpu/cifar.tar.xz
# The image there has torch, numpy, msgpack, safetensors, tqdm, matplotlib, prometheus-client; not these.
for pkg in paho-mqtt redis; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d .gpu/whl "$pkg==$("$PY" -m pip show "$pkg" | awk '/^Version/{print $2}')"
done
du -sh .gpu; echo "the tree that travels must stay under 64 MiB: see scripts/gpu/README.md"
