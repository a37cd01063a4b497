#!/usr/bin/env bash
# GPU check (`make gpu-check`): the CUDA / bf16 / FSDP2 path on a ~134M-parameter MTP model (H=4, vocab 32000,
# random init) trained on packed MBPP for a few hundred steps. Prints tokens/s per device, MFU and peak memory
# from train.py's own log lines, for: FSDP2 + bf16 under torchrun; + activation checkpointing; the rho1 scorer;
# and one process without FSDP (bf16 autocast). Needs the tiny tokenizer (built from MBPP if missing).
#
# Env: PYTHON (python3), NPROC (GPUs, 1), STEPS (200), DIM (768), LAYERS (12), TINY (.cache/tiny),
#      STAGES ("1 2 3 4"), EXTRA_ARGS (more --section.key=value overrides), WHEELS (a folder of wheels to install with --no-deps when `datasets` is missing: offline GPU boxes).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
NPROC=${NPROC:-1}
STEPS=${STEPS:-200}
TINY=${TINY:-.cache/tiny}
OUT=${OUT:-runs/gpu_check}
BASE=.cache/gpu_check_base
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ -n "${WHEELS:-}" ] && ! "$PY" -c "import datasets" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps "$WHEELS"/*.whl
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO GPU')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
[ -d "$TINY/tokenizer" ] || "$PY" tiny.py --out "$TINY"
"$PY" - "$BASE" "${DIM:-768}" "${LAYERS:-12}" <<'PYEOF'
import sys
import model as M
out, dim, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = M.ModelArgs(dim=dim, n_layers=layers, n_heads=max(1, dim // 64), vocab_size=32000, n_future_tokens=4, max_seq_len=2048)
net = M.Transformer(args)
M.save_checkpoint(net, out)
print(f"random-init MTP model: {M.count_params(net) / 1e6:.1f}M parameters, dim {dim}, {layers} blocks, H=4 -> {out}")
PYEOF

COMMON=(--model.path="$BASE" --model.format=wmtp --model.tokenizer="$TINY/tokenizer" --model.dtype=bfloat16
  --rho1.ref_model="$TINY/ref_hf" --data.packing=true --data.max_length=1024 --train.micro_batch_size=8
  --train.log_every=25 --train.eval_every=0 --train.val_batches=4 --eval.enabled=false --tracking.enabled=false
  --train.out_dir="$OUT" --optim.lr=3e-4 --train.device=cuda ${EXTRA_ARGS:-})
TORCHRUN=("$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
SHORT=$(( STEPS < 50 ? STEPS : 50 ))
stage() { [[ " ${STAGES:-1 2 3 4} " == *" $1 "* ]]; }

stage 1 && echo "== 1/4 FSDP2 + bf16 (MixedPrecisionPolicy), uniform weights, $STEPS steps"
stage 1 && "${TORCHRUN[@]}" train.py configs/tiny_mbpp.toml "${COMMON[@]}" --train.steps="$STEPS" --train.run_name=fsdp
stage 2 && echo "== 2/4 FSDP2 + bf16 + activation checkpointing, $SHORT steps"
stage 2 && "${TORCHRUN[@]}" train.py configs/tiny_mbpp.toml "${COMMON[@]}" --train.steps="$SHORT" --train.run_name=ac \
  --model.activation_checkpointing=true
stage 3 && echo "== 3/4 FSDP2 + bf16, rho1_excess_v1 (extra no-grad head pass + reference model), $SHORT steps"
stage 3 && "${TORCHRUN[@]}" train.py configs/tiny_rho1_mbpp.toml "${COMMON[@]}" --train.steps="$SHORT" --train.run_name=rho1
stage 4 && echo "== 4/4 one process, no FSDP, bf16 autocast, $SHORT steps"
stage 4 && "$PY" train.py configs/tiny_mbpp.toml "${COMMON[@]}" --train.steps="$SHORT" --train.run_name=single
echo "gpu check done: runs in $OUT"
