#!/usr/bin/env bash
# The one prepared run for a GPU machine (docs/gpu.md): the versions, SGD-SaI on CUDA against
# the float64 reference, the GPU-marked tests, the optimizer-step benchmark and the training
# benchmarks (plain LoRA, the potter presets), each part under its own time budget, 465 s in
# all, so that with the summary it fits 8 minutes on an H100 (docs/gpu.md says how each budget
# was estimated). Seven files go to $OUT (a GPU machine brings back at most 8): versions.txt,
# parity.json, pytest_gpu.txt, bench_optimizer.json, bench_train.json, summary.md, log.txt.
#
#     OUT=/path/to/empty/folder bash scripts/gpu_check.sh
#     DEVICE=cpu OUT=/tmp/dry bash scripts/gpu_check.sh     # the same parts, tiny, on the CPU
#
# Where diffusers is missing (the GPU image has none), the wheels in $WHEELS (default .whl/)
# are installed first. A part that fails or runs out of time is recorded and the next one runs;
# the exit code is 1 when any part did not pass. PYTHON picks the interpreter (default
# .venv/bin/python where there is one, else python3).
set -uo pipefail # no -e: a failed part is recorded, and the next one runs
: "${OUT:?set OUT to the empty folder the results go to}"
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) # absolute: the script moves to the repository root
cd "$(dirname "$0")/.."
export OUT DEVICE=${DEVICE:-cuda} WHEELS=${WHEELS:-.whl}
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x .venv/bin/python ] && PYTHON=.venv/bin/python
fi
# the checkout's code is what runs, whatever is installed; nothing may wait on the network
export PYTHON PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") # the model (2.1 GB), images, pieces
export WORK LOG=$OUT/log.txt
KERNEL_PID=
trap 'rm -rf "$WORK"; [ -n "$KERNEL_PID" ] && kill "$KERNEL_PID" 2>/dev/null' EXIT
PARTS=$WORK/parts.tsv
DEADLINE_S=465 # no part starts, or runs on, past this many seconds from here (+5 s to stop)
START=$SECONDS

# Sizes: the GPU run, or the dry run (tests/test_gpu_check.py), which runs every part tiny.
# The dry run checks that everything works, not the GPU's timing: its budgets are 3x, since on
# a loaded 2-core machine the imports alone (each part starts its own processes) take seconds.
export OPTIMIZERS=sgd-sai,sgd-sai-foreach,adamw-fused,adamw-foreach,sgd-foreach
BUDGET_SCALE=1
if [ "$DEVICE" = cpu ]; then
    BUDGET_SCALE=3 DEADLINE_S=$((DEADLINE_S * 3))
    export PARITY_ARGS="--big-side 256"
    export OPT_ARGS="--set lora4:tiny,lora64:tiny,gpt2xl:tiny --repeats 3 --warmup 1 --first-repeats 1"
    export MODEL_ARGS="--model tiny --image-size 64"
    export TRAIN_ARGS="--resolution 64 --steps 2 --warmup 1"
    export PLAIN_RUNS="fp16:2" # one of each kind, both precisions: every code path once
    export PRESET_RUNS="potter-edlora:bf16"
else
    export PARITY_ARGS="--big-side 2048"
    export OPT_ARGS="--set lora4:full,lora64:full,gpt2xl:full --repeats 20 --warmup 3 --first-repeats 3"
    export MODEL_ARGS="--model sd15 --image-size 512"
    export TRAIN_ARGS="--resolution 512 --steps 10 --warmup 2"
    export PLAIN_RUNS="bf16:4 fp16:4 bf16:2 fp16:2" # precision:batch, reference and ours each
    export PRESET_RUNS="potter:fp16 potter-edlora:fp16 potter:bf16 potter-edlora:bf16"
fi

# ------------------------------------------------------------------------------- the parts
has() { "$PYTHON" -c "import importlib.util, sys; sys.exit(not importlib.util.find_spec('$1'))"; }

