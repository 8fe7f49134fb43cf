#!/usr/bin/env bash
# The trainer's multi-GPU acceptance run (issue 4), one command:
#   1. ZeRO-3 pretraining of the recipe's first stage on every visible GPU;
#   2. SIGKILL of the whole job KILL_AFTER_S seconds (default 15) after its first checkpoint, mid-interval;
#   3. the same command again, which resumes from that checkpoint, trains to the budget and exports;
#   4. the export loaded back through transformers' Auto classes, one forward on the GPU;
#   5. plain DeepSpeed + Hugging Face training of the same dense backbone on the same rows.
# Each step's metrics.jsonl (loss, tokens/s per device, MFU) stays under the recipe's output_dir.
#
#   bash launch/zero3_acceptance.sh [RECIPE] [NUM_GPUS] [BASELINE_STEPS] [key=value ...]
#   bash launch/zero3_acceptance.sh recipes/qwen3_1b_synthetic.yaml 2 40
#   DS_ACCELERATOR=cpu bash launch/zero3_acceptance.sh recipes/qwen3_1b_synthetic.yaml 2 2 <tiny overrides>
set -euo pipefail
recipe=${1:-recipes/qwen3_1b_synthetic.yaml}
num_gpus=${2:-$(python -c "import torch; print(torch.cuda.device_count())")}
baseline_steps=${3:-40}
overrides=("${@:4}")

read -r run_dir stage < <(python - "$recipe" "${overrides[@]}" <<'EOF'
import sys
from train.config import load_recipe
recipe = load_recipe(sys.argv[1], sys.argv[2:])
print(recipe.run.output_dir, recipe.stages[0].name)
EOF
)
latest="$run_dir/stages/$stage/checkpoints/latest"
if [ -e "$latest" ]; then
  echo "$run_dir already holds checkpoints of stage $stage; remove it for a fresh acceptance run" >&2
  exit 1
fi

train=(deepspeed --num_gpus "$num_gpus" launch/pretrain.py "$recipe" --stage "$stage" "${overrides[@]}")

# A new session, so that one kill reaches the launcher and every rank it started.
setsid "${train[@]}" &
job=$!
while [ ! -s "$latest" ]; do
  if ! kill -0 "$job" 2>/dev/null; then
    echo "the training job ended before its first checkpoint" >&2
    exit 1
  fi
  sleep 1
done
sleep "${KILL_AFTER_S:-15}"
kill -KILL -- "-$job"
wait "$job" || true
echo "killed after checkpoint $(cat "$latest"); resuming"

"${train[@]}"

python - "$run_dir/stages/$stage/export" <<'EOF'
import sys
import torch
from transformers import AutoModelForCausalLM
import msa_modeling  # noqa: F401  (registers the MSA Auto classes)

model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
device = "cuda" if torch.cuda.is_available() else "cpu"
model.to(device).eval()
ids = torch.randint(0, model.config.vocab_size, (1, 64), device=device)
with torch.no_grad():
    logits = model(ids).logits
print(f"export {sys.argv[1]} loads as {type(model).__name__}: "
      f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, logits {tuple(logits.shape)}, "
      f"finite {bool(torch.isfinite(logits).all())}")
EOF

deepspeed --num_gpus "$num_gpus" launch/dense_baseline.py "$recipe" --stage "$stage" --steps "$baseline_steps" \
  "${overrides[@]}"

python - "$run_dir" "$stage" <<'EOF'
import json
import statistics
import sys
from pathlib import Path

run_dir, stage = Path(sys.argv[1]), sys.argv[2]
print(f"{'run':<14}{'steps':>6}{'first loss':>12}{'last loss':>11}{'tokens/s/GPU':>14}{'MFU':>8}{'peak GB':>9}")
for label, path in (("msa", run_dir / "stages" / stage / "metrics.jsonl"),
                    ("dense", run_dir / "dense_baseline" / stage / "metrics.jsonl")):
    steps = [r for r in map(json.loads, path.read_text().splitlines()) if "tokens_per_s_per_device" in r]
    steady = steps[3:] or steps  # the first steps include compilation and allocator warm-up
    print(f"{label:<14}{len(steps):>6}{steps[0]['loss']:>12.4f}{steps[-1]['loss']:>11.4f}"
          f"{statistics.median(r['tokens_per_s_per_device'] for r in steady):>14,.0f}"
          f"{100 * statistics.median(r['mfu'] for r in steady):>7.1f}%{max(r['memory_gb'] for r in steps):>9.1f}")
EOF
