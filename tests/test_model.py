"""model.py, formats.py: HF equivalence, strict Meta loading, MTP loss == naive, KV cache == recomputation."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

import formats
import generate as G
import integrity
import model as M

os.environ.setdefault("HF_HUB_OFFLINE", "1")

V = 256


def tiny_args(**kw) -> M.ModelArgs:
    base = dict(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=V, multiple_of=32, max_seq_len=128)
    base.update(kw)
    return M.ModelArgs(**base)


def tiny_model(seed: int = 0, dtype=torch.float32, **kw) -> M.Transformer:
    torch.manual_seed(seed)
    m = M.Transformer(tiny_args(**kw)).to(dtype)
    with torch.no_grad():  # non-trivial norms, so a norm mix-up cannot hide
        for p in m.parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return m.eval()


def hf_llama(tmp_path, tie: bool = False, rope: dict | None = None, shard: str | None = None):
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=V,
        intermediate_size=176,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        max_position_embeddings=128,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 5000.0},
        attn_implementation="eager",
    )
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    return hf


# ----------------------------------------------------------------------------------------------------------------
# HF equivalence


@pytest.mark.parametrize("tie", [False, True])
def test_load_hf_matches_transformers(tmp_path, tie):
    hf = hf_llama(tmp_path, tie=tie)
    m = formats.load_hf(tmp_path).float().eval()
    assert m.args.n_future_tokens == 1 and len(m.layers) == 3 and m.args.hidden_dim == 176
    assert m.args.rope_theta == 5000.0
    ids = torch.randint(0, V, (2, 37))
    with torch.no_grad():
        ref = hf(ids).logits
        got = m(ids)
    assert got.shape == (2, 37, 1, V)
    assert (got[:, :, 0] - ref).abs().max().item() < 1e-4


def test_load_hf_linear_rope_scaling_sharded(tmp_path):
    hf = hf_llama(tmp_path, rope={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, shard="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m = formats.load_hf(tmp_path).float().eval()
    assert m.args.rope_scaling_factor == 4.0
    ids = torch.randint(0, V, (1, 50))
    with torch.no_grad():
        assert (m(ids)[:, :, 0] - hf(ids).logits).abs().max().item() < 1e-4


def test_load_hf_with_extra_heads(tmp_path):
    hf = hf_llama(tmp_path)
    m = formats.load_hf(tmp_path, n_future_tokens=3).float().eval()
    assert formats.read_model_args(tmp_path, "hf", 3) == m.args
    assert len(m.layers) == 3 and len(m.extra_heads) == 2 and m.args.n_layers == 5
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        logits = m(ids)
        ref = hf(ids).logits
    assert logits.shape == (2, 20, 3, V)
    assert (logits[:, :, 0] - ref).abs().max().item() < 1e-4
    last = m.layers[-1].state_dict()
    for head in m.extra_heads:
        for k, v in head.state_dict().items():
            assert torch.equal(v, last[k])
            assert v.data_ptr() != last[k].data_ptr()  # copies, not shared tensors
    # copies: every head predicts the same thing until trained
    assert torch.allclose(logits[:, :, 2], logits[:, :, 0])


def test_load_hf_refuses_unsupported(tmp_path):
    hf_llama(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(formats.CheckpointError, match="yarn"):
        formats.load_hf(tmp_path)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    cfg["attention_bias"] = True
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(formats.CheckpointError, match="attention_bias"):
        formats.load_hf(tmp_path)
    del cfg["attention_bias"], cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(formats.CheckpointError, match="config.json.*hidden_size"):
        formats.load_hf(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Meta format and our checkpoints


def test_meta_round_trip(tmp_path):
    m = tiny_model(n_future_tokens=2)
    formats.save_meta(m, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    assert params["n_future_tokens"] == 2 and "ffn_hidden_dim" not in params
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    m2 = formats.load_meta(tmp_path).eval()
    assert formats.read_model_args(tmp_path, "meta") == m.args == m2.args
    ids = torch.randint(0, V, (2, 16))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    # Meta's actual key names
    keys = set(torch.load(tmp_path / "consolidated.pth", weights_only=True))
    for k in ["tok_embeddings.weight", "layers.0.attention.wq.weight", "layers.0.feed_forward.w1.weight",
              "layers.2.attention_norm.weight", "layers.2.ffn_norm.weight", "extra_heads.0.attention.wk.weight",
              "norm.weight", "output.weight"]:  # fmt: skip
        assert k in keys
    assert not any(k.startswith("layers.3.") for k in keys)  # 4 blocks, H=2: 3 in layers, 1 extra head


@pytest.mark.parametrize("corruption", ["missing", "extra", "shape"])
def test_meta_strict_errors(tmp_path, corruption):
    m = tiny_model(n_future_tokens=2)
    formats.save_meta(m, tmp_path)
    sd = torch.load(tmp_path / "consolidated.pth", weights_only=True)
    if corruption == "missing":
        key = "layers.1.feed_forward.w3.weight"
        del sd[key]
    elif corruption == "extra":
        key = "layers.9.attention.wq.weight"
        sd[key] = torch.zeros(4)
    else:
        key = "extra_heads.0.attention.wv.weight"
        sd[key] = torch.zeros(3, 64)
    torch.save(sd, tmp_path / "consolidated.pth")
    with pytest.raises(formats.CheckpointError) as e:
        formats.load_meta(tmp_path)
    msg = str(e.value)
    assert key in msg and "consolidated.pth" in msg
    assert {"missing": "missing keys", "extra": "unexpected keys", "shape": "wrong shapes"}[corruption] in msg


def test_meta_params_errors(tmp_path):
    formats.save_meta(tiny_model(), tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    (tmp_path / "params.json").write_text(json.dumps({**params, "use_scaled_rope": True}))
    with pytest.raises(ValueError, match="params.json.*use_scaled_rope"):
        formats.load_meta(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**params, "n_expert": 8}))
    with pytest.raises(ValueError, match="params.json.*unknown key.*n_expert"):
        formats.load_meta(tmp_path)
    (tmp_path / "params.json").write_text(json.dumps({**params, "dim": "64"}))
    with pytest.raises(ValueError, match="params.json.*'dim'.*int"):
        formats.load_meta(tmp_path)
    del params["n_future_tokens"]  # Meta's plain Llama params.json: H defaults to 1
    (tmp_path / "params.json").write_text(json.dumps(params))
    assert formats.load_meta(tmp_path).args.n_future_tokens == 1


def test_meta_format_variants(tmp_path):
    """What real Meta checkpoints look like: Llama-2's `vocab_size: -1`, an old `rope.freqs` buffer, weights in
    `consolidated.00.pth` (one model-parallel shard); several shards are refused with the fix."""
    m = tiny_model(n_future_tokens=2)
    formats.save_meta(m, tmp_path)
    params = json.loads((tmp_path / "params.json").read_text())
    sd = torch.load(tmp_path / "consolidated.pth", weights_only=True)
    hd = m.args.head_dim
    sd["rope.freqs"] = 1.0 / (m.args.rope_theta ** (torch.arange(0, hd, 2).float() / hd))
    (tmp_path / "consolidated.pth").unlink()
    torch.save(sd, tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps({**params, "vocab_size": -1}))
    m2 = formats.load_meta(tmp_path).eval()
    assert m2.args == m.args  # vocab_size read off tok_embeddings
    assert formats.read_model_args(tmp_path, "meta") == m.args
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        assert torch.equal(m(ids), m2(ids))
    sd["rope.freqs"] = sd["rope.freqs"] * 2  # frequencies of another rope_theta
    torch.save(sd, tmp_path / "consolidated.00.pth")
    with pytest.raises(formats.CheckpointError, match="rope.freqs does not match rope_theta"):
        formats.load_meta(tmp_path)
    torch.save(sd, tmp_path / "consolidated.01.pth")
    with pytest.raises(
        formats.CheckpointError, match="2 model-parallel shards; merge them into consolidated.pth"
    ):
        formats.load_meta(tmp_path)


def damaged(src, dst, how: str):
    """A copy of a checkpoint directory with its weights file damaged the way disks and copies do."""
    import random
    import shutil

    shutil.copytree(src, dst)
    f = dst / ("consolidated.pth" if (dst / "consolidated.pth").exists() else "model.safetensors")
    n = f.stat().st_size
    if how == "middle":  # 64 KB of random bytes written into the middle
        with open(f, "r+b") as fh:
            fh.seek(n // 2)
            fh.write(random.Random(0).randbytes(64 << 10))
    elif how == "truncated":
        os.truncate(f, n // 2)
    elif how == "random":
        f.write_bytes(random.Random(1).randbytes(n))
    return dst, f


@pytest.mark.parametrize("how", ["middle", "truncated", "random"])
def test_damaged_meta_weights_are_refused_naming_the_file(tiny_dir, tmp_path, how):
    path, f = damaged(tiny_dir / "base_meta", tmp_path / "meta", how)
    (path / integrity.CHECKLIST).unlink(
        missing_ok=True
    )  # torch's own record CRCs catch it without Meta's checklist
    with pytest.raises(formats.CheckpointError) as e:
        formats.load_model(path, "meta", 4)
    msg = str(e.value)
    assert msg.startswith(f"{f}: ")
    if how == "middle":  # the first damaged record, and the tensor stored in it
        assert "Bad CRC-32" in msg and "(tensor layers.2.ffn_norm.weight)" in msg, msg
    else:
        assert "truncated or corrupted" in msg, msg


def test_meta_checklist_and_non_finite_tensors(tiny_dir, tmp_path):
    path, f = damaged(tiny_dir / "base_meta", tmp_path / "meta", "none")
    integrity.write_checklist(path)
    assert formats.verify_checklist(path) and formats.load_model(path, "meta", 4) is not None
    params = path / "params.json"
    params.write_text(params.read_text() + "\n")
    with pytest.raises(
        formats.CheckpointError, match=rf"{params}: MD5 .* does not match .* in {path / integrity.CHECKLIST}"
    ):
        formats.load_model(path, "meta", 4)
    (path / integrity.CHECKLIST).unlink()
    sd = torch.load(f, weights_only=True)
    sd["layers.1.attention.wk.weight"][3, 5] = float("nan")  # a valid file holding a NaN
    torch.save(sd, f)
    with pytest.raises(formats.CheckpointError) as e:
        formats.load_model(path, "meta", 4)
    assert str(e.value).startswith(f"{f}: tensor 'layers.1.attention.wk.weight' has 1 non-finite value(s)")


def test_damaged_safetensors_are_refused_naming_the_file(tmp_path):
    formats.save_checkpoint(tiny_model(), tmp_path / "ok")
    for how in ("truncated", "random"):
        path, f = damaged(tmp_path / "ok", tmp_path / how, how)
        with pytest.raises(
            formats.CheckpointError, match=rf"^{f}: (not a safetensors file|the header describes)"
        ):
            formats.load_model(path, "wmtp")


def test_checkpoint_round_trip_and_resize(tmp_path):
    m = tiny_model(n_future_tokens=3)
    formats.save_checkpoint(m, tmp_path)
    m2 = formats.load_model(tmp_path, "wmtp")
    assert m2.args == m.args
    ids = torch.randint(0, V, (2, 12))
    with torch.no_grad():
        full = m(ids)
        assert torch.equal(full, m2.eval()(ids))
        # dropping heads keeps the trunk and the first heads exactly
        m1 = formats.load_model(tmp_path, "wmtp", n_future_tokens=1).eval()
        assert m1.args.n_layers == 2 and torch.equal(m1(ids)[:, :, 0], full[:, :, 0])
    assert formats.read_model_args(tmp_path, "wmtp") == m.args
    assert formats.read_model_args(tmp_path, "wmtp", 1) == m1.args
    with pytest.raises(formats.CheckpointError, match="fmt='hf'"):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        formats.load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="unknown checkpoint format"):
        formats.load_model(tmp_path, "gguf")


def test_args_rules():
    # Llama's FFN rule: 7B -> 11008; with a multiplier and multiple_of (Llama-3 8B: 14336)
    assert M.ModelArgs(dim=4096, n_layers=32, n_heads=32).hidden_dim == 11008
    a = M.ModelArgs(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, multiple_of=1024, ffn_dim_multiplier=1.3)
    assert a.hidden_dim == 14336
    with pytest.raises(ValueError, match="n_kv_heads"):
        M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="n_layers"):
        M.ModelArgs(dim=64, n_layers=2, n_heads=4, n_future_tokens=3)
    a7 = M.ModelArgs(dim=4096, n_layers=32, n_heads=32, n_future_tokens=4)
    assert a7.n_trunk == 28
    # 6.7B Llama-2-7B shape + 3 extra blocks' worth split into heads: same total
    n7 = M.count_params_from_args(a7)
    assert n7 == 32 * (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) + 2 * 32000 * 4096 + 4096
    small = tiny_args()
    assert M.lora_param_count(small, 8, ["wq", "w2"]) == 4 * 8 * ((64 + 64) + (small.hidden_dim + 64))
    with pytest.raises(ValueError, match="q_proj"):
        M.lora_param_count(small, 8, ["q_proj"])
    assert M.flops_per_token(a7, 2048) > 6 * 6.5e9


def test_train_flops_by_hand_and_the_meters_mfu():
    """Issue 22: MFU's numerator for a small config, by hand: 3 blocks (2 in the trunk + head 1, 1 extra head)
    of dim 8 (2 query heads, 1 kv head of 4), FFN 16, vocab 50; a micro-batch of 15 positions in rows of width
    10, 15 pairs for head 1 and 12 for head 2. The meter divides those FLOPs by the window's time, world size and
    peak, and leaves excluded time (validation, checkpoints) out of the window."""
    import time

    import parallel as P

    a = M.ModelArgs(
        dim=8, n_layers=3, n_heads=2, n_kv_heads=1, vocab_size=50, ffn_hidden_dim=16, n_future_tokens=2
    )
    block = 8 * 8 + 8 * 4 + 8 * 4 + 8 * 8 + 3 * 8 * 16  # wq wk wv wo + w1 w2 w3 = 576
    attention = 12 * 3 * (2 * 4) * 10  # PaLM: 12 * blocks * heads * head_dim * width, per position
    want = 15 * (6 * 3 * block + attention) + 6 * 8 * 50 * (15 + 12)
    assert want == 15 * (10368 + 2880) + 64800 == 263520
    assert M.train_flops(a, 15, 10, [15, 12]) == want
    assert M.flops_per_token(a, 10) == M.train_flops(a, 1, 10, [1, 1])

    t0 = time.perf_counter()
    meter = P.Meter(P.Dist())
    meter.peak = 1e6  # (a CPU has none: MFU is only reported on known GPUs)
    time.sleep(0.05)
    meter.exclude(0.04)
    meter.add(15, want)
    out = meter.read()
    wall = time.perf_counter() - t0
    seconds = 15 / out["perf/tokens_per_s_per_device"]
    assert 0.0099 < seconds <= wall - 0.04 and out["perf/excluded_s"] == 0.04
    assert out["perf/mfu"] == pytest.approx(want / seconds / 1e6, rel=1e-9)


# ----------------------------------------------------------------------------------------------------------------
# Loss


def test_mtp_targets():
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    mask = torch.tensor([[False, False, True, True, True]])
    t, v = M.mtp_targets(ids, mask, 2)
    assert t[0, :, 0].tolist() == [0, 7, 8, 9, 0] and v[0, :, 0].tolist() == [False, True, True, True, False]
    assert t[0, :, 1].tolist() == [7, 8, 9, 0, 0] and v[0, :, 1].tolist() == [True, True, True, False, False]


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def mtp_case():
    """A float64 H=3 model and a batch (3 x 24, ~30% padding) with random weights on the valid pairs."""
    m = tiny_model(dtype=torch.float64, n_layers=5, n_future_tokens=3).train()
    B, S, H = 3, 24, 3
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.rand(B, S, generator=g) < 0.7
    targets, valid = M.mtp_targets(ids, mask, H)
    w = torch.where(valid, torch.rand(B, S, H, generator=g, dtype=torch.float64) * 2, 0.0)
    return m, ids, targets, valid, w, [1.0, 0.5, 0.25]


def test_memory_efficient_equals_naive():
    m, ids, targets, valid, w, alpha = mtp_case()

    loss_naive = M.naive_mtp_loss(m, ids, targets, valid, w, alpha)
    loss_naive.backward()
    g_naive = grads(m)
    m.zero_grad(set_to_none=True)

    h = m(ids, stage="trunk")
    out = M.mtp_loss_backward(m, h, targets, valid, w, alpha)
    g_eff = grads(m)
    assert abs(out["loss"].item() - loss_naive.item()) < 1e-10
    assert torch.allclose(out["head_loss"].sum(), out["loss"])
    assert set(g_eff) == set(g_naive) and len(g_eff) == len(list(m.parameters()))
    for n in g_naive:
        assert torch.allclose(g_eff[n], g_naive[n], atol=1e-6, rtol=0), n

    # scale multiplies the gradient, not the returned loss; activation checkpointing changes nothing
    m.zero_grad(set_to_none=True)
    m.activation_checkpointing = True
    out2 = M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, w, alpha, scale=0.5)
    assert torch.allclose(out2["loss"], out["loss"])
    for n, gr in grads(m).items():
        assert torch.allclose(gr, 0.5 * g_eff[n], atol=1e-9), n


def test_mtp_loss_equals_a_plain_loop_over_pairs():
    """Spec §2 written out pair by pair (H=3, per-head alpha, arbitrary pair weights, masked prompt and
    padding): L = sum over valid (b, t, k) of alpha_k * w * -log p_k(x_{t+k+1}) / count_valid. The loss and
    every gradient of the memory-efficient step equal this loop's (float64, autograd through the loop)."""
    m = tiny_model(dtype=torch.float64, n_layers=5, n_future_tokens=3).train()
    B, S, H = 2, 11, 3
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, V, (B, S), generator=g)
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[0, 4:] = True
    mask[1, 6:9] = True  # a short completion followed by padding
    w = torch.rand(B, S, H, generator=g, dtype=torch.float64) * 3
    alpha = [1.0, 0.5, 0.0]

    logp = torch.log_softmax(m(ids), dim=-1)  # [B, S, H, V]
    total, count = 0.0, 0
    for b in range(B):
        for t in range(S):
            for k in range(H):
                j = t + k + 1
                if j < S and mask[b, j]:
                    total = total - alpha[k] * w[b, t, k] * logp[b, t, k, ids[b, j]]
                    count += 1
    assert count == 3 * (7 + 3)  # 7 and 3 completion tokens, each the target of one pair per head
    loop = total / count
    loop.backward()
    want = grads(m)
    m.zero_grad(set_to_none=True)

    targets, valid = M.mtp_targets(ids, mask, H)
    out = M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, torch.where(valid, w, 0.0), alpha)
    assert out["loss"].item() == pytest.approx(loop.item(), rel=1e-12)
    got = grads(m)
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-9, atol=1e-12, msg=n)
    assert (got["extra_heads.1.attention.wq.weight"] == 0).all()  # alpha_3 = 0: head 3 gets no gradient


