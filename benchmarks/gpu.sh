#!/usr/bin/env bash
# Heed on a CUDA GPU, in about 8 minutes on one H100, with nothing downloaded:
#   1. build the qwen2-0.5b workload (Qwen2-0.5B's shapes, random weights, a 151936-token BPE tokenizer)
#   2. heed rl (RLOO, 3 updates of 16 prompts x 4 full-length answers of 256 tokens) with the vLLM
#      engine, then the transformers (hf) engine: generated tokens/s, samples/s, peak GPU memory and
#      rollout/logprob_diff (vLLM's sampled-token log-probs against the trainer's)
#   3. heed sft with the base in 4-bit (QLoRA: bitsandbytes + peft), 10 steps
#   4. heed sft under accelerate launch with FSDP2 (configs/accelerate/fsdp.yaml, one process per GPU)
# and a summary table. A part whose package (vllm, bitsandbytes, peft) is missing is skipped with the
# reason. Exits 1 when a part failed; each part's log is in the work folder.
#
#   bash benchmarks/gpu.sh                      # work folder: a new temporary one
#   HEED_GPU_BENCH_DIR=/tmp/gb bash benchmarks/gpu.sh   # reuse a folder (the built model is kept)
#   PYTHON=/path/to/python bash benchmarks/gpu.sh       # default: .venv/bin/python if present, else python3
set -u
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "no CUDA GPU: nothing to measure"
    exit 0
fi
if ! cuda=$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null); then
    echo "error: $PYTHON cannot import torch; set PYTHON to the Python that Heed is installed in" >&2
    exit 2
fi
if [ "$cuda" != 1 ]; then
    echo "no CUDA GPU: nothing to measure"
    exit 0
fi

WORK="${HEED_GPU_BENCH_DIR:-$(mktemp -d -t heed-gpu-bench.XXXXXX)}"
mkdir -p "$WORK"
rm -f "$WORK/results.jsonl"
echo "heed GPU benchmark: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), work folder $WORK"

bench() {
    # one part, in its own process, bounded in time (seconds first)
    local limit=$1
    shift
    echo "== $*"
    # the heed run inside gets 10 s less, so its own row names its log
    timeout "$limit" "$PYTHON" benchmarks/gpu_bench.py "$@" --work "$WORK" --timeout $((limit - 10))
    local code=$?
    if [ "$code" -eq 124 ]; then
        echo "{\"part\": \"$*\", \"status\": \"failed\", \"reason\": \"timed out after $limit s\"}" >>"$WORK/results.jsonl"
    elif [ "$code" -ne 0 ]; then
        echo "{\"part\": \"$*\", \"status\": \"failed\", \"reason\": \"gpu_bench.py exited $code\"}" >>"$WORK/results.jsonl"
    fi
}

bench 120 build
bench 180 rl --engine vllm
bench 90 rl --engine hf
bench 75 qlora
bench 90 fsdp
"$PYTHON" benchmarks/gpu_bench.py summary --work "$WORK"
