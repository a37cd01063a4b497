"""Launched by tests/test_distributed.py under torchrun (CPU, gloo): TINY_DIR OUT_DIR SCORER [SCORER ...] [--eval].

The ranks of a FSDP2 run must make the same collective forwards whatever the sizes: for each scorer, with the
reference / reward model sharded too (`train.aux_models = "shard"`), this runs the scorer's preparation over the
first 53 rows of the train split (rho1 reference CE, critic rewards: chunk counts that divide by neither 3 nor 4
ranks), one optimizer step, a FULL validation (90 MBPP rows at micro-batch 4: 23 batches) and the export. Rank 0
prints one JSON line per scorer with the validation metrics; the test compares them with a single process on the
exported weights. A rank that skipped a forward would leave the others inside a collective: gloo errors or the
timeout. With --eval every rank then loads the first export whole and evaluates 5 MBPP problems split over the
ranks (`EVAL`); rank 0 writes the report, which the test compares with a single process.
"""

import json
import sys
import time
from pathlib import Path

import checkpoint
import config as C
import data
import evaluate
import parallel as P
import score
import train

# chunk counts that divide by neither 3 nor 4 ranks: 14 reference chunks of 4 rows, 7 reward chunks of 8
TRAIN_ROWS = 53
EVAL = ["--eval.temperature=0", "--eval.max_new_tokens=24", "--eval.batch_size=2", "--eval.workers=2"]
tiny, out, scorers = Path(sys.argv[1]), Path(sys.argv[2]), [a for a in sys.argv[3:] if a != "--eval"]
d = P.init_distributed("cpu")
for scorer in scorers:
    t0 = time.perf_counter()
    cfg = C.load_config(
        C.REPO / "configs" / "tiny_mbpp.toml",
        [
            f"--model.path={json.dumps(str(tiny / 'base_meta'))}",
            f"--model.tokenizer={json.dumps(str(tiny / 'tokenizer'))}",
            f"--loss.scorer={scorer}",
            "--train.aux_models=shard",
            "--train.micro_batch_size=4",
            "--train.val_batches=0",
            "--data.max_length=128",
            f"--storage.cache_dir={json.dumps(str(out / 'cache'))}",
            f"--rho1.ref_model={json.dumps(str(tiny / 'ref_hf'))}",
            "--rho1.precompute=true",  # 53 train rows / 4 = 14 chunks of reference forwards
            f"--critic.reward_model={json.dumps(str(tiny / 'rm_hf'))}",
            "--critic.reward_batch_size=8",  # 7 chunks of reward forwards
            "--critic.pretrain_steps=1",
        ],
    )
    base = Path(cfg.model.path)
    tok = data.load_tokenizer(cfg, base)
    net = train.build_model(cfg, d, base)
    train_ds = data.build_dataset(cfg, tok, "train").select(range(TRAIN_ROWS))
    val_ds = data.build_dataset(cfg, tok, "validation")
    pad = tok.pad_token_id
    opt = train.make_optimizer(cfg, net)
    state = score.init_state(cfg, net, tok, d.device, dataset=train_ds)
    shard = {"rank": d.rank, "world_size": d.world_size}
    score.prepare(state, data.make_loader(train_ds, 4, pad, seed=1, **shard))
    st = checkpoint.TrainState(micro_batch=4)
    batch = next(data.make_loader(train_ds, 4, pad, **shard))
    train.optimizer_step(train.Run(cfg, d, net, opt, state, st), batch, 0)
    opt.step()
    val = train.validate(cfg, net, val_ds, pad, d)
    checkpoint.export_model(net, out / scorer, tok, d)
    if d.main:
        print(json.dumps({"scorer": scorer, "val": val, "seconds": time.perf_counter() - t0}), flush=True)
    del net, opt, state

if "--eval" in sys.argv:  # end-of-run evaluation of the first export: 5 problems in batches of 2 (3 batches)
    t0 = time.perf_counter()
    cfg = C.load_config(None, [*EVAL, f"--storage.cache_dir={json.dumps(str(out / 'cache'))}"])
    net = evaluate.load_for_eval(cfg, out / scorers[0], "wmtp", d.device)
    evaluate.evaluate_model(cfg, net, tok, ["mbpp"], 1, 5, out / "eval")
    if d.main:
        print(json.dumps({"eval_seconds": time.perf_counter() - t0}), flush=True)
P.shutdown()