part_setup() {
    if has diffusers; then
        echo "diffusers is installed"
    elif compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "diffusers is missing: installing it from $WHEELS/"
        # what it needs comes from the folder only where the image lacks it (or has too old a one)
        "$PYTHON" -m pip install -q --no-index --find-links "$WHEELS" diffusers || return 1
    else
        echo "MISSING: diffusers is not installed and $WHEELS/ holds no wheels. Fetch them as" \
            "docs/gpu.md says (pip download ... -d .whl) and send .whl/ along with the checkout."
        return 1
    fi
    if ! "$PYTHON" -c "from importlib.metadata import version; version('sai-diffusion')" 2>/dev/null; then
        # the metadata and commands; the code runs from the checkout either way (PYTHONPATH)
        "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . ||
            echo "note: pip install -e . failed; sai_diffusion runs from the checkout (PYTHONPATH)"
    fi
    # what every later part imports, imported once here: a clash shows up first, and named
    "$PYTHON" -c "import diffusers, peft, transformers, accelerate, sai_diffusion.training.recipe"
}

part_versions() {
    "$PYTHON" scripts/gpu_report.py versions --device "$DEVICE" --out "$OUT/versions.txt"
}

part_parity() {
    # shellcheck disable=SC2086 # the *_ARGS are word lists
    "$PYTHON" scripts/gpu_parity.py --device "$DEVICE" $PARITY_ARGS --json "$OUT/parity.json"
}

part_pytest_gpu() {
    # the files that mark a test gpu: collecting the whole suite would take longer than its tests
    local files
    files=$(grep -rlE 'mark\.gpu' tests --include='*.py' | sort)
    if [ -z "$files" ]; then
        echo "no test is marked gpu" | tee "$OUT/pytest_gpu.txt"
        return 1
    fi
    # shellcheck disable=SC2086
    "$PYTHON" -m pytest -m gpu -p no:cacheprovider -rA -q $files >"$OUT/pytest_gpu.txt" 2>&1
}

part_bench_optimizer() {
    # shellcheck disable=SC2086
    "$PYTHON" scripts/bench_optimizer.py --device "$DEVICE" $OPT_ARGS --optimizers "$OPTIMIZERS" \
        --json "$OUT/bench_optimizer.json"
}

part_inputs() {
    # shellcheck disable=SC2086
    "$PYTHON" scripts/gpu_inputs.py --out "$WORK/inputs" $MODEL_ARGS
}

bench_train() { # bench_train.py on the built model, with this device's sizes, and "$@"
    local config=()
    [ -d "$WORK/inputs/model-config" ] && config=(--base-config "$WORK/inputs/model-config")
    # shellcheck disable=SC2086
    "$PYTHON" scripts/bench_train.py --device "$DEVICE" --base-model "$WORK/inputs/model.safetensors" \
        ${config[@]+"${config[@]}"} $TRAIN_ARGS "$@"
}

part_train_plain() { # UNet LoRA, cached latents: the recipe against the diffusers-style loop
    local run n=0 rc=0
    for run in $PLAIN_RUNS; do
        n=$((n + 1))
        bench_train --concept "$WORK/inputs/potter-plain.yaml" --loops reference,ours-sgd-sai \
            --precision "${run%:*}" --batch-size "${run#*:}" \
            --json "$WORK/train/1$n-plain-${run%:*}-b${run#*:}.json" || rc=1
    done
    return $rc
}

part_train_presets() { # potter.yaml and potter-edlora.yaml as shipped, at batch 2 (their own)
    local run n=0 rc=0
    for run in $PRESET_RUNS; do
        n=$((n + 1))
        bench_train --concept "$WORK/inputs/${run%:*}.yaml" --loops ours-preset \
            --precision "${run#*:}" --batch-size 2 \
            --json "$WORK/train/2$n-${run%:*}-${run#*:}.json" || rc=1
    done
    return $rc
}
export -f has part_setup part_versions part_parity part_pytest_gpu part_bench_optimizer \
    part_inputs bench_train part_train_plain part_train_presets

# ---------------------------------------------------------------------------- the running
record() { # NAME RESULT SECONDS BUDGET NOTE
    printf '%s\t%s\t%s\t%s\t%s\n' "$@" >>"$PARTS"
    printf '[%4ds] %s: %s (%ss of %ss)%s\n' $((SECONDS - START)) "$1" "$2" "$3" "$4" "${5:+; $5}"
}

