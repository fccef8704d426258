#!/usr/bin/env bash
# The built-in demo, CPU only, no downloads: teach the miniature model the held-out heart with
# SGD-SaI and with scaled-AdamW, score both runs with the judge, and put them side by side.
#
#     bash scripts/setup.sh && bash scripts/demo.sh          # writes runs/demo/
#
# A finished run is kept and not trained again; a run that was interrupted resumes from its
# last checkpoint. Delete runs/demo/ to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=.venv/bin
[ -x "$bin/sai-train-lora" ] || { echo "run 'bash scripts/setup.sh' first" >&2; exit 2; }
out=${DEMO_DIR:-runs/demo}

for optimizer in sgd-sai scaled-adamw; do
  run="$out/$optimizer"
  if [ -f "$run/lora.safetensors" ]; then
    echo "== $run is trained already"
  elif [ -d "$run/checkpoints" ]; then
    echo "== resuming $run"
    "$bin/sai-train-lora" --resume "$run"
  else
    echo "== training $run"
    rm -rf "$run"  # a run that died before its first checkpoint has nothing to keep
    "$bin/sai-train-lora" --concept demo --optimizer "$optimizer" --output-dir "$run"
  fi
done

echo "== judging both runs (and the base model) with sai-eval"
"$bin/sai-eval" "$out/sgd-sai" "$out/scaled-adamw"

echo "== side by side with sai-compare"
"$bin/sai-compare" "$out/sgd-sai" "$out/scaled-adamw" --with-base \
  --prompt "a photo of a red {token} on a white background" \
  --prompt "a photo of a yellow {token} on grass" \
  --prompt "a pencil sketch of {token}" \
  --seeds 1 2 3 4 5 6 --steps 20 --guidance 6 --out "$out/grid.png"
echo "open $out/grid.html, or browse the runs with: $bin/sai-app --runs-dir $out"