def test_uniform_h1_is_next_token_ce():
    m = tiny_model(n_future_tokens=1).train()
    B, S = 2, 20
    ids = torch.randint(0, V, (B, S))
    mask = torch.zeros(B, S, dtype=torch.bool)
    mask[:, 8:] = True
    mask[1, 15:] = False
    targets, valid = M.mtp_targets(ids, mask, 1)
    out = M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, valid.float())
    with torch.no_grad():
        logits = m(ids)[:, :-1, 0]
    sel = mask[:, 1:]
    ref = F.cross_entropy(logits[sel], ids[:, 1:][sel])
    assert abs(out["loss"].item() - ref.item()) < 1e-5
    assert abs(out["head_ce"][0].item() - ref.item()) < 1e-5
    # the per-pair no-grad CE helper (rho1's extra pass) agrees
    ce = M.mtp_head_ce(m, m(ids, stage="trunk"), targets, valid)
    assert abs(ce[valid].mean().item() - ref.item()) < 1e-5 and (ce[~valid] == 0).all()


def test_no_valid_pairs_gives_zero_loss_and_grads():
    m = tiny_model(n_future_tokens=2).train()
    ids = torch.randint(0, V, (2, 10))
    targets, valid = M.mtp_targets(ids, torch.zeros(2, 10, dtype=torch.bool), 2)
    out = M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, valid.float())
    assert out["loss"].item() == 0.0 and torch.isfinite(out["head_ce"]).all()
    for p in m.parameters():
        assert p.grad is None or (p.grad == 0).all()
    assert M.naive_mtp_loss(m, ids, targets, valid, valid.float()).item() == 0.0


