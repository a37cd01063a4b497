"""`make smoke`: the three algorithms on the tiny models and real MBPP, then one summary table.

Each run is its own `train.py` process (exactly what a user would launch), logging to the embedded MLflow store.
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


def main(argv: list[str]) -> int:
    rows = []
    for name, cfg in RUNS:
        print(f"\n=== {name}: python train.py {cfg} {' '.join(argv)}", flush=True)
        t0 = time.perf_counter()
        # --overwrite: `make smoke` again trains the runs again (a finished run is never deleted without it)
        subprocess.run([sys.executable, "train.py", cfg, *argv, "--overwrite"], check=True)
        run = load_config(cfg, [a for a in argv if a.startswith("--")]).train.run_name
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
