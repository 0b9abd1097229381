#!/usr/bin/env bash
# The GPU checks that issues 19 and 20 ask for, in one command on a machine with an NVIDIA GPU, sized to fit
# one 10-minute command on the lent machine: the CUDA tests (the compiled encoder with CUDA graphs, NVDEC's
# frames against the CPU's, FAISS on the GPUs where faiss-gpu is installed), the encoder's share of the
# matrix-multiply rate in bf16 eager and compiled, NVDEC's decoding cost against the CPU decoders', and EVL's
# bf16 training step.
#
# Usage: bench/gpu_checks.sh [OUT_DIR]   (logs and a summary under OUT_DIR, default $OUT or /tmp/gpu-checks)
#
# It needs the project's Python packages importable; on the lent H200, whose image has torch, transformers,
# pyarrow and pytest but neither a registry nor PyAV, decord and FAISS, carry their wheels in (see
# bench/RESULTS.md, "Running the GPU checks on the lent machine").
set -u
out=${1:-${OUT:-/tmp/gpu-checks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

check() {  # check NAME SECONDS COMMAND...: runs COMMAND under a time limit, its log in $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - started)) s: $*" | tee -a "$out/summary.txt"
    tail -n 20 "$out/$name.log" | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/summary.txt"
python3 -c "import torch, av; print('torch', torch.__version__, 'PyAV', av.__version__)" | tee -a "$out/summary.txt"
# the limits add up to 530 s, under one command's 600 (the run's own start and the summary's lines aside)
check cuda-tests 140 python3 -m pytest -q -p no:cacheprovider -rs \
    tests/unit/test_encode_write.py tests/unit/test_decode.py tests/unit/test_index.py tests/e2e/test_train.py \
    -k "cuda or nvdec or gpus"
check encoder 170 python3 bench/encoder.py --preset xclip-base-patch32 --batch 32 --dtype bfloat16 --compile
# 12 clips: rendering them takes ~4.5 s each on one thread, before any decoding; outside OUT_DIR, whose files
# come back from the lent machine (a run cut short would leave them there)
check decode 100 python3 bench/decode.py --videos 12 --nvdec --workdir /tmp/gpu-checks-clips
check train 120 python3 bench/train_efficiency.py --device cuda --dtype bf16 --batch 8 --steps 3
rm -rf /tmp/gpu-checks-clips
