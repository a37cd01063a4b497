#!/usr/bin/env bash
# GPU check (`make gpu-check`): the first real run in miniature, on one GPU, in one command (about 5 min on an H200).
# A random-init MTP model of ~1.2B parameters (dim 2048, 20 blocks, H=4, vocab 32000, max_seq_len 2048) saved as
# Meta ships 7B_1T_4 (bf16 consolidated.pth), the Llama-2 style tokenizer of tiny.py, trained through torchrun
# (FSDP2, bf16 compute on fp32 master weights) with each scorer, with full validation (all 90 MBPP rows) and the
# end-of-run evaluation on a few MBPP problems; then the same uniform run with the unchunked CE and with
# model.compile. Ends with a compact summary (scripts/gpu_check.py report): per stage tokens/s per GPU (input
# positions the trunk ran on) and MFU (FLOPs the steps computed, model.train_flops), both over the training steps
# only, peak memory, validation loss, MBPP pass@1, the masters' dtype; then chunked vs unchunked CE and compile
# on/off side by side, and the MFU goal (>= 35% on an H100/H200-class GPU).
#
#   stage 0  the CUDA-only tests (bf16 step contracts, bf16 autocast over fp32 masters in one process)
#   stage 1  uniform, FSDP2, packed rows, chunked CE (model.ce_chunk 1024), compile off: the reference
#   stage 2  critic_delta_v1 (tiny reward model; rows unpacked: one reward per example)
#   stage 3  rho1_excess_v1 (tiny reference with the same tokenizer; precomputed reference CE), packed rows
#   stage 4  uniform, one process without FSDP (bf16 autocast), packed rows (not in the default STAGES)
#   stage 5  stage 1 with the unchunked CE (model.ce_chunk 0), PERF_STEPS steps, no evaluation
#   stage 6  stage 1 with model.compile = true, PERF_STEPS steps, no evaluation
#
# Env: PYTHON (python3), NPROC (GPUs, 1), STEPS (20), PERF_STEPS (15), DIM (2048), LAYERS (20), HEADS (16),
#      SEQ (2048), MICRO_BATCH (4), EVAL_LIMIT (8), STAGES ("0 1 2 3 5 6"), DEVICE (cuda), SELF_CHECK (1: the
#      same stages on a CPU at tiny shapes, two gloo ranks: a check of this script, minutes), TINY (.cache/tiny),
#      OUT (runs/gpu_check), CACHE (.cache/gpu_check: the base and reference models, the tokenised data, the
#      reference CE), EXTRA_ARGS (more --section.key=value overrides), WHEELS (a folder of wheels installed with
#      --no-deps when datasets or pydantic is missing, as on the offline GPU box; default .whl when it exists).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${SELF_CHECK:-0}" = 1 ]; then  # tiny shapes on the CPU: the script's own check
  DEVICE=cpu NPROC=${NPROC:-2} STEPS=${STEPS:-4} PERF_STEPS=${PERF_STEPS:-3} DIM=${DIM:-64} LAYERS=${LAYERS:-6}
  HEADS=${HEADS:-4} SEQ=${SEQ:-512} MICRO_BATCH=${MICRO_BATCH:-2} EVAL_LIMIT=${EVAL_LIMIT:-2}
  OUT=${OUT:-runs/gpu_check_self} CACHE=${CACHE:-.cache/gpu_check_self} STAGES=${STAGES:-1 2 3 5 6}
fi
NPROC=${NPROC:-1}
STEPS=${STEPS:-20}
PERF_STEPS=${PERF_STEPS:-15}
SEQ=${SEQ:-2048}
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-.cache/tiny}
OUT=${OUT:-runs/gpu_check}
CACHE=${CACHE:-.cache/gpu_check}
BASE=$CACHE/base_${DIM:-2048}x${LAYERS:-20}
REF=$CACHE/ref_llama
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

WHEELS=${WHEELS:-$([ -d .whl ] && echo .whl || true)}
if [ -n "$WHEELS" ] && ! "$PY" -c "import datasets, pydantic" 2>/dev/null; then
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
stage() { [[ " ${STAGES:-0 1 2 3 5 6} " == *" $1 "* ]]; }
PERF=(--train.steps="$PERF_STEPS" --eval.enabled=false --train.val_batches=1 --data.packing=true)
banner() { echo; echo "== $*"; }

if stage 0; then
  banner "0 CUDA-only tests"
  "$PY" -m pytest -q tests/test_model.py tests/test_train.py -k "cuda" -p no:cacheprovider
fi
if stage 1; then
  banner "1 uniform, FSDP2 x $NPROC, packed $SEQ-token rows, $STEPS steps"
  rm -rf "${OUT:?}/uniform"  # a rerun starts afresh (metrics.jsonl is appended to)
  "${TORCHRUN[@]}" train.py configs/tiny_mbpp.toml "${COMMON[@]}" --data.packing=true --train.run_name=uniform
fi
if stage 2; then
  banner "2 critic_delta_v1, FSDP2 x $NPROC, one example per row, $STEPS steps"
  rm -rf "${OUT:?}/critic"
  "${TORCHRUN[@]}" train.py configs/tiny_critic_mbpp.toml "${COMMON[@]}" --train.run_name=critic
fi
if stage 3; then
  banner "3 rho1_excess_v1, FSDP2 x $NPROC, packed $SEQ-token rows, $STEPS steps"
  rm -rf "${OUT:?}/rho1"
  "${TORCHRUN[@]}" train.py configs/tiny_rho1_mbpp.toml "${COMMON[@]}" --data.packing=true --train.run_name=rho1
fi
if stage 4; then
  banner "4 uniform, one process without FSDP (bf16 autocast), packed $SEQ-token rows, $STEPS steps"
  rm -rf "${OUT:?}/single"
  "$PY" train.py configs/tiny_mbpp.toml "${COMMON[@]}" --data.packing=true --train.run_name=single
fi
if stage 5; then
  banner "5 uniform, unchunked CE (model.ce_chunk 0), FSDP2 x $NPROC, $PERF_STEPS steps"
  rm -rf "${OUT:?}/unchunked"
  "${TORCHRUN[@]}" train.py configs/tiny_mbpp.toml "${COMMON[@]}" "${PERF[@]}" --model.ce_chunk=0 \
    --train.run_name=unchunked
fi
if stage 6; then
  banner "6 uniform, model.compile on, FSDP2 x $NPROC, $PERF_STEPS steps"
  rm -rf "${OUT:?}/compiled"
  "${TORCHRUN[@]}" train.py configs/tiny_mbpp.toml "${COMMON[@]}" "${PERF[@]}" --model.compile=true \
    --train.run_name=compiled
fi
banner "gpu check: $(date -u +%Y-%m-%d), ${DIM:-2048}x${LAYERS:-20} model, runs in $OUT"
"$PY" scripts/gpu_check.py report "$OUT" uniform critic rho1 single unchunked compiled