run_part() { # NAME BUDGET_S [NOTE]: part_NAME under its budget, cut to what is left of the deadline
    local name=$1 budget=$(($2 * BUDGET_SCALE)) note=${3:-} left=$((DEADLINE_S - (SECONDS - START)))
    if [ "$left" -lt 5 ]; then
        record "$name" "skipped: out of time" 0 "$budget" "$note"
        return
    fi
    [ "$left" -lt "$budget" ] && budget=$left note="${note:+$note; }budget cut to the deadline"
    echo "===== $name (budget ${budget}s)" >>"$LOG"
    local began=$SECONDS rc
    timeout --kill-after=5 "$budget" bash -c "part_$name" >>"$LOG" 2>&1
    rc=$?
    case $rc in
        0) record "$name" passed $((SECONDS - began)) "$budget" "$note" ;;
        124 | 137) record "$name" "timed out" $((SECONDS - began)) "$budget" "$note" ;;
        *) record "$name" "failed (exit $rc)" $((SECONDS - began)) "$budget" "$note" ;;
    esac
}

mkdir -p "$WORK/train"
rm -f "$OUT"/{versions.txt,parity.json,pytest_gpu.txt,bench_optimizer.json,bench_train.json,summary.md}
: >"$LOG"
# The GPU tests import tests/optim/test_sgd_sai.py, whose collection builds SGD-SaI's fused CPU
# kernel (C++, about a minute, once per machine; a no-op where scripts/setup.sh built it). It
# builds here in the background, beside the parts that do not need it; pytest waits for it
# (optim/fused.py's build lock) if it is not done by then.
"$PYTHON" -c "from sai_diffusion.optim import fused; print('fused CPU kernel:', 'built' if fused.cpu_kernel() else fused.failure())" >"$WORK/kernel.log" 2>&1 &
KERNEL_PID=$!
if [ "$DEVICE" = cpu ]; then
    CPU_NOTE="no CUDA: the CPU's fused (C++) and foreach paths against the reference"
    TEST_NOTE="no CUDA: the GPU tests collect and skip themselves"
fi
echo "gpu_check: DEVICE=$DEVICE, results in $OUT"
# budgets in seconds (465 in all): estimates for an H100, docs/gpu.md
run_part setup 25
run_part versions 15
run_part parity 30 "${CPU_NOTE:-}"
run_part bench_optimizer 50
run_part pytest_gpu 45 "${TEST_NOTE:-}" # after the others, so the CPU kernel has had time
run_part inputs 40
if grep -q $'^inputs\tpassed' "$PARTS"; then
    run_part train_plain 160
    run_part train_presets 100
else
    record train_plain "skipped: no inputs" 0 $((160 * BUDGET_SCALE)) ""
    record train_presets "skipped: no inputs" 0 $((100 * BUDGET_SCALE)) ""
fi

# the summary comes last, whatever failed; a plain one from the shell if even that fails
if ! timeout 10 "$PYTHON" scripts/gpu_report.py summary --device "$DEVICE" --out "$OUT" \
    --parts "$PARTS" --train "$WORK/train" --budget "$DEADLINE_S" >>"$LOG" 2>&1; then
    {
        echo "# GPU check (scripts/gpu_report.py summary failed: see log.txt)"
        echo
        echo "| part | result | seconds | budget s | note |"
        echo "|---|---|---:|---:|---|"
        awk -F'\t' '{ printf "| %s | %s | %s | %s | %s |\n", $1, $2, $3, $4, $5 }' "$PARTS"
    } >"$OUT/summary.md"
fi
{ echo "===== fused CPU kernel (built in the background)"; cat "$WORK/kernel.log"; } >>"$LOG"
if [ "$(stat -c %s "$LOG")" -gt 8000000 ]; then # 16 MB is the most a file may bring back
    tail -c 8000000 "$LOG" >"$WORK/log.tail" && mv "$WORK/log.tail" "$LOG"
fi
echo "gpu_check: $((SECONDS - START)) s; summary in $OUT/summary.md"
! cut -f2 "$PARTS" | grep -qv '^passed$'
