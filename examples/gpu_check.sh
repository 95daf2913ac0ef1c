#!/usr/bin/env bash
# The GPU check, one script for one H100/H200 (each step has a time limit; 9.5 minutes at most, about 6 expected,
# not yet run on a GPU), from the
# repository root of a plain checkout: no install (the GPU image has torch, triton, transformers,
# pytest and hypothesis, no network and no torchao, which none of these steps needs). Writes under
# $OUT (default gpu_check_out/):
#   environment.json   GPU, driver, versions
#   kernel_tests.xml   the Triton kernel on CUDA against the float64 reference (tests/test_latent_kernel.py)
#   kernel.json        bench kernel at B16 and B4, L8192, 32 heads, D128, rho2 0.5: SDPA flash vs bf16/int8 latents,
#                      with the registers/spills of every kernel compiled and the autotuner's picks ("kernels")
#   kernel_graphs.json the same with CUDA-graph replays
#   decode.json        bench decode: 4-layer Llama-2-7B-shaped model, batch 16, cache 8192, dense vs latent
#   decode_graphs.json the same, every variant compiled with mode="reduce-overhead" (CUDA graphs)
# GPU_CHECK_SMOKE=1 runs the same steps on the CPU at toy sizes (TRITON_INTERPRET=1): a check of this
# script, not of the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1
status=0
step() {  # name, command...: run, time, remember a failure, keep going
    local name=$1; shift
    local start=$SECONDS
    echo "== $name"
    "$@" || { echo "!! $name failed (exit $?)"; status=1; }
    echo "   $name: $((SECONDS - start)) s"
}
if [ "${GPU_CHECK_SMOKE:-0}" = 1 ]; then
    export TRITON_INTERPRET=1
    DEVICE=(--device cpu) KERNEL_SHAPES=(--shape 2,4,32,64,0.5) GRAPHS=() DECODE=(--quick --cache-len 40 --steps 4)
    TESTS=(tests/test_latent_kernel.py -k "mixed_lengths and gqa3-d64")
else
    DEVICE=(--device cuda) KERNEL_SHAPES=(--shape 16,32,128,8192,0.5 --shape 4,32,128,8192,0.5) GRAPHS=(--cuda-graphs)
    DECODE=(--layers 4 --batch 16 --cache-len 8192 --steps 32)
    TESTS=(tests/test_latent_kernel.py)
fi

step environment python3 - "$OUT/environment.json" <<'EOF'
import json, platform, subprocess, sys
import torch, triton, transformers
env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
       "transformers": transformers.__version__, "cuda": torch.version.cuda, "gpu": None}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    env["gpu"] = {"name": p.name, "sm": f"{p.major}{p.minor}", "sms": p.multi_processor_count,
                  "memory_gib": round(p.total_memory / 2**30, 1)}
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(env)
EOF
step kernel-tests timeout 150 python3 -m pytest -q -p no:cacheprovider "${TESTS[@]}" --junitxml="$OUT/kernel_tests.xml"
step bench-kernel timeout 90 python3 -m wsvd_passes.cli bench kernel "${DEVICE[@]}" "${KERNEL_SHAPES[@]}" --quiet \
    --json "$OUT/kernel.json"
if [ ${#GRAPHS[@]} -gt 0 ]; then
    step bench-kernel-graphs timeout 60 python3 -m wsvd_passes.cli bench kernel "${DEVICE[@]}" "${KERNEL_SHAPES[@]}" \
        "${GRAPHS[@]}" --quiet --json "$OUT/kernel_graphs.json"
fi
step bench-decode timeout 150 python3 -m wsvd_passes.cli bench decode "${DEVICE[@]}" "${DECODE[@]}" --quiet \
    --json "$OUT/decode.json"
if [ ${#GRAPHS[@]} -gt 0 ]; then
    step bench-decode-graphs timeout 120 python3 -m wsvd_passes.cli bench decode "${DEVICE[@]}" "${DECODE[@]}" \
        "${GRAPHS[@]}" --quiet --json "$OUT/decode_graphs.json"
fi
echo "gpu check: $( [ $status = 0 ] && echo ok || echo 'FAILED steps above'), results in $OUT/"
exit $status