def _rho1_like(valid: torch.Tensor):
    """A per-head weigher that depends on the head's own CE (as rho1 / dft_v1 per head), recording its calls."""
    seen = {}

    def weigh(k: int, ce: torch.Tensor) -> torch.Tensor:
        seen[k] = ce.clone()
        v = valid[..., k]
        w = torch.softmax(torch.where(v, ce, -torch.inf).flatten(), 0).view_as(ce) * v.sum()
        return torch.where(v, w, 0.0)

    return weigh, seen


@pytest.mark.parametrize("chunk", [7, 16, 1000])
def test_chunked_ce_equals_unchunked_loss_and_gradients(chunk):
    """Issue 22: a head's CE in chunks of positions (7 divides neither B*S = 72 nor any head's valid count) gives
    the unchunked loss, per-head CE and every gradient (float64, 1e-6), for known weights, for weights that are a
    function of the head's own CE (two passes), and with `per_head = False` (asked before the head, one pass)."""
    m, ids, targets, valid, w, alpha = mtp_case()

    def known(k, ce):
        assert ce is None
        return w[..., k]

    known.per_head = False
    weigh_ref, seen_ref = _rho1_like(valid)
    weigh_chunk, seen_chunk = _rho1_like(valid)
    for weights, ref_weights in ((w, w), (known, w), (weigh_chunk, weigh_ref)):
        m.zero_grad(set_to_none=True)
        ref = M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, ref_weights, alpha, 0.7, chunk=0)
        g_ref = grads(m)
        m.zero_grad(set_to_none=True)
        out = M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, weights, alpha, 0.7, chunk=chunk)
        for key in ("loss", "head_loss", "head_ce"):
            torch.testing.assert_close(out[key], ref[key], rtol=0, atol=1e-6)
        got = grads(m)
        assert set(got) == set(g_ref) and len(got) == len(list(m.parameters()))
        for n in g_ref:
            torch.testing.assert_close(got[n], g_ref[n], rtol=0, atol=1e-6, msg=n)
    for k in range(
        w.shape[-1]
    ):  # the CE-dependent weigher saw the same CE, all of head k's positions at once
        torch.testing.assert_close(seen_chunk[k], seen_ref[k], rtol=0, atol=1e-9)
    # and the unchunked path is the naive loss with every head's logits at once
    m.zero_grad(set_to_none=True)
    M.naive_mtp_loss(m, ids, targets, valid, w, alpha).backward()
    g_naive = grads(m)
    m.zero_grad(set_to_none=True)
    M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, w, alpha, chunk=chunk)
    for n, gr in grads(m).items():
        torch.testing.assert_close(gr, g_naive[n], rtol=0, atol=1e-6, msg=n)


