#!/usr/bin/env bash
# Everything this project checks on a lent GPU machine, in one call (a lease is short and each start costs minutes):
# the environment, the Triton kernel tests on CUDA, the ULD benchmark grid, the loss and trainer tests on CUDA.
#
#   STEPS="env kernels bench" bash benchmarks/gpu_run.sh          # $OUT holds the logs and uld.csv afterwards
#
# The device image has torch, triton, pytest and hypothesis but not pydantic (the trainer's config): carry wheels in
# .whl (see /work/.library/device/README.md) and they are installed under /tmp/site first.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
STEPS=${STEPS:-"env kernels bench train"}
BENCH_N=${BENCH_N:-1024,4096,8192}
BENCH_V=${BENCH_V:-32768,151936}
BENCH_PROVIDERS=${BENCH_PROVIDERS:-gold,reference,triton,linear_reference,fused_linear,linear_reference_ce,fused_linear_ce}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# the kernels must compile for the real device: never let an inherited TRITON_INTERPRET turn them into the interpreter
unset TRITON_INTERPRET

for step in $STEPS; do
    case $step in
    env)
        { nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__,
torch.cuda.get_device_name(0))"; nproc; } 2>&1 | tee "$OUT/env.txt"
        ;;
    kernels)
        timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -v -n 8 -rfE --tb=short --timeout 120 --timeout-method thread \
            -p no:cacheprovider tests/kernels 2>&1 | tee "$OUT/tests_kernels.log"
        ;;
    bench)
        timeout 540 python3 benchmarks/bench_uld.py --csv "$OUT/uld.csv" --n "$BENCH_N" --v "$BENCH_V" \
            --providers "$BENCH_PROVIDERS" --dtype bfloat16 --note "GPU run (benchmarks/gpu_run.sh); bf16 logits" \
            2>&1 | tee "$OUT/bench_uld.log"
        ;;
    train)
        timeout 420 python3 -m pytest -q -n 4 -p no:cacheprovider tests/fusion_cache/test_losses.py \
            tests/fusion_cache/test_train.py tests/fusion_cache/test_objective.py 2>&1 | tee "$OUT/tests_train.log"
        ;;
    *)
        echo "unknown step $step" >&2
        ;;
    esac
done
