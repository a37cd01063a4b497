"""MTP training-step benchmark: time and peak memory of H=4 vs H=1, memory-efficient vs naive, rho1 per scope.

Why: the paper's claim (spec §1) is that the head-by-head schedule keeps peak memory flat in H; this measures it.

Configurations (same total number of transformer blocks, Meta's parameter matching: the H=4 trunk has 3 fewer):
  h1        H=1, memory-efficient step (mtp_loss_backward)
  h4        H=4, memory-efficient step; also times rho1's extra no-grad pass over the heads (mtp_head_ce)
  h4_naive  H=4, all heads' logits at once (naive_mtp_loss)
  rho1_head H=4, rho1 weights with loss.normalize = "head": each head weighted from the CE of its own
            forward inside the head-by-head step (spec §3.3: no extra pass)
  rho1_seq  H=4, rho1 weights with loss.normalize = "sequence": the extra no-grad pass over every head first,
            then the joint weights, then the step
Both rho1 configurations include the weighting itself (excess against a fixed reference CE, z-score, softmax,
top-p boost, clip-normalise); the reference model's forward is the same for both and left out.
A step = trunk forward + loss + backward (no optimizer). Each configuration runs in a fresh subprocess, one warm-up
step, then `--repeats` timed steps (median). Peak memory is the step's high-water mark above the memory held
before the timed steps (parameters, their pre-allocated gradients, data): on CPU the Linux VmHWM of the process,
reset through /proc/self/clear_refs after the warm-up and read from /proc/self/status (falls back to
getrusage ru_maxrss, which cannot be reset, when clear_refs is unavailable); on CUDA torch.cuda.max_memory_allocated
after reset_peak_memory_stats. Large tensors are mmap'd by glibc and returned on free, so RSS tracks tensor memory.

    .venv/bin/python bench/mtp_step.py [--device cuda] [--dim 256 --blocks 8 --seq 256 --batch 4 --vocab 32000]

Sample output 1: defaults on CPU, `--repeats 5`, the idle 2-core machine (2026-11-29):

    device=cpu dtype=float32 dim=256 blocks=8 seq=256 batch=4 vocab=32000 repeats=5; peak memory: VmHWM (reset via clear_refs)
    config      H trunk     params  step median      min  peak above baseline
    h1          1     7 22,810,880      0.718 s  0.663 s            554.5 MiB
    h4          4     4 22,810,880      2.055 s  1.938 s            496.5 MiB
    h4_naive    4     4 22,810,880      2.054 s  1.964 s           1604.2 MiB
    rho1_head   4     4 22,810,880      2.015 s  2.003 s            511.2 MiB
    rho1_seq    4     4 22,810,880      2.789 s  2.473 s            497.5 MiB
    (a) H=4 / H=1 (efficient): time x2.86, peak x0.90 (goal <= 1.10)
    (b) naive / efficient at H=4: time x1.00, peak x3.23; naive extra peak 1107.7 MiB
        = 4.43 x one head's logits+grad (250.0 MiB)
        = 2.95 x one head's CE footprint (375.0 MiB: logits, fp32 log-softmax, fp32 grad); expected ~ H-1 = 3
    rho1 extra no-grad head pass: 0.709 s = 34.5% of an H=4 step here (small dim: logits dominate); FLOP estimate for Meta 7B_1T_4 at seq 2048: 6.2%
    (c) rho1 step, scope head / sequence: time x0.72 (2.015 s vs 2.789 s: the per-head scope saves 28%), peak x1.03
    total wall time 78 s

Sample output 2 (before the rho1 rows existed): one NVIDIA H200, torch 2.11 (`--device cuda --dtype bfloat16 --dim 2048 --n-heads 16 --seq 2048
--repeats 5`). The H=4/H=1 time ratio is the FLOP ratio (4 output projections of 32000 x 2048 instead of 1):

    device=cuda dtype=bfloat16 dim=2048 blocks=8 seq=2048 batch=4 vocab=32000 repeats=5; peak memory: cuda.max_memory_allocated
    config      H trunk     params  step median      min  peak above baseline
    h1          1     7 535,857,152      0.075 s  0.074 s           9040.6 MiB
    h4          4     4 535,857,152      0.106 s  0.104 s           6886.4 MiB
    h4_naive    4     4 535,857,152      0.097 s  0.096 s          18341.6 MiB
    (a) H=4 / H=1 (efficient): time x1.41, peak x0.76 (goal <= 1.10)
    (b) naive / efficient at H=4: time x0.91, peak x2.66; naive extra peak 11455.3 MiB
        = 11.46 x one head's logits+grad (1000.0 MiB)
        = 2.86 x one head's CE footprint (4000.0 MiB: logits, fp32 log-softmax, fp32 grad, fp32 upcast, bf16 grad); expected ~ H-1 = 3
    rho1 extra no-grad head pass: 0.026 s = 24.1% of an H=4 step here (small dim: logits dominate); FLOP estimate for Meta 7B_1T_4 at seq 2048: 6.2%
    total wall time 66 s
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CONFIGS = {
    "h1": (1, "efficient"),
    "h4": (4, "efficient"),
    "h4_naive": (4, "naive"),
    "rho1_head": (4, "rho1_head"),
    "rho1_seq": (4, "rho1_seq"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--blocks", type=int, default=8, help="total transformer blocks (trunk + heads)")
    p.add_argument("--n-heads", type=int, default=4, help="attention heads")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=4, help="H of the MTP configurations")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--ce-chunk", type=int, default=1024, help="positions per chunk of a head's CE (model.ce_chunk)"
    )
    p.add_argument(
        "--part",
        default="all",
        choices=["all", "heads", "chunk"],
        help="heads: H=4 vs H=1, naive, rho1 scopes; chunk: chunked vs unchunked CE at --vocabs",
    )
    p.add_argument("--vocabs", default="32000,151936", help="part chunk: vocabularies, comma-separated")
    p.add_argument(
        "--chunk-dim", type=int, default=64, help="part chunk: model width (the issue's tiny trunk)"
    )
    p.add_argument("--chunk-trunk", type=int, default=2, help="part chunk: trunk blocks (plus H head blocks)")
    p.add_argument("--chunk-seq", type=int, default=512, help="part chunk: packed row length")
    p.add_argument("--chunk-batch", type=int, default=8, help="part chunk: micro-batch")
    p.add_argument(
        "--no-chunk-rho1",
        dest="chunk_rho1",
        action="store_false",
        help="part chunk: skip the rows with CE-dependent (rho1 per head) weights",
    )
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# child: one configuration in a fresh process


def _proc_status(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class PeakMeter:
    """Peak memory above a baseline: CUDA allocator stats, or the process RSS high-water mark on CPU."""

    def __init__(self, device: str):
        import torch

        self.torch, self.device = torch, device
        self.method = "cuda.max_memory_allocated" if device == "cuda" else "ru_maxrss"

    def start(self) -> None:
        torch = self.torch
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM (reset via clear_refs)"
            self.base = _proc_status("VmRSS") or 0
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def peak(self) -> int:
        if self.device == "cuda":
            self.torch.cuda.synchronize()
            return self.torch.cuda.max_memory_allocated() - self.base
        if self.method.startswith("VmHWM"):
            return (_proc_status("VmHWM") or 0) - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base


def run_child(a: argparse.Namespace) -> dict:
    import torch

    import model as M
    import score

    H, path = CONFIGS[a.child]
    H = a.heads if H > 1 else 1
    torch.manual_seed(0)
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    args = M.ModelArgs(dim=a.dim, n_layers=a.blocks, n_heads=a.n_heads, vocab_size=a.vocab, n_future_tokens=H,
                       multiple_of=64, max_seq_len=a.seq)  # fmt: skip
    model = M.Transformer(args).to(dev, dtype).train()
    for (
        p
    ) in model.parameters():  # gradients live before the baseline: the peak is the step's transient memory
        p.grad = torch.zeros_like(p)
    ids = torch.randint(0, a.vocab, (a.batch, a.seq), device=dev)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, : a.seq // 8] = False  # a short prompt
    targets, valid = M.mtp_targets(ids, mask, H)
    weights = valid.float()
    ref_ce = torch.rand(valid.shape, device=dev) * 8  # a reference's CE of each pair's target (fixed)

    def rho1(excess: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # spec §3.3 defaults, then lam = 0.3
        w = score.rho1_weights(excess, v, 0.7, 0.05, 3.0, "weighted", 0.2, 1.0, scope="sequence")
        return score.mix(w, 0.3, v).to(dev)

    def sync() -> None:
        if a.device == "cuda":
            torch.cuda.synchronize()

    def step() -> None:
        if path == "naive":
            M.naive_mtp_loss(model, ids, targets, valid, weights).backward()
            return
        h = model(ids, stage="trunk")
        if path == "rho1_head":  # head k weighted from its own CE, inside the head loop
            w = lambda k, ce: rho1(ce - ref_ce[..., k], valid[..., k])  # noqa: E731
        elif path == "rho1_seq":  # every head's CE first (no grad), then all weights jointly
            ce = M.mtp_head_ce(model, h.detach(), targets, valid, chunk=a.ce_chunk)
            w = rho1(ce - ref_ce, valid)
        else:
            w = weights
        M.mtp_loss_backward(model, h, targets, valid, w, chunk=a.ce_chunk)

    step()  # warm-up
    meter = PeakMeter(a.device)
    meter.start()
    times = []
    for _ in range(a.repeats):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = meter.peak()
    out = {"name": a.child, "H": H, "step_s": statistics.median(times), "times": times, "peak": peak}
    out |= {"mem_method": meter.method, "params": M.count_params(model), "trunk_blocks": args.n_trunk}
    if path == "efficient" and H > 1:  # rho1: one extra no-grad forward of every head's logits
        with torch.no_grad():
            h = model(ids, stage="trunk")
        ce_times = []
        for _ in range(a.repeats):
            sync()
            t0 = time.perf_counter()
            M.mtp_head_ce(model, h, targets, valid, chunk=a.ce_chunk)
            sync()
            ce_times.append(time.perf_counter() - t0)
        out["rho1_pass_s"] = statistics.median(ce_times)
    return out


# ---------------------------------------------------------------------------------------------------------------
# parent: run the configurations side by side and compare


def rho1_share_7b(seq: int = 2048) -> float:
    """rho1's extra pass (forward of every head block + output) as a % of a 7B_1T_4 training step, by FLOPs."""
    import model as M

    a = M.ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000, n_future_tokens=4)
    per_block = 4 * a.dim * a.dim + 3 * a.dim * a.hidden_dim
    extra = a.n_future_tokens * (2 * (per_block + a.dim * a.vocab_size) + 4 * a.dim * seq)
    return 100 * extra / M.flops_per_token(a, seq)