@pytest.mark.parametrize("chunk", [0, 5, 64])
def test_chunked_no_grad_ce_and_frozen_output(chunk):
    """mtp_head_ce (validation, evaluation, the scorers' extra pass) in chunks equals the per-pair CE of the full
    logits; under no_grad the step returns the loss without gradients; a frozen output projection (LoRA) gets no
    gradient while the blocks' gradients are unchanged."""
    m = tiny_model(dtype=torch.float64, n_layers=4, n_future_tokens=2).train()
    B, S, H = 2, 19, 2
    ids = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 12:] = False
    targets, valid = M.mtp_targets(ids, mask, H)
    with torch.no_grad():
        logits = m(ids)
    full = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none").view(B, S, H)
    ce = M.mtp_head_ce(m, m(ids, stage="trunk"), targets, valid, chunk=chunk)
    assert ce.dtype == torch.float32 and (ce[~valid] == 0).all()
    torch.testing.assert_close(ce[valid], full[valid].float(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        out = M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, valid.double(), chunk=chunk)
    assert all(p.grad is None for p in m.parameters())
    assert out["loss"].item() == pytest.approx(full[valid].mean().item(), rel=1e-12)

    M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, valid.double(), chunk=0)
    want = grads(m)
    m.zero_grad(set_to_none=True)
    m.output.weight.requires_grad_(False)
    M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, valid.double(), chunk=chunk)
    got = grads(m)
    assert "output.weight" not in got and set(got) == set(want) - {"output.weight"}
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-9, msg=n)


