#!/usr/bin/env bash
# The GPU checks as one prepared command for the device machine (see /work/.library/device/README.md), run from
# the repository root with .whl/ carried (benchmarks/gpu/fetch_wheels.sh makes it):
#
#   run(command="bash benchmarks/gpu/run_checks.sh", carry=[".whl"], timeout_s=590)
#
# It installs the carried wheels and graphflow (no index, no network), then runs the CUDA tests and the benchmarks
# at 512x512 in fp16 on the tiny models, each under its own time limit, logging everything to $OUT/checks.log.
set -uo pipefail
OUT=${OUT:-/tmp/graphflow-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/checks.log") 2>&1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 GRAPHFLOW_TINY_MODELS=/tmp/tiny-models
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site || exit 1
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
      'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

step() {  # step SECONDS NAME COMMAND...: one check, cut off after SECONDS
    local seconds=$1 name=$2; shift 2
    echo; echo "=== $name"
    local started=$SECONDS
    timeout "$seconds" "$@"; echo "=== $name: exit $? in $((SECONDS - started)) s"
}

step 150 "CUDA tests" python3 -m pytest -q -p no:warnings -rs tests/nodes/test_sampler_gpu.py tests/nodes/test_compile.py \
    tests/nodes/test_quantize.py tests/graphflow/test_model_quantization.py tests/graphflow/test_model_manager.py
step 60 "sampler vs diffusers, 512 fp16" python3 benchmarks/sampler_vs_diffusers.py --size 512 --device cuda \
    --dtype fp16 --steps 20 --repeats 5
step 60 "VAE memory, 1024" python3 benchmarks/vae_memory.py --size 1024 --device cuda
step 60 "quantisation, 512" python3 benchmarks/quantize_memory.py --size 512 --device cuda
step 45 "ControlNet swapping, 512" python3 benchmarks/controlnet_swapping.py --size 512 --device cuda
step 60 "training, 512 fp16" python3 benchmarks/train_controlnet.py --resolution 512 --device cuda --mixed-precision fp16
echo; echo "done"
