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


# today's next-token bases and their references (config.json keys as the hub ships them; metadata only)
QWEN25_CODER_7B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944,
    "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 131072, "max_window_layers": 28,
}  # fmt: skip
QWEN25_CODER_05B = {**QWEN25_CODER_7B, "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                    "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                    "tie_word_embeddings": True, "max_window_layers": 24}  # fmt: skip
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE, "hidden_act": "silu",
    "tie_word_embeddings": False, "max_position_embeddings": 131072,
}  # fmt: skip
LLAMA32_1B = {**LLAMA31_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "head_dim": 64, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0}, "tie_word_embeddings": True}  # fmt: skip
# config -> (base, reference, tokenizer kind of tiny.py)
MODERN = {"rho1_qwen25coder_mbpp": (QWEN25_CODER_7B, QWEN25_CODER_05B, "tokenizer_qwen"),
          "rho1_llama31_mbpp": (LLAMA31_8B, LLAMA32_1B, "tokenizer_llama3")}  # fmt: skip


def dry_run(cfg: str, ac: str, world: int, paths: list[str], tmp: str) -> int:
    """`WORLD_SIZE=world python train.py configs/CFG.toml --dry-run` at 80 GB per device, the stand-ins' paths given;
    prints its plan and returns its exit code."""
    args = [f"configs/{cfg}.toml", "--dry-run", f"--model.activation_checkpointing={ac}"]
    print(f"\n$ WORLD_SIZE={world} python train.py {' '.join(args)}")
    env = {**os.environ, "WORLD_SIZE": str(world), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "train.py", *args, *paths, "--train.memory_gb=80"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    print(p.stdout.replace(tmp, "<dir>").rstrip() or p.stderr[-2000:])
    return p.returncode


def main() -> int:
    tiny = REPO / ".cache" / "tiny"
    tok = tiny / "tokenizer"
    if not all((tiny / t).is_dir() for t in ("tokenizer", "tokenizer_qwen", "tokenizer_llama3")):
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
            paths = [f"--model.path={base}", f"--model.tokenizer={tok}", f"--rho1.ref_model={ref}"]
            paths.append(f"--critic.reward_model={rm}")
            rc |= dry_run(cfg, ac, world, paths, tmp) not in (0, 2)
        for cfg, (base_cfg, ref_cfg, kind) in MODERN.items():  # config.json only: the weights are not read
            mbase, mref = Path(tmp, cfg, "base"), Path(tmp, cfg, "ref")
            for d, c in ((mbase, base_cfg), (mref, ref_cfg)):
                d.mkdir(parents=True)
                (d / "config.json").write_text(json.dumps(c))
            for ac in ("true", "false"):
                paths = [
                    f"--model.path={mbase}",
                    f"--model.tokenizer={tiny / kind}",
                    f"--rho1.ref_model={mref}",
                ]
                rc |= dry_run(cfg, ac, 4, paths, tmp) not in (0, 2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
