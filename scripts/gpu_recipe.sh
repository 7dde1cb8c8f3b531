#!/usr/bin/env bash
# The translation recipe on the GPU machine, on Multi30k copied into .gpu_data/multi30k (git-ignored; name
# .gpu_data in the device call's `carry`). The run folder runs/m30k is git-ignored, so on a warm machine a
# later call resumes it (training resumes from its last checkpoint). Runs land in runs/m30k_<dtype>.
#   [DTYPE=bfloat16|float32] bash scripts/gpu_recipe.sh [MINUTES]
#       train for at most MINUTES (default 6), then QAT, PTQ, export, BLEU on the three test sets
# The exact command is printed and kept in runs/m30k/recipe.json; results in runs/m30k/results.{json,md}.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/lsquant_gpu_out}
MIN=${1:-6}
DATA=${LSQUANT_DATA:-$PWD/.gpu_data}
DTYPE=${DTYPE:-bfloat16}   # bfloat16: mixed precision (fp32 master weights); float32: TF32 GEMMs
RUN=${RUN:-runs/m30k_$DTYPE}
cmd=(python3 -m lsquant quickstart --data "$DATA" --run-dir "$RUN" --seed 1
     --set max_train_minutes="$MIN" --set max_steps=20000 --set warmup=800 --set lr=1e-3
     --set max_batch_tokens=8192 --set vocab_size=10000 --set qat_steps=800 --set qat_lr=1e-4
     --set calib_batches=8 --set dtype="$DTYPE" --set beam_size=4 --set infer_batch_size=128
     --set 'model={"hidden_size": 512, "intermediate_size": 2048, "nhead": 8, "num_encoder_layers": 3, "num_decoder_layers": 3, "dropout": 0.3, "max_seq_len": 128}')
echo "${cmd[*]}"
"${cmd[@]}"
rc=$?
cp "$RUN"/results.md "$RUN"/results.json "$RUN"/recipe.json "$RUN"/log.txt "$OUT"/ 2>/dev/null
exit $rc