def mb(x: float) -> str:
    return f"{x / 2**20:8.1f} MiB"


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.child.startswith("chunk:"):
        chunk_worker(a)
        return
    if a.child:
        print(json.dumps(run_child(a)))
        return
    base_argv = list(argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    if a.part in ("all", "heads"):
        bench_heads(a, base_argv)
    if a.part in ("all", "chunk"):
        if a.device != "cpu":
            sys.exit("--part chunk measures the process RSS: CPU only (--device cpu)")
        bench_chunks(a, base_argv)
    print(f"total wall time {time.time() - t0:.0f} s")


def bench_heads(a: argparse.Namespace, base_argv: list[str]) -> None:
    """H=4 vs H=1, efficient vs naive, rho1 scopes: one fresh process per configuration."""
    res = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, *base_argv, "--child", name]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            sys.exit(f"configuration {name} failed:\n{proc.stderr[-3000:]}")
        res[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    h1, h4, nv, rh, rs = (res[k] for k in CONFIGS)
    H = h4["H"]
    elt = 2 if a.dtype == "bfloat16" else 4
    n_pos = a.batch * a.seq
    one_head = n_pos * a.vocab * elt * 2  # one head's logits and their gradient, in the model dtype
    # what the CE really holds per head: logits, fp32 log-softmax (kept for backward), fp32 grad; in bf16 also
    # the fp32 upcast of the logits and the bf16 gradient
    ce_head = n_pos * a.vocab * (3 * 4 + (2 * elt if elt != 4 else 0))
    print(f"device={a.device} dtype={a.dtype} dim={a.dim} blocks={a.blocks} seq={a.seq} batch={a.batch} "
          f"vocab={a.vocab} repeats={a.repeats}; peak memory: {h1['mem_method']}")  # fmt: skip
    print(
        f"{'config':<10} {'H':>2} {'trunk':>5} {'params':>10} {'step median':>12} {'min':>8} {'peak above baseline':>20}"
    )
    for r in (h1, h4, nv, rh, rs):
        print(f"{r['name']:<10} {r['H']:>2} {r['trunk_blocks']:>5} {r['params']:>10,} {r['step_s']:>10.3f} s {min(r['times']):>6.3f} s {mb(r['peak']):>20}")  # fmt: skip
    print(f"(a) H={H} / H=1 (efficient): time x{h4['step_s'] / h1['step_s']:.2f}, "
          f"peak x{h4['peak'] / h1['peak']:.2f} (goal <= 1.10)")  # fmt: skip
    extra = nv["peak"] - h4["peak"]
    print(f"(b) naive / efficient at H={H}: time x{nv['step_s'] / h4['step_s']:.2f}, "
          f"peak x{nv['peak'] / h4['peak']:.2f}; naive extra peak {mb(extra).strip()}\n"
          f"    = {extra / one_head:.2f} x one head's logits+grad ({mb(one_head).strip()})\n"
          f"    = {extra / ce_head:.2f} x one head's CE footprint ({mb(ce_head).strip()}: logits, fp32 log-softmax, "
          f"fp32 grad{', fp32 upcast, bf16 grad' if elt != 4 else ''}); expected ~ H-1 = {H - 1}")  # fmt: skip
    pct = 100 * h4["rho1_pass_s"] / h4["step_s"]
    print(f"rho1 extra no-grad head pass: {h4['rho1_pass_s']:.3f} s = {pct:.1f}% of an H={H} step here (small dim: "
          f"logits dominate); FLOP estimate for Meta 7B_1T_4 at seq 2048: {rho1_share_7b():.1f}%")  # fmt: skip
    print(f"(c) rho1 step, scope head / sequence: time x{rh['step_s'] / rs['step_s']:.2f} "
          f"({rh['step_s']:.3f} s vs {rs['step_s']:.3f} s: the per-head scope saves "
          f"{100 * (1 - rh['step_s'] / rs['step_s']):.0f}%), peak x{rh['peak'] / rs['peak']:.2f}")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# part "chunk": a head's CE in chunks of positions vs all of its logits at once (issue 22), at 32k and 152k


CHUNK_ROWS = (("uniform", "known"), ("rho1 per head", "ce"))  # weights known before the head / from its CE


def chunk_worker(a: argparse.Namespace) -> None:
    """One (vocabulary, chunk, weights) configuration kept alive in its own process: the parent sends "step" on
    stdin, the worker runs one training step (trunk forward, the head-by-head loss and backward, AdamW) and
    answers its time and the process's memory as a JSON line. Its own process, so its peak RSS is its own."""
    import torch

    import model as M
    import score

    vocab, chunk, weights = a.child.split(":")[1:]
    vocab, chunk = int(vocab), int(chunk)
    torch.manual_seed(0)
    H = a.heads
    args = M.ModelArgs(dim=a.chunk_dim, n_layers=a.chunk_trunk + H, n_heads=4, vocab_size=vocab,
                       n_future_tokens=H, multiple_of=64, max_seq_len=a.chunk_seq)  # fmt: skip
    model = M.Transformer(args).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (a.chunk_batch, a.chunk_seq))
    targets, valid = M.mtp_targets(ids, torch.ones_like(ids, dtype=torch.bool), H)  # packed rows
    ref_ce = torch.rand(valid.shape) * 8

    def rho1(k: int, ce: torch.Tensor) -> torch.Tensor:  # spec §3.3 defaults on the head's own excess CE
        v = valid[..., k]
        return score.rho1_weights(
            ce - ref_ce[..., k], v, 0.7, 0.05, 3.0, "weighted", 0.2, 1.0, scope="sequence"
        )

    w = valid.float() if weights == "known" else rho1

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        M.mtp_loss_backward(model, model(ids, stage="trunk"), targets, valid, w, chunk=chunk)
        opt.step()

    def status() -> dict:
        return {"rss": _proc_status("VmRSS"), "hwm": _proc_status("VmHWM")}

    print(json.dumps({"ready": True, **status()}), flush=True)
    for line in sys.stdin:
        if line.strip() != "step":
            break
        gc.collect()
        before = status()["rss"]
        t0 = time.perf_counter()
        step()
        print(json.dumps({"t": time.perf_counter() - t0, "before": before, **status()}), flush=True)


