#!/usr/bin/env bash
# The GPU acceptance suite on a GPU machine without network access: the packages it lacks come as wheels in
# .whl/ (README, Development, lists them), installed into /tmp/site ahead of the machine's own packages.
#   bash tests/gpu/device.sh RESULT.json [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/../.."
result=${1:?usage: device.sh RESULT.json [pytest args...]}
shift
rm -rf /tmp/site  # a warm machine keeps the last run's packages: start from exactly what was carried
if compgen -G ".whl/*/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
export QWEN2VL_GPU_CHECKPOINT=${QWEN2VL_GPU_CHECKPOINT:-/tmp/qwen2vl-gpu-checkpoint} QWEN2VL_GPU_RESULT=$result
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest tests/gpu -q -p no:cacheprovider -o addopts="" -rfE "$@"
