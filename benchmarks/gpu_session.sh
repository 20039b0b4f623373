#!/usr/bin/env bash
# Everything this project measures on a lent GPU, as one command of about 9 minutes (run from the repository root):
#
#     bash benchmarks/gpu_session.sh "$OUT"      # writes accelerator_checks.json, results_cuda.json and logs there
#
# First the correctness checks of every attention path on the GPU (benchmarks/check_accelerator.py), then the
# benchmark with its high-resolution and flex-attention rows (benchmarks/bench_speed.py). This package needs
# transformers >= 5.24: where the machine has an older one, carry the wheel as .whl/ (on the machine with pip:
# `pip download --no-deps transformers==5.24.0 -d .whl`, with `/.whl/` in .git/info/exclude); it is installed into
# /tmp/site, ahead of the machine's own packages.
set -uo pipefail
out=${1:-benchmarks}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
timeout 270 python3 benchmarks/check_accelerator.py --json "$out/accelerator_checks.json" > "$out/checks.log" 2>&1
echo "checks: exit status $?"
grep -v '^{' "$out/checks.log" | tail -60
timeout 270 python3 benchmarks/bench_speed.py --high-res --repeats 20 --json "$out/results_cuda.json" 2>&1 \
    | tee "$out/bench.log"
