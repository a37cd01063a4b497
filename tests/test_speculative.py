"""Self-speculative decoding (generate.py: model.generate(..., speculative=True), generate.decode): exact
accept/resample step, greedy output identical to plain greedy, the sampled distribution equal to plain sampling,
cache rollback, evaluate.py."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

import formats
import generate as G
import model as M

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPTS = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7], [7], [2, 7, 1, 8, 2, 8, 1, 8, 2]]  # left padding


def chi2_pvalue(counts: list[tuple[int, ...]]) -> float:
    """p-value of Pearson's chi-square test that every column of counts (one tuple per cell) has the same
    distribution; cells with fewer than 10 counts in all are pooled into one."""
    cols = len(counts[0])
    cells = [c for c in counts if sum(c) >= 10]
    pooled = tuple(sum(c[j] for c in counts if sum(c) < 10) for j in range(cols))
    cells += [pooled] if sum(pooled) else []
    total = [sum(c[j] for c in cells) for j in range(cols)]
    n = sum(total)
    stat = sum(
        (c[j] - sum(c) * total[j] / n) ** 2 / (sum(c) * total[j] / n) for c in cells for j in range(cols)
    )
    df = (len(cells) - 1) * (cols - 1)
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)).item()


def sticky_model(H: int, seed: int = 1) -> M.Transformer:
    """A random tiny model whose extra heads copy head 1 (they draft "the next token again") and whose output
    leans a little towards the input embedding: greedy runs repeat tokens for a while, so drafts are accepted
    in runs and rejected at their ends. Attention is full strength, so a stale cache entry shows in the logits."""
    torch.manual_seed(seed)
    args = M.ModelArgs(dim=64, n_layers=H + 2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32,
                       n_future_tokens=H, max_seq_len=128)  # fmt: skip
    m = M.Transformer(args)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
        for block in m.extra_heads:
            block.load_state_dict(m.layers[-1].state_dict())
        m.output.weight.mul_(0.85).add_(0.15 * m.tok_embeddings.weight)
    return m.eval()


def counting_model(H: int, wrong: tuple[int, ...] = (), V: int = 32, dim: int = 64) -> M.Transformer:
    """Heads that know the future: head k (0-based) maps token x to x + k + 1 (mod V), so greedy decoding counts
    and every draft is right; a head in `wrong` is off by one on 3 tokens in 7. Built by hand: orthonormal
    embeddings (= output rows), a trunk that passes the embedding through, and head FFNs that are lookup tables
    (hidden unit j fires on token j and writes e[target(j)] - e[j]); attention keeps its random init."""
    torch.manual_seed(0)
    args = M.ModelArgs(dim=dim, n_layers=H + 2, n_heads=4, n_kv_heads=2, vocab_size=V, ffn_hidden_dim=V,
                       n_future_tokens=H, max_seq_len=256)  # fmt: skip
    m = M.Transformer(args)
    E = torch.linalg.qr(torch.randn(dim, dim))[0][:V]
    gain = 4.0  # silu(gain * sqrt(dim)) * sqrt(dim) ~ gain * dim on the token's own unit, ~0 elsewhere
    with torch.no_grad():
        m.tok_embeddings.weight.copy_(E)
        m.output.weight.copy_(E)
        for block in m.layers[:-1]:
            block.feed_forward.w2.weight.zero_()
        for k in range(H):
            shift = torch.full((V,), k + 1)
            if k in wrong:
                shift[torch.arange(V) % 7 < 3] += 1
            ff = m.head_block(k).feed_forward
            ff.w1.weight.copy_(gain * E)
            ff.w3.weight.copy_(E)
            ff.w2.weight.copy_((E[(torch.arange(V) + shift) % V] - E).T / (gain * dim))
    return m.eval()


# ----------------------------------------------------------------------------------------------------------------
# The accept / resample step


@pytest.mark.parametrize(
    "p, q",
    [
        ([0.5, 0.3, 0.2, 0.0], [0.1, 0.3, 0.0, 0.6]),  # q has mass where p has none (top-p) and vice versa
        ([0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]),
    ],
)
def test_accept_resample_step_gives_p(p, q):
    P, Q = torch.tensor(p), torch.tensor(q)
    N, g = 200_000, torch.Generator().manual_seed(0)
    drafts = torch.multinomial(Q.expand(N, 4), 1, generator=g)[:, 0]
    accepted, token = G.speculative_accept(P.expand(N, 4), Q.expand(N, 4), drafts, g)
    # P(accept | d) = min(1, p(d)/q(d)): exactly 1 where p >= q, exactly 0 where p = 0, else the ratio
    for d in range(4):
        rate = accepted[drafts == d].double().mean().item() if (drafts == d).any() else None
        want = min(1.0, p[d] / q[d]) if q[d] > 0 else None
        if want in (0.0, 1.0):
            assert rate == want, d
        elif want is not None:
            n = int((drafts == d).sum())
            assert abs(rate - want) < 5 * (want * (1 - want) / n) ** 0.5, d
    assert (token[accepted] == drafts[accepted]).all()
    residual = (P - Q).clamp(min=0)
    assert residual[token[~accepted]].min() > 0  # a fix comes from normalise(max(0, p - q)) only
    # the output token is distributed as p (expected counts N p against the observed ones)
    observed = torch.bincount(token, minlength=4).double()
    expected = N * P.double()
    keep = expected > 0
    assert observed[~keep].sum() == 0
    stat = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    df = torch.tensor((int(keep.sum()) - 1) / 2, dtype=torch.float64)
    assert torch.special.gammaincc(df, stat / 2).item() > 1e-3


def test_accept_when_p_equals_q():
    p = torch.softmax(torch.randn(1000, 7, generator=torch.Generator().manual_seed(1)), -1)
    drafts = torch.multinomial(p, 1)[:, 0]
    accepted, token = G.speculative_accept(p, p.clone(), drafts, torch.Generator().manual_seed(2))
    assert accepted.all() and (token == drafts).all()


# ----------------------------------------------------------------------------------------------------------------
# Greedy: the plain greedy output, token for token


@pytest.mark.parametrize("H", [2, 3, 4])
def test_greedy_is_plain_greedy_on_random_models(H):
    m = sticky_model(H)
    plain = m.generate(PROMPTS, 30, temperature=0)
    spec, s = G.decode(m, PROMPTS, G.Sampling(30, temperature=0), speculative=True)
    assert spec == plain  # batch 5, left-padded
    assert 0 < s["accepted"][0] < s["drafted"][0]  # drafts were accepted, and rejected
    assert s["tokens"] == 5 * 30 and s["tokens_per_forward"] > 1.2
    for p, want in zip(PROMPTS, plain, strict=True):  # batch 1
        assert m.generate([p], 30, temperature=0, speculative=True) == [want]
    # EOS and stop callbacks hit wherever they fall, drafted blocks included
    eos = plain[0][7]
    with_eos = m.generate(PROMPTS, 30, temperature=0, eos_id=eos, speculative=True)
    assert with_eos == m.generate(PROMPTS, 30, temperature=0, eos_id=eos)
    assert with_eos[0] == plain[0][: plain[0].index(eos)]
    stop = lambda toks: len(toks) >= 3 and toks[-1] == toks[-2] == toks[-3]  # noqa: E731  (inside a run)
    assert m.generate(PROMPTS, 30, temperature=0, stop=stop, speculative=True) == m.generate(
        PROMPTS, 30, temperature=0, stop=stop
    )


@pytest.mark.parametrize("H", [2, 3, 4])
def test_greedy_with_heads_that_know_the_future(H):
    m = counting_model(H)
    plain = m.generate(PROMPTS, 10, temperature=0)
    assert plain[0] == [(2 + i + 1) % 32 for i in range(10)]  # the model counts
    spec, s = G.decode(m, PROMPTS, G.Sampling(10, temperature=0), speculative=True)
    assert spec == plain
    # every draft right: prefill gives 1 token, each full block H, the budget cuts the last one (10 tokens)
    blocks, rest = divmod(10 - 1, H)
    assert s["forwards"] == 1 + blocks + (rest > 0) and s["tokens"] == 50 and s["accepted"] == s["drafted"]
    # EOS on an accepted draft in the middle of a block: the drafts after it are not returned
    eos = plain[1][2]
    out = m.generate(PROMPTS, 10, temperature=0, eos_id=eos, speculative=True)
    assert out == m.generate(PROMPTS, 10, temperature=0, eos_id=eos) and out[1] == plain[1][:2]
    stop = lambda toks: len(toks) == 2  # noqa: E731
    assert m.generate(PROMPTS, 10, temperature=0, stop=stop, speculative=True) == [r[:2] for r in plain]
    for n in (1, 2, H + 1, 7):  # budgets that end mid-block
        assert m.generate(PROMPTS, n, temperature=0, speculative=True) == [r[:n] for r in plain]
    # a head that is wrong on 3 tokens in 7: rows accept different numbers of drafts
    m = counting_model(H, wrong=(H - 1,))
    spec, s = G.decode(m, PROMPTS, G.Sampling(30, temperature=0), speculative=True)
    assert spec == m.generate(PROMPTS, 30, temperature=0)
    assert s["accepted"][: H - 2] == s["drafted"][: H - 2] and 0 < s["accepted"][-1] < s["drafted"][-1]


# ----------------------------------------------------------------------------------------------------------------
# Sampling: the distribution of plain sampling


def test_sampled_distribution_equals_plain_sampling():
    torch.manual_seed(0)
    V, H, N = 6, 3, 6000
    args = M.ModelArgs(dim=32, n_layers=H + 1, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=32,
                       n_future_tokens=H, max_seq_len=64)  # fmt: skip
    m = M.Transformer(args).eval()
    with torch.no_grad():
        m.output.weight.mul_(3.0)  # logits spread over ~2 nats: p and the drafts' q differ
    rows = [[1, 4, 2]] * N  # N independent samples in one batch
    plain = m.generate(rows, 4, temperature=1.0, top_p=0.9, seed=1)
    spec, s = G.decode(m, rows, G.Sampling(4, temperature=1.0, top_p=0.9, seed=2), speculative=True)
    assert s["draft_steps"] == 2 and all(0.3 < a < 0.95 for a in s["acceptance"])  # both paths exercised
    for n in (1, 2, 3, 4):  # the joint distribution of the first n tokens
        a, b = Counter(tuple(r[:n]) for r in plain), Counter(tuple(r[:n]) for r in spec)
        assert chi2_pvalue([(a[k], b[k]) for k in sorted(set(a) | set(b))]) > 1e-3, n


# ----------------------------------------------------------------------------------------------------------------
# Cache rollback: every step after a rejection sees exactly the accepted prefix


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_after_rejections_logits_equal_a_fresh_forward(temperature):
    m = sticky_model(3, seed=0)
    kept: dict = {}
    new, s = G.decode(m, PROMPTS, G.Sampling(24, temperature, 0.9, seed=3), speculative=True, trace=kept)
    assert s["accepted"][0] < s["drafted"][0]  # rejections happened
    with torch.no_grad():
        for b, p in enumerate(PROMPTS):  # head 1 behind every generated token
            for j, logits in enumerate(kept["p"][b]):
                fresh = m(torch.tensor([p + new[b][:j]]))[0, -1, 0]
                assert (logits - fresh).abs().max() < 1e-5, (b, j)
        assert len(kept["q"]) >= 5
        for b, j, logits in kept["q"]:  # heads 2.. at every drafting position (their caches catch up lazily)
            fresh = m(torch.tensor([PROMPTS[b] + new[b][:j]]))[0, -1, 1 : 1 + len(logits)]
            assert (logits - fresh).abs().max() < 1e-5, (b, j)


def test_useless_heads_stop_drafting_and_catch_up_later():
    m = sticky_model(4)
    with torch.no_grad():  # heads 2..4 random again: their drafts are (almost) never right
        for block in m.extra_heads:
            for p in block.parameters():
                p.normal_(0.0, 0.3) if p.ndim > 1 else p.fill_(1.0)
    kept: dict = {}
    new, s = G.decode(m, PROMPTS, G.Sampling(60, 0.0, 1.0), speculative=True, trace=kept)
    assert new == m.generate(PROMPTS, 60, temperature=0)
    assert s["acceptance"][0] < 0.2 and s["draft_steps"] < 10  # mostly plain steps
    b, j, logits = kept["q"][-1]  # the last probe: one draft, by head 2, whose cache caught up over 30+ slots
    assert j > 30 and len(logits) == 1
    with torch.no_grad():
        fresh = m(torch.tensor([PROMPTS[b] + new[b][:j]]))[0, -1, 1 : 1 + len(logits)]
    assert (logits - fresh).abs().max() < 1e-5


def test_one_head_model_and_arguments():
    m = counting_model(1)
    spec, s = G.decode(m, PROMPTS, G.Sampling(5, temperature=0), speculative=True)
    assert spec == m.generate(PROMPTS, 5, temperature=0)
    assert s["tokens_per_forward"] == 1.0 and s["acceptance"] == []
    assert m.generate(PROMPTS, 0, speculative=True) == [[] for _ in PROMPTS]
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate(PROMPTS, 300, speculative=True)


# ----------------------------------------------------------------------------------------------------------------
# evaluate.py --speculative


def test_evaluate_speculative_same_pass_at_1_and_stats(tiny_dir, tmp_path, capsys):
    import evaluate
    from config import REPO, default_data_root

    net = formats.load_model(tiny_dir / "base_meta", "meta", 4)
    with torch.no_grad():  # as sticky_model: drafts are accepted while the random model repeats itself
        for block in net.extra_heads:
            block.load_state_dict(net.layers[-1].state_dict())
        net.output.weight.mul_(0.85).add_(0.15 * net.tok_embeddings.weight)
    formats.save_checkpoint(net, tmp_path / "ckpt")
    argv = [str(REPO / "configs" / "tiny_mbpp.toml"), "--checkpoint", str(tmp_path / "ckpt"), "--datasets", "mbpp",
            "--limit", "3", f"--model.tokenizer={tiny_dir / 'tokenizer'}", f"--storage.data_root={default_data_root()}",
            "--eval.temperature=0", "--eval.max_new_tokens=32", "--eval.batch_size=2", "--eval.workers=2"]  # fmt: skip
    assert evaluate.main([*argv, "--out", str(tmp_path / "plain")]) == 0
    assert evaluate.main([*argv, "--out", str(tmp_path / "spec"), "--speculative"]) == 0
    flat = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    plain, spec = (json.loads((tmp_path / d / "metrics.json").read_text())["mbpp"] for d in ("plain", "spec"))
    assert spec["pass@1"] == plain["pass@1"] and spec["n_samples"] == 3
    samples = [(tmp_path / d / "samples.jsonl").read_text() for d in ("plain", "spec")]
    assert samples[0] == samples[1]  # the same completions
    st = spec["speculative"]
    assert "speculative" not in plain
    assert st["tokens_per_forward"] == st["tokens"] / st["row_forwards"] > 1.0
    assert len(st["acceptance"]) == 3 and sum(st["accepted"]) > 0
    assert flat["mbpp/spec_tokens_per_forward"] == st["tokens_per_forward"]