def test_ce_chunk_default_is_the_configs():
    import config as C

    assert C.ModelConfig().ce_chunk == M.CE_CHUNK > 0


def test_chunked_ce_holds_one_chunk_of_logits():
    """The chunked step never allocates more than one chunk's logits: every tensor the loss creates (views aside)
    with the vocabulary as its last dimension has at most `chunk` rows (the unchunked step: a head's valid
    count)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Widest(TorchDispatchMode):
        rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in () if func.is_view else out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[1] == V:
                    Widest.rows = max(Widest.rows, t.shape[0])
            return out

    m = tiny_model(n_layers=2, n_future_tokens=2).train()
    ids = torch.randint(0, V, (2, 16))
    targets, valid = M.mtp_targets(ids, torch.ones_like(ids, dtype=torch.bool), 2)
    h = m(ids, stage="trunk")
    for chunk, most in ((6, 6), (0, int(valid[..., 0].sum()))):
        Widest.rows = 0
        with Widest():
            M.mtp_loss_backward(
                m, h if chunk else m(ids, stage="trunk"), targets, valid, valid.float(), chunk=chunk
            )
        assert Widest.rows == most, (chunk, Widest.rows)


# ----------------------------------------------------------------------------------------------------------------
# Generation


def test_kv_cache_generation_equals_full_recomputation():
    m = tiny_model(n_future_tokens=2)
    prompts = [[3, 1, 4, 1, 5, 9, 2], [6, 5], [3, 5, 8, 9, 7]]  # different lengths: left padding
    trace: dict = {}
    new = G.generate(m, prompts, 10, temperature=0.0, top_p=1.0, trace=trace)
    assert [len(x) for x in new] == [10, 10, 10]
    with torch.no_grad():
        for b, p in enumerate(prompts):
            seq = list(p)
            for step in range(10):
                full = m(torch.tensor([seq]))[0, -1, 0]
                assert (trace["p"][b][step] - full).abs().max().item() < 1e-5
                assert int(full.argmax()) == new[b][step]
                seq.append(new[b][step])
    assert m.generate(prompts, 10, temperature=0) == new


# ----------------------------------------------------------------------------------------------------------------
# Exports: HF Llama (trunk + head 1) and Meta's reference params.json


def test_save_hf_is_llama_for_transformers_with_gqa_linear_rope_and_any_ffn_width(tmp_path):
    import transformers

    m = tiny_model(n_future_tokens=2, rope_scaling_factor=2.0, ffn_hidden_dim=96, rope_theta=5000.0)
    formats.save_hf(m, tmp_path, bos_id=0, eos_id=1, pad_id=2)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (
        cfg["num_hidden_layers"] == 3 and cfg["intermediate_size"] == 96 and cfg["num_key_value_heads"] == 2
    )
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0} and cfg["torch_dtype"] == "float32"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    assert hf.generation_config.eos_token_id == 1 and hf.generation_config.pad_token_id == 2
    ids = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        assert (hf(ids).logits - m(ids)[:, :, 0]).abs().max().item() < 1e-4
    back = formats.load_hf(tmp_path)  # HF's q/k permutation re-applied, then undone: the very same tensors
    assert back.args == dataclasses.replace(m.args, n_layers=3, n_future_tokens=1, multiple_of=256)
    head1 = {k: v for k, v in m.state_dict().items() if not k.startswith("extra_heads.")}
    assert all(torch.equal(v, head1[k]) for k, v in back.state_dict().items()) and len(head1) == len(
        back.state_dict()
    )

    formats.save_hf(m, tmp_path / "bf16", dtype=torch.bfloat16)
    from safetensors.torch import load_file

    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}


def test_save_hf_refuses_what_hf_llama_cannot_express(tmp_path):
    args = dataclasses.replace(tiny_args(), qk_norm=True)  # Qwen3's q/k norm: LlamaConfig has no key for it
    with pytest.raises(formats.CheckpointError, match=r"HF Llama cannot express this model: qk_norm = True"):
        formats.hf_config(args, torch.float32)
    with pytest.raises(formats.CheckpointError, match="qk_norm"):
        formats.save_hf(M.Transformer(args), tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_save_meta_reference_params_are_metas_keys(tmp_path):
    m = tiny_model(n_future_tokens=2)
    formats.save_meta(m, tmp_path, dtype=torch.bfloat16, reference=True)
    params = json.loads((tmp_path / "params.json").read_text())
    meta_keys = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
                 "norm_eps", "rope_theta", "n_future_tokens"}  # fmt: skip
    assert set(params) == meta_keys  # no max_seq_len: Meta's Llama.build passes it next to **params
    back = formats.load_meta(tmp_path)
    assert back.args == dataclasses.replace(m.args, max_seq_len=M.ModelArgs.max_seq_len)
    assert all(torch.equal(v, m.state_dict()[k].bfloat16()) for k, v in back.state_dict().items())


def test_detect_format(tmp_path):
    m = tiny_model(n_future_tokens=2)
    formats.save_checkpoint(m, tmp_path / "wmtp")
    formats.save_hf(m, tmp_path / "hf")
    formats.save_meta(m, tmp_path / "meta")
    assert [formats.detect_format(tmp_path / f) for f in ("wmtp", "hf", "meta")] == ["wmtp", "hf", "meta"]
    (tmp_path / "last" / "dcp").mkdir(parents=True)
    with pytest.raises(formats.CheckpointError, match="resume checkpoint.*train.py export"):
        formats.detect_format(tmp_path / "last")
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        formats.detect_format(tmp_path)


def test_generate_sampling_stops_and_seed():
    m = tiny_model()
    prompts = [[1, 2, 3], [4, 5]]
    a = m.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=7)
    assert a == m.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=7)
    assert a != m.generate(prompts, 12, temperature=1.0, top_p=0.9, seed=8)
    # tiny top_p keeps only the most likely token: sampling becomes greedy
    assert m.generate(prompts, 8, temperature=1.0, top_p=1e-6, seed=3) == m.generate(
        prompts, 8, temperature=0
    )
    greedy = m.generate(prompts, 8, temperature=0)
    eos = greedy[0][3]
    out = m.generate(prompts, 8, temperature=0, eos_id=eos)
    assert out[0] == greedy[0][: greedy[0].index(eos)]  # eos not included, stops there
    out = m.generate(prompts, 8, temperature=0, stop=lambda toks: len(toks) >= 2)
    assert out == [g[:2] for g in greedy]
    with pytest.raises(ValueError, match="max_seq_len"):
        m.generate(prompts, 200)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit over the categories with p > 0; p-value from the chi-square survival
    function Q(df/2, x/2) (torch.special.gammaincc)."""
    keep = probs > 0
    n = counts.sum()
    expected = probs[keep] * n
    x = ((counts[keep] - expected) ** 2 / expected).sum()
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), x / 2))


