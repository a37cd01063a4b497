"""`make smoke`: the three algorithms on the tiny models and real MBPP, then one summary table.

Each run is its own `train.py` process (exactly what a user would launch), logging to the embedded MLflow store.
`make smoke FAMILY=qwen2` (`python smoke.py --family qwen2`) runs them on one of today's HF families instead of
the Meta-format base: tiny.py's base_<family> (llama3, qwen2, qwen3, mistral) with its own tokenizer, H=4 heads
added to it, and its HF exports (hf/ in the family's class; no meta/ for these, the run says why). rho1's reference
shares the base's tokenizer: base_qwen3 for qwen2 and base_qwen2 for qwen3 (the Qwen pair), else the base itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from config import load_config

RUNS = [
    ("uniform (baseline)", "configs/tiny_mbpp.toml"),
    ("critic_delta_v1", "configs/tiny_critic_mbpp.toml"),
    ("rho1_excess_v1", "configs/tiny_rho1_mbpp.toml"),
]


FAMILIES = ("llama3", "qwen2", "qwen3", "mistral")  # tiny.py's base_<family>
REFERENCE = {"qwen2": "base_qwen3", "qwen3": "base_qwen2"}  # the same tokenizer; others: the base itself


def family_overrides(family: str, cfg: str) -> list[str]:
    """train.py overrides that put a run on tiny.py's base_<family> (its run name gets the family)."""
    if family not in FAMILIES:
        raise SystemExit(f"smoke.py: --family {family!r}: expected one of {', '.join(FAMILIES)}")
    base, ref = f".cache/tiny/base_{family}", f".cache/tiny/{REFERENCE.get(family, f'base_{family}')}"
    run = f"{load_config(cfg, []).train.run_name}-{family}"
    return [f"--model.path={base}", "--model.format=hf", "--model.tokenizer=", f"--rho1.ref_model={ref}",
            "--rho1.ref_format=hf", f"--train.run_name={run}"]  # fmt: skip


def main(argv: list[str]) -> int:
    family = None
    if "--family" in argv:  # --family NAME: the runs on one of today's HF families
        i = argv.index("--family")
        family, argv = argv[i + 1] if i + 1 < len(argv) else "", argv[:i] + argv[i + 2 :]
    rows = []
    for name, cfg in RUNS:
        args = [*(family_overrides(family, cfg) if family is not None else []), *argv]
        print(f"\n=== {name}: python train.py {cfg} {' '.join(args)}", flush=True)
        t0 = time.perf_counter()
        # --overwrite: `make smoke` again trains the runs again (a finished run is never deleted without it)
        subprocess.run([sys.executable, "train.py", cfg, *args, "--overwrite"], check=True)
        run = load_config(cfg, [a for a in args if a.startswith("--")]).train.run_name
        summary = json.loads((Path("runs") / run / "summary.json").read_text())
        rows.append((name, summary, time.perf_counter() - t0))
    print("\n=== smoke summary (tiny random-init models: pass rates are expected to be ~0)")
    print(
        f"{'algorithm':<18} {'val loss start':>14} {'final':>8} {'w mean':>7} {'w std':>7} {'w min':>7} {'w max':>7} "
        f"{'mbpp pass@1':>11} {'time':>6}"
    )
    ok = True
    for name, s, dt in rows:
        w = s.get("weights", {})
        ev = s.get("eval", {})
        print(
            f"{name:<18} {s['first_val_loss']:>14.4f} {s['final_val_loss']:>8.4f} {w.get('weights/mean', 1):>7.3f} "
            f"{w.get('weights/std', 0):>7.3f} {w.get('weights/min', 1):>7.3f} {w.get('weights/max', 1):>7.3f} "
            f"{ev.get('mbpp/pass_at_1', float('nan')):>11.3f} {dt:>5.0f}s"
        )
        ok &= s["final_val_loss"] < s["first_val_loss"]
    print(
        "validation loss decreased for every algorithm" if ok else "WARNING: validation loss did not decrease"
    )
    print("MLflow UI: .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
