#!/usr/bin/env bash
# GPU check (`make gpu-check`): the first real run in miniature, on one GPU, in one command. A random-init MTP model
# of ~1.2B parameters (dim 2048, 20 blocks, H=4, vocab 32000, max_seq_len 2048) saved as Meta ships 7B_1T_4 (bf16
# consolidated.pth), the Llama-2 style tokenizer of tiny.py, trained through torchrun (FSDP2, bf16 compute on fp32
# master weights) with each scorer, with full validation (all 90 MBPP rows) and the end-of-run evaluation on a few
# MBPP problems, then one process without FSDP (bf16 autocast). Ends with a table per stage: tokens/s per GPU, MFU,
# peak memory, validation loss, MBPP pass@1 and the dtype of the saved master weights.
#
#   stage 0  the CUDA-only tests (bf16 step contracts, bf16 autocast over fp32 masters in one process)
#   stage 1  uniform, FSDP2, packed 2048-token rows
#   stage 2  critic_delta_v1 (tiny reward model; rows unpacked: one reward per example)
#   stage 3  rho1_excess_v1 (tiny reference with the same tokenizer; precomputed reference CE), packed rows
#   stage 4  uniform, one process without FSDP (bf16 autocast), packed rows
#
# Env: PYTHON (python3), NPROC (GPUs, 1), STEPS (30), DIM (2048), LAYERS (20), HEADS (16), SEQ (2048),
#      MICRO_BATCH (4), EVAL_LIMIT (8), STAGES ("0 1 2 3 4"), DEVICE (cuda; cpu runs the same stages on tiny
#      shapes, as a check of the script), TINY (.cache/tiny), OUT (runs/gpu_check), CACHE (.cache/gpu_check:
#      the base and reference models, the tokenised data, the reference CE), EXTRA_ARGS (more
#      --section.key=value overrides, e.g. --model.activation_checkpointing=true), WHEELS (a folder of wheels to
#      install with --no-deps when `datasets` is missing: offline GPU boxes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NPROC=${NPROC:-1}
STEPS=${STEPS:-30}
SEQ=${SEQ:-2048}
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-.cache/tiny}
OUT=${OUT:-runs/gpu_check}
CACHE=${CACHE:-.cache/gpu_check}
BASE=$CACHE/base_${DIM:-2048}x${LAYERS:-20}
REF=$CACHE/ref_llama
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ] && ! "$PY" -c "import datasets" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps "$WHEELS"/*.whl
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ -d "$TINY/tokenizer_llama" ] || "$PY" tiny.py --out "$TINY"
"$PY" scripts/gpu_check.py base "$BASE" --tokenizer "$TINY/tokenizer_llama" --dim "${DIM:-2048}" \
  --layers "${LAYERS:-20}" --heads "${HEADS:-16}" --seq "$SEQ" --device "$DEVICE"
"$PY" scripts/gpu_check.py ref "$REF" --from "$TINY/ref_hf" --tokenizer "$TINY/tokenizer_llama"

COMMON=(--model.path="$BASE" --model.format=meta --model.tokenizer="$BASE" --model.dtype=bfloat16
  --model.max_seq_len="$SEQ" --data.max_length="$SEQ" --train.micro_batch_size="${MICRO_BATCH:-4}" --train.grad_accum=1
  --train.steps="$STEPS" --train.log_every=5 --train.eval_every=0 --train.val_batches=0 --optim.lr=3e-4
  --eval.enabled=true --eval.limit="${EVAL_LIMIT:-8}" --eval.max_new_tokens=128 --eval.batch_size=8
  --tracking.enabled=false --train.out_dir="$OUT" --storage.cache_dir="$CACHE" --train.device="$DEVICE"
  --critic.reward_model="$TINY/rm_hf" --critic.pretrain_steps=20 --rho1.ref_model="$REF" --rho1.precompute=true
  ${EXTRA_ARGS:-})
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
stage() { [[ " ${STAGES:-0 1 2 3 4} " == *" $1 "* ]]; }
banner() { echo; echo "== $*"; }

if stage 0; then
  banner "0/4 CUDA-only tests"
  "$PY" -m pytest -q tests/test_model.py tests/test_train.py -k "cuda" -p no:cacheprovider
fi
if stage 1; then
  banner "1/4 uniform, FSDP2 x $NPROC, packed $SEQ-token rows, $STEPS steps"
  rm -rf "${OUT:?}/uniform"  # a rerun starts afresh (metrics.jsonl is appended to)
  "${TORCHRUN[@]}" train.py configs/tiny_mbpp.toml "${COMMON[@]}" --data.packing=true --train.run_name=uniform
fi
if stage 2; then
  banner "2/4 critic_delta_v1, FSDP2 x $NPROC, one example per row, $STEPS steps"
  rm -rf "${OUT:?}/critic"
  "${TORCHRUN[@]}" train.py configs/tiny_critic_mbpp.toml "${COMMON[@]}" --train.run_name=critic
fi
if stage 3; then
  banner "3/4 rho1_excess_v1, FSDP2 x $NPROC, packed $SEQ-token rows, $STEPS steps"
  rm -rf "${OUT:?}/rho1"
  "${TORCHRUN[@]}" train.py configs/tiny_rho1_mbpp.toml "${COMMON[@]}" --data.packing=true --train.run_name=rho1
fi
if stage 4; then
  banner "4/4 uniform, one process without FSDP (bf16 autocast), packed $SEQ-token rows, $STEPS steps"
  rm -rf "${OUT:?}/single"
  "$PY" train.py configs/tiny_mbpp.toml "${COMMON[@]}" --data.packing=true --train.run_name=single
fi
banner "gpu check: $(date -u +%Y-%m-%d), ${DIM:-2048}x${LAYERS:-20} model, runs in $OUT"
"$PY" scripts/gpu_check.py report "$OUT" uniform critic rho1 single
