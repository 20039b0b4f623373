#!/usr/bin/env bash
# Everything this project measures on a lent GPU, as one command of at most about 9 minutes (run from the repository
# root):
#
#     bash benchmarks/gpu_session.sh "$OUT"      # writes the JSON results and logs there
#
# 1. Correctness of every attention backend on the GPU against float64 eager on CPU (benchmarks/check_accelerator.py,
#    accelerator_checks.json), the Triton kernel (`cuda_triton`) included.
# 2. The Triton kernel alone against sdpa without a bias and with the bias as a mask, after its own check against
#    float32 eager (benchmarks/bench_triton.py, triton.json).
# 3. The model rows of the targets (bench_speed.py's CUDA_CASES, bfloat16 autocast) with the automatic choice
#    (results_cuda.json: `cuda_triton`, where its check passes on the device) and with `cuda_chunked` forced
#    (results_cuda_chunked.json): whether `cuda_triton` replaces `cuda_chunked` is read from these two.
#
# This package needs transformers >= 5.24: where the machine has an older one, carry the wheel as .whl/ (on the
# machine with pip: `pip download --no-deps transformers==5.24.0 -d .whl`, with `/.whl/` in .git/info/exclude); it is
# installed into /tmp/site, ahead of the machine's own packages.
set -uo pipefail
out=${1:-benchmarks}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 150 python3 benchmarks/check_accelerator.py --json "$out/accelerator_checks.json" > "$out/checks.log" 2>&1
echo "checks: exit status $?"
grep -v '^{' "$out/checks.log" | tail -40
timeout 120 python3 benchmarks/bench_triton.py --json "$out/triton.json" 2>&1 | tee "$out/triton.log"
echo "bench_triton: exit status ${PIPESTATUS[0]}"
timeout 150 python3 benchmarks/bench_speed.py --repeats 20 --json "$out/results_cuda.json" 2>&1 | tee "$out/bench.log"
timeout 110 python3 benchmarks/bench_speed.py --backend cuda_chunked --repeats 20 \
    --json "$out/results_cuda_chunked.json" 2>&1 | tee "$out/bench_chunked.log"
