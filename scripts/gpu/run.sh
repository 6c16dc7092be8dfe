#!/bin/bash
# On the GPU machine, from the repository root (scripts/gpu/pack.sh put this in .gpu/): the wheels,
# CIFAR-10, then .gpu/driver.py. Env: BUDGET (seconds for all of it, default 570), and driver.py's.
set -u
export PYTHONUNBUFFERED=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/whl/*.whl || exit 1
export GIT_DIR=/nonexistent  # the copy's .git here is not the tree that was sent: cards take .gpu/COMMIT
export PYTHONPATH=/tmp/site:$PWD ADA_DDNN_DATA=/tmp/data ADA_DDNN_GIT_COMMIT=$(cat .gpu/COMMIT)
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
nproc; free -g | head -2
mkdir -p /tmp/src && tar xJf .gpu/cifar.tar.xz -C /tmp/src && python3 .gpu/materialize_parallel.py /tmp/src /tmp/data || exit 1
python3 -c "from pipeline.data import load_cifar10; print('data digest', load_cifar10('/tmp/data').digest)" 2>&1 | tail -1
echo "set-up took $(( $(date +%s) - t0 )) s"
LIMIT=$(( ${BUDGET:-570} - ($(date +%s) - t0) )) python3 .gpu/driver.py
