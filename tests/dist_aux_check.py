"""Launched by tests/test_distributed.py under `torchrun --nproc_per_node=2` (CPU, gloo): TINY_DIR CACHE_DIR.

train.aux_models = "shard" makes every reference / reward forward a collective. Checks the paths where the ranks'
work differs, against the replicated model in the same process: the rho1 precompute split over the ranks (an odd
chunk count: one rank runs an idle forward), the lazy fill where only one rank misses the cache, the reward model
with texts on one rank only and split over the train set, and `shard_frozen` on our own Transformer.
A rank that skipped its share would leave the other inside a collective: gloo errors or the test's timeout.
"""

import copy
import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

import config as C
import model as M
import parallel as P
import score

tiny, cache = Path(sys.argv[1]), sys.argv[2]
d = P.init_distributed("cpu")
tok = AutoTokenizer.from_pretrained(str(tiny / "tokenizer"))
policy = M.Transformer(M.ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=len(tok), multiple_of=16))


def state(scorer: str, aux: str, dataset=None) -> score.ScorerState:
    cfg = C.load_config(
        None,
        [
            f"--loss.scorer={scorer}",
            f"--train.aux_models={aux}",
            "--train.micro_batch_size=2",
            f"--rho1.ref_model={tiny / 'ref_hf'}",
            "--rho1.precompute=true",
            f"--storage.cache_dir={cache}/{aux}",
            f"--critic.reward_model={tiny / 'rm_hf'}",
            "--critic.reward_batch_size=2",
        ],
    )
    return score.init_state(cfg, policy, tok, "cpu", dataset=dataset)


# 5 rows of different lengths, the same on both ranks: 3 chunks of 2, so rank 1 makes one idle forward
g = torch.Generator().manual_seed(0)
rows = [torch.randint(3, len(tok), (n,), generator=g).tolist() for n in (9, 5, 12, 7, 4)]
ds = {
    "index": list(range(5)),
    "input_ids": rows,
    "loss_mask": [[True] * len(r) for r in rows],
    "task_id": [-1] * 5,
}
sh, rep = state("rho1_excess_v1", "shard", ds), state("rho1_excess_v1", "replicate", ds)
assert sh.aux_sharded and not rep.aux_sharded


def sharded(m: torch.nn.Module) -> bool:
    """Each rank holds a part of every parameter with a row per rank (DTensor numel() is the global size)."""
    return all(p.to_local().numel() < p.numel() for p in m.parameters() if p.shape[0] >= d.world_size)


assert sharded(sh.reference.model), "reference not sharded"
score.prepare(sh, None)  # precompute split over the ranks + all-gather
for i, r in enumerate(rows):
    want = rep.reference.token_ce(torch.tensor([r]))[0]
    torch.testing.assert_close(sh.reference.ce[i], want, rtol=1e-5, atol=1e-5)
# lazy fill: only rank 0's batch misses the cache; rank 1 must still join the forward
ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
batch = {"input_ids": ids, "index": torch.tensor([100 if d.rank == 0 else 1])}
got = sh.reference.of_batch(batch)
if d.rank == 0:
    want = rep.reference.token_ce(ids)[0]
else:
    want = torch.zeros(6)
    want[:5] = rep.reference.token_ce(torch.tensor([rows[1]]))[0]
torch.testing.assert_close(got[0], want, rtol=1e-5, atol=1e-5)

# reward model: 3 texts on rank 0, none on rank 1 (2 forwards on rank 0 -> 2 idle forwards on rank 1)
csh, crep = state("critic_delta_v1", "shard"), state("critic_delta_v1", "replicate")
texts = ["def f(x):\n    return x + 1\n", "print('hi')", "x = [i * i for i in range(9)]"]
mine = texts if d.rank == 0 else []
torch.testing.assert_close(
    torch.tensor(csh.rewards.model_rewards(mine)), torch.tensor(crep.rewards.model_rewards(mine))
)
assert sharded(csh.rewards.model), "reward model not sharded"
# rewards of the whole train set split over the ranks (odd chunk count: idle forward) and gathered
rrows = [(i, r, [True] * len(r), -1) for i, r in enumerate(rows)]
csh.rewards.compute(rrows, split=True)
crep.rewards.compute(rrows)
torch.testing.assert_close(
    torch.tensor([csh.rewards.values[i] for i in range(5)]),
    torch.tensor([crep.rewards.values[i] for i in range(5)]),
)

# our own Transformer (blocks = layers + extra_heads) sharded as a frozen model
torch.manual_seed(0)
net = M.Transformer(
    M.ModelArgs(dim=32, n_layers=4, n_heads=4, vocab_size=64, multiple_of=16, n_future_tokens=3)
)
full = copy.deepcopy(net).eval()
P.shard_frozen(net, P.aux_blocks(net), bf16=False, device=torch.device("cpu"))
x = torch.randint(0, 64, (2, 7 + d.rank))
with torch.no_grad():
    torch.testing.assert_close(net(x), full(x))
print(f"[rank {d.rank}] aux sharding ok", flush=True)
P.shutdown()
