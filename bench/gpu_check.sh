#!/usr/bin/env bash
# The GPU checks in one prepared run, for a session that is lent a GPU machine (issue #26):
# the CUDA tests, bench/gpu.py on ctx2048 and ctx8192, and 3 minutes of
# `accelerate launch train.py --preset ctx2048` in bf16 with its tokens/s and peak memory.
# About 10 minutes on an H100/H200.
#
# Here (with the network), once per session, from the repository root:
#     bash bench/gpu_check.sh prepare
# fetches the Python 3.12 wheels the GPU image lacks into .whl/ and preps piano-midi.de
# into data-gpu/ (about 5 MB), both git-ignored. Then on the GPU machine, carrying both:
#     run(command="bash bench/gpu_check.sh", carry=[".whl", "data-gpu"], timeout_s=720)
# Each step's output goes to $OUT/<step>.log (the device tool brings $OUT back) and a
# summary of exit codes to $OUT/summary.txt. A step that fails or runs over its limit is
# reported and the next one runs. MINUTES=1 bash bench/gpu_check.sh trains 1 minute.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
    set -e
    grep -qx "/data-gpu/" .git/info/exclude 2>/dev/null || echo "/data-gpu/" >> .git/info/exclude
    rm -rf .whl && mkdir -p .whl
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        perceiver-ar-pytorch==0.0.10 pretty_midi mido "symusic>=0.5,<0.7" pySmartDL \
        platformdirs importlib_resources
    python3 prep.py --input ../shared/data/piano-midi-de --output data-gpu
    du -sh .whl data-gpu
    exit 0
fi

out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
: > "$out/summary.txt"

step() {  # step NAME SECONDS COMMAND...: run it under a time limit, log it, note its exit
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local code=$?
    tail -n 25 "$out/$name.log"
    echo "$name: exit $code$([ $code = 124 ] && echo ' (over its limit)')" | tee -a "$out/summary.txt"
}

rm -rf /tmp/run-ctx2048
nvidia-smi -L | tee -a "$out/summary.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee -a "$out/summary.txt"
step cuda-tests 180 python3 -m pytest -p no:cacheprovider -n 0 -q -rs -k cuda \
    tests/test_engine.py tests/test_model.py
step bench-ctx2048 120 python3 -m bench.gpu --preset ctx2048
step bench-ctx8192 150 python3 -m bench.gpu --preset ctx8192
# Peak memory of the training run, from nvidia-smi every half second beside it.
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$out/memory.csv" &
watcher=$!
step train-ctx2048 300 accelerate launch --num_processes 1 train.py --preset ctx2048 \
    --data_dir data-gpu --out_dir /tmp/run-ctx2048 --max_minutes "${MINUTES:-3}" --eval_interval 100 \
    --save_interval 1000
kill "$watcher" 2>/dev/null
cp /tmp/run-ctx2048/metrics.csv "$out/train-metrics.csv" 2>/dev/null
echo "train-ctx2048: peak memory $(sort -n "$out/memory.csv" | tail -n 1) MiB (nvidia-smi)" \
    | tee -a "$out/summary.txt"
cat "$out/summary.txt"