@pytest.mark.parametrize(
    "temperature,top_p,kept", [(1.0, 0.79, 2), (1.0, 0.81, 3), (0.5, 0.9, 2), (2.0, 1.0, 6)]
)
def test_nucleus_sampling_frequencies(temperature, top_p, kept):
    """generate.sample keeps exactly the smallest set of tokens whose tempered mass is >= top_p and samples them in
    proportion to their tempered probabilities: no token outside the set is ever drawn, and a chi-square test at
    a fixed false-alarm rate (p < 0.001, seeded: deterministic) accepts the frequencies."""
    base = torch.tensor([0.5, 0.3, 0.12, 0.05, 0.02, 0.01], dtype=torch.float64)
    order = torch.tensor([3, 0, 5, 1, 4, 2])  # the vocabulary order differs from the probability order
    logits = torch.empty(6, dtype=torch.float64)
    logits[order] = base.log()
    tempered = torch.softmax(logits / temperature, -1)
    ranked = tempered.sort(descending=True)
    mass = ranked.values.cumsum(0)
    n_keep = int((mass < top_p).sum()) + 1 if top_p < 1 else 6
    assert n_keep == kept  # the hand-picked cases straddle the boundaries
    want = torch.zeros(6, dtype=torch.float64)
    want[ranked.indices[:n_keep]] = ranked.values[:n_keep] / ranked.values[:n_keep].sum()

    n = 40_000
    gen = torch.Generator().manual_seed(11)
    draws = G.sample(logits.float().expand(n, 6), temperature, top_p, gen)
    counts = torch.bincount(draws, minlength=6).double()
    assert (counts[want == 0] == 0).all(), counts
    assert chi_square_p(counts, want) > 1e-3, (counts / n, want)
    # the test can fail: the untruncated tempered distribution is rejected whenever top_p cuts something
    if kept < 6:
        assert chi_square_p(counts, tempered) < 1e-3


