"""The Python pieces of scripts/gpu_check.sh (kept here so they can be read, and run on tiny shapes on a CPU).

    python scripts/gpu_check.py base OUT --tokenizer DIR [--dim 2048 --layers 20 --heads 16 --seq 2048 --device cuda]
    python scripts/gpu_check.py ref OUT --from TINY/ref_hf --tokenizer DIR
    python scripts/gpu_check.py report RUNS_DIR RUN [RUN ...]

`base`: a random-init MTP model (H=4, vocab 32000) written in Meta's layout with a bf16 consolidated.pth, as
Meta ships 7B_1T_4, and the tokenizer beside it. `ref`: the tiny HF reference with that tokenizer saved beside it
(rho1 checks that both tokenizers agree). `report`: one line per run from its metrics.jsonl, summary.json and
checkpoint: steps, tokens/s per GPU and MFU (median of the logged windows after the first, which holds the
warm-up; both count what train.py logs since issue 22: input positions the trunk ran on, FLOPs the steps computed,
over the steps' time only), peak memory, validation loss, MBPP pass@1, and the dtype of the master weights in
checkpoints/latest; then the chunked vs unchunked CE (runs uniform / unchunked) and compile on/off (compiled /
uniform) ratios, and the MFU goal of issue 22.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def make_base(a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer

    import formats
    import model as M

    args = M.ModelArgs(
        dim=a.dim, n_layers=a.layers, n_heads=a.heads, vocab_size=32000, n_future_tokens=4, max_seq_len=a.seq
    )
    out = Path(a.out)
    params = out / "params.json"
    if params.is_file() and M.ModelArgs.from_dict(json.loads(params.read_text()), str(params)) == args:
        print(f"base: {out} exists ({M.count_params_from_args(args) / 1e9:.2f}B parameters)")
        return
    torch.manual_seed(0)
    with torch.device(a.device):
        net = M.Transformer(args)
    formats.save_meta(net.to(torch.bfloat16), out)
    AutoTokenizer.from_pretrained(a.tokenizer).save_pretrained(str(out))
    n = M.count_params(net) / 1e9
    print(
        f"base: random-init MTP, {n:.2f}B parameters, dim {a.dim}, {a.layers} blocks, H=4, bf16 Meta layout -> {out}"
    )


def make_ref(a: argparse.Namespace) -> None:
    from transformers import AutoTokenizer

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(getattr(a, "from")) / name, out / name)
    AutoTokenizer.from_pretrained(a.tokenizer).save_pretrained(str(out))
    print(f"ref: {getattr(a, 'from')} with the tokenizer {a.tokenizer} -> {out}")


def master_dtypes(ckpt: Path) -> str:
    """The dtypes of the model tensors in a torch.distributed.checkpoint (from its metadata, no tensor read)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(ckpt / "dcp")).read_metadata().state_dict_metadata
    dtypes = {
        str(m.properties.dtype).replace("torch.", "") for k, m in meta.items() if k.startswith("model.")
    }
    return ",".join(sorted(dtypes)) or "?"


MFU_GOAL = 0.35  # issue 22: the 1.2B model in bf16 on an H100/H200-class GPU


def perf_of(run: Path) -> tuple[list[dict], float, float | None, float]:
    """(metrics rows, tokens/s per GPU, MFU or None, peak memory GB): medians of the logged windows after the
    first (which holds compilation and allocator warm-up)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    perf = [r for r in rows if "perf/tokens_per_s_per_device" in r]
    steady = perf[1:] or perf
    tps = statistics.median(r["perf/tokens_per_s_per_device"] for r in steady) if steady else float("nan")
    mfu = [r["perf/mfu"] for r in steady if "perf/mfu" in r]
    mem = max((r.get("perf/peak_mem_gb", 0.0) for r in perf), default=0.0)
    return rows, tps, statistics.median(mfu) if mfu else None, mem


def run_line(run: Path) -> str:
    rows, tps, mfu, mem = perf_of(run)
    s = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    pass1 = (s.get("eval") or {}).get("mbpp/pass_at_1")
    val = f"{s['first_val_loss']:.3f} -> {s['final_val_loss']:.3f}" if s.get("final_val_loss") else "-"
    cols = [
        run.name,
        str(len(rows)),
        f"{tps:,.0f}",
        "-" if mfu is None else f"{mfu * 100:.1f}%",
        f"{mem:.1f} GB" if mem else "-",
        val,
        "-" if pass1 is None else f"{pass1:.3f}",
        master_dtypes(run / "checkpoints" / "latest"),
    ]
    return "| " + " | ".join(cols) + " |"


def gb(x: float) -> str:
    return f"{x:.1f} GB" if x else "- (CPU)"


def report(a: argparse.Namespace) -> None:
    print("| run | steps | tokens/s/GPU | MFU | peak memory | val loss | MBPP pass@1 | masters |")
    print("|---|---|---|---|---|---|---|---|")
    for name in a.runs:
        run = Path(a.runs_dir) / name
        print(run_line(run) if (run / "metrics.jsonl").is_file() else f"| {name} | did not run |")
    done = {
        n: perf_of(Path(a.runs_dir) / n) for n in a.runs if (Path(a.runs_dir) / n / "metrics.jsonl").is_file()
    }
    if "uniform" in done and "unchunked" in done:
        (_, t1, _, m1), (_, t0, _, m0) = done["uniform"], done["unchunked"]
        print(f"CE chunked / unchunked: tokens/s x{t1 / t0:.3f}, peak memory {gb(m1)} / {gb(m0)}")
    if "uniform" in done and "compiled" in done:
        (_, t1, _, m1), (_, tc, _, mc) = done["uniform"], done["compiled"]
        print(f"model.compile on / off: tokens/s x{tc / t1:.3f}, peak memory {gb(mc)} / {gb(m1)}")
    best = max((v[2] for v in done.values() if v[2] is not None), default=None)
    if best is None:
        print(f"MFU goal >= {MFU_GOAL:.0%}: not measured (no known GPU peak on this device)")
    else:
        print(f"MFU goal >= {MFU_GOAL:.0%}: best stage {best:.1%}, {'met' if best >= MFU_GOAL else 'MISSED'}")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("base")
    b.add_argument("out")
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--dim", type=int, default=2048)
    b.add_argument("--layers", type=int, default=20)
    b.add_argument("--heads", type=int, default=16)
    b.add_argument("--seq", type=int, default=2048)
    b.add_argument("--device", default="cuda")
    r = sub.add_parser("ref")
    r.add_argument("out")
    r.add_argument("--from", required=True)
    r.add_argument("--tokenizer", required=True)
    p = sub.add_parser("report")
    p.add_argument("runs_dir")
    p.add_argument("runs", nargs="+")
    a = ap.parse_args(argv)
    {"base": make_base, "ref": make_ref, "report": report}[a.cmd](a)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
