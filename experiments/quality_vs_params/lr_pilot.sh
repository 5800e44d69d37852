#!/usr/bin/env bash
# Learning-rate pilot of quality_vs_params part (a): one seed (0), the study's CPU budget (batch 16, 250 steps
# on 4,000 reviews, length-grouped), validation/test capped at 640 reviews. experiments/common.py CLS_LR holds
# the rate with the best validation accuracy (ties: lower validation loss) per method; lr_pilot.txt is
# this script's output. `head` runs the second pilot: the classification head at its own rate
# (model.head_learning_rate) for the methods whose own rate is below 1e-2; head_lr_pilot.txt is its output.
#   bash experiments/quality_vs_params/lr_pilot.sh > experiments/quality_vs_params/lr_pilot.txt
#   bash experiments/quality_vs_params/lr_pilot.sh head > experiments/quality_vs_params/head_lr_pilot.txt
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${PILOT_DIR:-runs/experiments/lr_pilot}
M=configs/methods
pilot() {  # label config learning-rate [prompt learning rate ("" for none)] [head learning rate]
    local name="$1-$3${4:+-p$4}${5:+-h$5}" start=$SECONDS
    peftlab fit --config configs/quickstart.yaml --config "$2" --model.init_args.learning_rate "$3" \
        ${4:+--model.init_args.prompt_learning_rate "$4"} ${5:+--model.init_args.head_learning_rate "$5"} \
        --data.batch_size 16 --data.group_by_length true --trainer.max_epochs 1 --data.max_train_samples 4000 \
        --data.max_eval_samples 640 --trainer.logger.init_args.save_dir "$out" --trainer.logger.init_args.name "$name" \
        --trainer.enable_progress_bar false --trainer.enable_model_summary false --seed_everything 0 \
        > "$out/$name.log" 2>&1
    python experiments/quality_vs_params/lr_pilot_line.py "$1" "$3" "$out/$name/version_0/metrics.csv" \
        $((SECONDS - start)) "${4:+(prompt lr $4) }${5:+(head lr $5)}"
}
mkdir -p "$out"
if [[ ${1:-} == head ]]; then
    pilot p-tuning_v2   $M/p_tuning_v2.yaml               3e-4 "" 1e-2
    pilot p-tuning_v2   $M/p_tuning_v2.yaml               3e-4 "" 3e-2
    pilot p-tuning_v2   $M/p_tuning_v2.yaml               1e-3 "" 1e-2
    pilot prefix+mlp    $M/prefix_tuning_projection.yaml  3e-4 "" 1e-2
    pilot prefix+mlp    $M/prefix_tuning_projection.yaml  1e-3 "" 1e-2
    pilot lora          $M/lora.yaml                      2e-3 "" 1e-2
    pilot adapters      $M/adapters.yaml                  3e-3 "" 1e-2
    pilot lora+prompt   $M/lora_prompt.yaml               2e-3 1e-1 1e-2
    pilot full          configs/full_finetune.yaml        5e-5 "" 1e-2
    exit 0
fi
pilot full          configs/full_finetune.yaml        5e-5
pilot prompt        $M/prompt_tuning.yaml             3e-2
pilot prompt        $M/prompt_tuning.yaml             1e-1
pilot p-tuning      $M/p_tuning.yaml                  3e-3
pilot p-tuning      $M/p_tuning.yaml                  1e-2
pilot prefix        $M/prefix_tuning.yaml             1e-2
pilot prefix        $M/prefix_tuning.yaml             3e-2
pilot prefix+mlp    $M/prefix_tuning_projection.yaml  1e-4
pilot prefix+mlp    $M/prefix_tuning_projection.yaml  3e-4
pilot prefix+mlp    $M/prefix_tuning_projection.yaml  1e-3
pilot prefix+mlp    $M/prefix_tuning_projection.yaml  3e-3
pilot p-tuning_v2   $M/p_tuning_v2.yaml               3e-4
pilot p-tuning_v2   $M/p_tuning_v2.yaml               1e-3
pilot p-tuning_v2   $M/p_tuning_v2.yaml               5e-3
pilot lora          $M/lora.yaml                      5e-4
pilot lora          $M/lora.yaml                      2e-3
pilot lora+prompt   $M/lora_prompt.yaml               2e-3 3e-3
pilot lora+prompt   $M/lora_prompt.yaml               2e-3 3e-2
pilot adapters      $M/adapters.yaml                  1e-3
pilot adapters      $M/adapters.yaml                  3e-3