# ----------------------------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU): the same contracts on the device, plus a bf16 training step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_contracts_and_bf16_step():
    torch.backends.cuda.matmul.allow_tf32 = False
    m = tiny_model(n_layers=5, n_future_tokens=3).cuda().train()
    B, S, H = 2, 32, 3
    ids = torch.randint(0, V, (B, S), device="cuda")
    mask = torch.rand(B, S, device="cuda") < 0.7
    targets, valid = M.mtp_targets(ids, mask, H)
    w = torch.where(valid, torch.rand(B, S, H, device="cuda") * 2, 0.0)
    M.naive_mtp_loss(m, ids, targets, valid, w).backward()
    g_naive = grads(m)
    m.zero_grad(set_to_none=True)
    M.mtp_loss_backward(m, m(ids, stage="trunk"), targets, valid, w)
    for n, g in grads(m).items():
        assert torch.allclose(g, g_naive[n], atol=1e-5, rtol=1e-4), n

    m.eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2]]
    trace: dict = {}
    new = G.generate(m, prompts, 6, temperature=0.0, top_p=1.0, trace=trace)
    with torch.no_grad():
        for b, p in enumerate(prompts):
            seq = list(p)
            for step in range(6):
                full = m(torch.tensor([seq], device="cuda"))[0, -1, 0]
                assert (trace["p"][b][step] - full).abs().max().item() < 1e-4
                seq.append(new[b][step])
    s1 = m.generate(prompts, 8, temperature=0.8, top_p=0.95, seed=1)
    assert s1 == m.generate(prompts, 8, temperature=0.8, top_p=0.95, seed=1)

    mb = m.to(torch.bfloat16).train()
    mb.activation_checkpointing = True
    mb.zero_grad(set_to_none=True)
    out = M.mtp_loss_backward(mb, mb(ids, stage="trunk"), targets, valid, w)
    assert torch.isfinite(out["loss"]) and all(torch.isfinite(p.grad).all() for p in mb.parameters())
    assert len(mb.eval().generate(prompts, 4, temperature=0)[0]) == 4
