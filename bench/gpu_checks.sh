#!/usr/bin/env bash
# The GPU checks that issues 19 and 20 ask for, in one command on a machine with an NVIDIA GPU, sized to fit
# one 10-minute command on the lent machine: the CUDA tests (the compiled encoder with CUDA graphs, NVDEC's
# frames against the CPU's, FAISS on the GPUs where faiss-gpu is installed), the encoder's share of the
# matrix-multiply rate in bf16 eager and compiled, NVDEC's decoding cost against the CPU decoders', the
# 1000-video job against its slowest stage (in the job's process where Ray is missing), and EVL's bf16
# training step.
#
# Usage: bench/gpu_checks.sh [OUT_DIR]   (logs and a summary under OUT_DIR, default $OUT or /tmp/gpu-checks)
#        CLIPS=DIR: the synthetic clips rendered there beforehand (`bench/decode.py --workdir DIR`, 24 at
#        640x360 and 6 at 1920x1080; `bench/pipeline.py`'s 100 at 640x360), kept; else rendered here (~4.5 s
#        a 640x360 clip on one thread) and removed
#
# It needs the project's Python packages importable; on the lent H200, whose image has torch, transformers,
# pyarrow and pytest but neither a registry nor PyAV, decord and FAISS, carry their wheels in (see
# bench/RESULTS.md, "Running the GPU checks on the lent machine").
set -u
out=${1:-${OUT:-/tmp/gpu-checks}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

check() {  # check NAME SECONDS COMMAND...: runs COMMAND under a time limit, its log added to $out/NAME.log
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS lines
    lines=$(cat "$out/$name.log" 2>/dev/null | wc -l)
    echo "== $*" >>"$out/$name.log"
    timeout "$limit" "$@" >>"$out/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc=$rc in $((SECONDS - started)) s: $*" | tee -a "$out/summary.txt"
    tail -n +$((lines + 2)) "$out/$name.log" | tail -n 20 | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/summary.txt"
python3 -c "import torch, av; print('torch', torch.__version__, 'PyAV', av.__version__)" | tee -a "$out/summary.txt"
# in order of what the issues ask most; the limits add up to 710 s, past one command's 600: the last ones
# (precision and EVL's bf16 step, issue 19's, whose figures matter least) run where the others end sooner. A
# run cut short still leaves every finished check's log; runs of one kind share a log (the lent machine sends
# back 8 files at most: here 6 logs and the summary)
clips=${CLIPS:-/tmp/gpu-checks-clips}  # outside OUT_DIR, whose files come back from the lent machine
check encoder 150 python3 bench/encoder.py --preset xclip-base-patch32 --batch 32 --dtype bfloat16 --compile
check decode 70 python3 bench/decode.py --videos 24 --nvdec --workdir "$clips"
check decode 50 python3 bench/decode.py --videos 6 --width 1920 --height 1080 --nvdec --workdir "$clips"
check cuda-tests 120 python3 -m pytest -q -p no:cacheprovider -rs \
    tests/unit/test_encode_write.py tests/unit/test_decode.py tests/unit/test_index.py tests/e2e/test_train.py \
    -k "cuda or nvdec or gpus"
# the pipeline's goal (>= 0.85 of its slowest stage) on 1000 videos; without Ray (the lent H200 has none),
# the job in its own process: decoder processes, one per CPU, beside the GPU encoder
ray=$(python3 -c "import ray" 2>/dev/null || echo --no-ray)
check pipeline 110 python3 bench/pipeline.py --videos 1000 --distinct 100 --stage-videos 100 $ray --workdir "$clips"
check encoder 90 python3 bench/encoder.py --preset xclip-base-patch32 --batch 128 --dtype bfloat16 --compile
check precision 50 python3 bench/precision.py --device cuda --videos 24 --workdir "$clips"
check train 70 python3 bench/train_efficiency.py --device cuda --dtype bf16 --batch 8 --steps 3
[ -n "${CLIPS:-}" ] || rm -rf "$clips"
