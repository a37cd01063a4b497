"""Print train.py's --dry-run memory plan (plan.py) for the shipped 7B configs on 4 x A100 80GB, with no weights on
disk.

Writes metadata-only stand-ins (Meta's 7B_1T_4 params.json, HF config.json files of a Sheared-LLaMA-1.3B-class
reference and reward model) and the tiny tokenizer into a temp dir, then runs `train.py CONFIG --dry-run` with
WORLD_SIZE=4.
The README quotes this output:  python scripts/plan_7b.py
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
META_7B_1T_4 = {
    "dim": 4096,
    "n_layers": 32,
    "n_heads": 32,
    "vocab_size": 32000,
    "multiple_of": 256,
    "norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "n_future_tokens": 4,
}
REF_1_3B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 2048,
    "intermediate_size": 5504,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "max_position_embeddings": 4096,
}


def main() -> int:
    tok = REPO / ".cache" / "tiny" / "tokenizer"
    if not tok.is_dir():
        subprocess.run([sys.executable, "tiny.py", "--out", ".cache/tiny"], cwd=REPO, check=True)
    rc = 0
    with tempfile.TemporaryDirectory() as tmp:
        base, ref, rm = Path(tmp, "7B_1T_4"), Path(tmp, "ref_1.3b"), Path(tmp, "reward_1.3b")
        for d in (base, ref, rm):
            d.mkdir()
        (base / "params.json").write_text(json.dumps(META_7B_1T_4))
        (ref / "config.json").write_text(json.dumps(REF_1_3B))
        reward = {**REF_1_3B, "architectures": ["LlamaForSequenceClassification"], "num_labels": 1}
        (rm / "config.json").write_text(json.dumps(reward))  # --dry-run checks that every input is there
        runs = [
            (cfg, ac, 4) for cfg in ("baseline_mbpp", "critic_mbpp", "rho1_mbpp") for ac in ("true", "false")
        ]
        for cfg, ac, world in [*runs, ("rho1_mbpp", "true", 1)]:  # the last plan must be refused
            args = [f"configs/{cfg}.toml", "--dry-run", f"--model.activation_checkpointing={ac}"]
            print(f"\n$ WORLD_SIZE={world} python train.py {' '.join(args)}")
            paths = [f"--model.path={base}", f"--model.tokenizer={tok}", f"--rho1.ref_model={ref}"]
            paths.append(f"--critic.reward_model={rm}")
            env = {**os.environ, "WORLD_SIZE": str(world), "HF_HUB_OFFLINE": "1"}
            cmd = [sys.executable, "train.py", *args, *paths, "--train.memory_gb=80"]
            p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            print(p.stdout.replace(tmp, "<dir>").rstrip() or p.stderr[-2000:])
            rc |= p.returncode not in (0, 2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
