"""plan.plan_memory, what `train.py --dry-run` prints and refuses on: every figure against a hand computation.

The case: 1e9 parameters in 10 blocks, dim 1000, vocab 32000, rows of 100 tokens, micro-batch 2 (200 tokens), 4
devices, bf16 compute. GiB = 2**30 bytes.
"""

from __future__ import annotations

import pytest

from plan import MemoryPlan, format_count, plan_memory

CASE = dict(n_params=10**9, n_blocks=10, dim=1000, vocab=32000, seq_len=100, micro_batch=2, world_size=4)


def plan(**kw) -> MemoryPlan:
    args = {**CASE, "budget_gb": 80.0, "activation_checkpointing": False, **kw}
    return plan_memory(**args)


def test_full_fine_tuning_figures():
    p = plan()
    assert p.params_gb == pytest.approx(0.9313225746)  # 1e9 fp32 masters / 4 devices: 4e9 / 4 / 2**30
    assert p.grads_gb == pytest.approx(0.9313225746)  # fp32 gradients, sharded the same way
    assert p.optim_gb == pytest.approx(1.8626451492)  # AdamW m and v: 8 bytes per parameter, sharded
    assert p.activations_gb == pytest.approx(0.0633299351)  # 10 blocks x 34 bytes x 200 tokens x 1000 (bf16)
    assert p.activations_ckpt_gb == pytest.approx(
        0.0100582838
    )  # 10 block inputs (2 x 200 x 1000) + one block
    assert p.logits_gb == pytest.approx(0.0834465027)  # one head: 200 x 32000 logits x 14 bytes (bf16 step)
    assert p.aux_models_gb == 0.0
    assert p.total_gb == pytest.approx(3.8720667363)
    assert plan(activation_checkpointing=True).total_gb == pytest.approx(3.8187950850)


def test_lora_keeps_the_frozen_base_in_the_compute_dtype():
    p = plan(trainable_params=10**6)
    assert p.params_gb == pytest.approx(0.4665926099)  # (1e9 x 2 bf16 + 1e6 x 4 fp32 adapters) / 4 / 2**30
    assert p.grads_gb == pytest.approx(0.0009313226)  # gradients and AdamW only for the 1e6 adapter weights
    assert p.optim_gb == pytest.approx(0.0018626451)


def test_reference_model_replicated_or_sharded_and_fp32():
    assert plan(aux_params=10**9).aux_models_gb == pytest.approx(1.8626451492)  # bf16 copy on every device
    assert plan(aux_params=10**9, aux_sharded=True).aux_models_gb == pytest.approx(0.4656612873)  # a quarter
    fp32 = plan(aux_params=10**9, bf16=False)
    assert fp32.aux_models_gb == pytest.approx(3.7252902985)
    assert fp32.activations_gb == pytest.approx(0.1266598701)  # 32-bit activations: twice the bytes


def test_fits_flips_exactly_at_ninety_percent_of_the_budget():
    total = plan().total_gb
    edge = total / 0.9  # 10% stays free for the allocator and communication buffers
    assert plan(budget_gb=edge * (1 + 1e-12)).fits
    assert not plan(budget_gb=edge * (1 - 1e-9)).fits
    lines = plan().table().splitlines()
    assert lines[0].split()[-2:] == ["0.93", "GB"] and lines[-1].endswith(f"{total:8.2f} GB of 80 GB")


def test_format_count():
    assert [format_count(n) for n in (6.74e9, 1.63e6, 5300, 42)] == ["6.74B", "1.63M", "5.30K", "42"]


def test_logits_are_counted_as_the_loss_computes_them():
    """Unchunked (model.ce_chunk = 0): one head's logits at every position of the micro-batch, 14 bytes each in a
    bf16 step, 16 in fp32. Chunked over positions (logits_rows = the chunk, never more than the micro-batch's
    positions): 6 bytes per logit of one chunk in bf16, 4 in fp32, plus the output projection's gradient
    accumulator (fp32) and one chunk's product of it (compute dtype)."""
    assert plan(bf16=False).logits_gb == pytest.approx(200 * 32000 * 16 / 2**30)
    acc = 32000 * 1000 * (4 + 2)  # vocab x dim: fp32 accumulator + a bf16 product
    assert plan(logits_rows=50).logits_gb == pytest.approx((50 * 32000 * 6 + acc) / 2**30)
    assert plan(logits_rows=10**6).logits_gb == pytest.approx((200 * 32000 * 6 + acc) / 2**30)
    assert plan(logits_rows=50, bf16=False).logits_gb == pytest.approx(
        (50 * 32000 * 4 + 32000 * 1000 * 8) / 2**30
    )
    big = plan(vocab=151936, seq_len=1024, micro_batch=4)  # Qwen2.5's vocabulary: 8 GB for one head unchunked
    assert big.logits_gb == pytest.approx(4096 * 151936 * 14 / 2**30) and big.logits_gb > 8
    chunked = plan(vocab=151936, seq_len=1024, micro_batch=4, logits_rows=1024)
    assert chunked.logits_gb == pytest.approx((1024 * 151936 * 6 + 151936 * 1000 * 6) / 2**30)
    assert chunked.logits_gb < big.logits_gb / 4
