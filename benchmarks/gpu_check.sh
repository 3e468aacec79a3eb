#!/usr/bin/env bash
# On a CUDA machine: build the extension, run the whole test suite (CUDA cases included) and the op
# benchmarks at V = 151936, the decode benchmark and the compiled (static cache + CUDA graphs) decode
# benchmark, and print short tables. The first parts took under 8 minutes on one H100/H200; the compiled
# decode benchmark (added since, never run on a GPU yet) adds its compiles: give it the rest of 10 minutes.
#   bash benchmarks/gpu_check.sh            # writes benchmarks/results/ops-cuda.json
set -euo pipefail
cd "$(dirname "$0")/.."
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
echo "== build ($(date +%T))"
$PY -m pip install --no-build-isolation --no-deps -e . > /tmp/svd_fast_build.log 2>&1 || { tail -40 /tmp/svd_fast_build.log; exit 1; }
$PY -c "import svd_fast, torch; assert svd_fast.has_cuda_kernels(); print('CUDA kernels built; torch', torch.__version__)"

echo "== tests ($(date +%T))"
SVD_FAST_REQUIRE_CUDA_KERNELS=1 $PY -m pytest -q -p no:cacheprovider tests 2>&1 | tail -15

echo "== benchmarks ($(date +%T))"
mkdir -p benchmarks/results
$PY -m pytest -q -p no:cacheprovider benchmarks/bench_ops.py -k "151936 or token_mu or steering_vector" \
  --benchmark-min-rounds=20 --benchmark-max-time=0.2 --benchmark-json=benchmarks/results/ops-cuda.json \
  > /tmp/svd_fast_bench.log 2>&1 || { tail -40 /tmp/svd_fast_bench.log; exit 1; }
$PY benchmarks/report.py benchmarks/results/ops-cuda.json
$PY -m pytest -q -p no:cacheprovider benchmarks/bench_decode.py -k "not (dora or loha or lokr or vera or oft or adalora)" \
  --benchmark-json=benchmarks/results/decode-cuda.json \
  > /tmp/svd_fast_decode.log 2>&1 || { tail -40 /tmp/svd_fast_decode.log; exit 1; }
$PY benchmarks/report_decode.py benchmarks/results/decode-cuda.json
# HF's fast mode: static cache + torch.compile, HF's default "reduce-overhead" (CUDA graphs); the compiles
# take most of this step's time. Needs transformers >= 5.10 on this machine (the bench says so otherwise).
(cd benchmarks && $PY -m pytest -q -p no:cacheprovider bench_compiled_decode.py \
  --benchmark-json=results/compiled-decode-cuda.json > /tmp/svd_fast_compiled.log 2>&1 \
  && $PY report_compiled_decode.py results/compiled-decode-cuda.json) || tail -30 /tmp/svd_fast_compiled.log
echo "== done ($(date +%T))"