class Worker:
    """A chunk_worker subprocess and its answers."""

    def __init__(self, base_argv: list[str], vocab: int, chunk: int, weights: str):
        cmd = [sys.executable, __file__, *base_argv, "--child", f"chunk:{vocab}:{chunk}:{weights}"]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
                                  env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
        self.start = self._answer()
        self.steps: list[dict] = []

    def _answer(self) -> dict:
        line = self.p.stdout.readline()
        if not line:
            sys.exit(f"worker {self.p.args[-1]} died (exit {self.p.wait()})")
        return json.loads(line)

    def step(self) -> dict:
        self.p.stdin.write("step\n")
        self.p.stdin.flush()
        self.steps.append(self._answer())
        return self.steps[-1]

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait()


def bench_chunks(a: argparse.Namespace, base_argv: list[str]) -> None:
    """Per vocabulary and weights: the chunked and the unchunked step in two live processes, stepped alternately
    (one warm-up step each, then `--repeats` pairs): the median of the per-pair time ratios, and each process's
    peak RSS over all its steps (the whole process: interpreter, torch, model, optimizer, data)."""
    vocabs = [int(v) for v in a.vocabs.split(",")]
    print(f"chunked vs unchunked CE: H={a.heads}, dim {a.chunk_dim}, {a.chunk_trunk} trunk blocks + {a.heads} head "
          f"blocks, packed rows of {a.chunk_seq} tokens, micro-batch {a.chunk_batch}, fp32 on CPU, chunk "
          f"{a.ce_chunk} positions; a step = trunk + head-by-head loss and backward + AdamW; {a.repeats} alternating "
          f"pairs after a warm-up each")  # fmt: skip
    print(f"{'vocab':>7} {'weights':<14} {'unchunked':>10} {'chunked':>10} {'time ratio':>10} {'range':>12} "
          f"{'peak RSS unchunked':>19} {'chunked':>8} {'goal':>18}")  # fmt: skip
    for vocab in vocabs:
        for label, weights in CHUNK_ROWS:
            if weights == "ce" and not a.chunk_rho1:
                continue
            whole, chunked = (
                Worker(base_argv, vocab, 0, weights),
                Worker(base_argv, vocab, a.ce_chunk, weights),
            )
            whole.step(), chunked.step()  # warm-up
            ratios = []
            for _ in range(a.repeats):
                t_whole, t_chunked = whole.step()["t"], chunked.step()["t"]
                ratios.append(t_chunked / t_whole)
            whole.close(), chunked.close()
            med = lambda w: statistics.median(s["t"] for s in w.steps[1:])  # noqa: E731
            peak = lambda w: max(s["hwm"] for s in w.steps) / 1e9  # noqa: E731
            ratio = statistics.median(ratios)
            goal = ""
            if vocab > 100_000 and weights == "known":
                met = peak(chunked) < 2.0 and ratio <= 1.05
                goal = f"{'met' if met else 'NOT met'} (<2.0 GB, <=1.05x)"
            print(f"{vocab:>7} {label:<14} {med(whole):>8.2f} s {med(chunked):>8.2f} s {ratio:>9.2f}x "
                  f"{min(ratios):>5.2f}-{max(ratios):.2f}x {peak(whole):>16.2f} GB {peak(chunked):>5.2f} GB "
                  f"{goal:>18}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
