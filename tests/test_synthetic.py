"""The synthetic benchmark (data.py): classes correct by construction, seeded, clean variant; its tokenizer; the
per-class weight metrics (evaluate.py) on hand-made inputs; the critic's `dataset` reward."""

from __future__ import annotations

import collections

import pytest
import torch

import config as C
import data
import evaluate
import formats
import model as M
import synthetic


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_dir / "synthetic_tokenizer"))


def cfg_for(*overrides: str) -> C.Config:
    return C.load_config(None, ["--data.dataset=synthetic", "--data.max_length=96", *overrides])


def check_row(ids: list[int], classes: list[int], tok, rule: dict[str, str]) -> collections.Counter:
    """Re-derive every token's class from the row's words alone (an independent parser of the format)."""
    words = tok.convert_ids_to_tokens(ids)
    assert words[0] == "<s>" and classes[0] == -1 and words[-1] == "</s>" and classes[-1] == synthetic.RANDOM
    seen: collections.Counter = collections.Counter()
    i, n = 1, len(words) - 1
    while i < n:
        if classes[i] == synthetic.JUNK:
            assert words[i] in synthetic.SYN_NOISE
            seen["junk"] += 1
            i += 1
            continue
        task = words[i]
        assert classes[i] == synthetic.RANDOM and task in ("copy", "nest", "chain"), (i, words[i], classes[i])
        if task == "chain":
            assert classes[i + 1] == synthetic.RANDOM and words[i + 1] in synthetic.SYN_SYMBOLS
            expected, j = [rule[words[i + 1]]], i + 2
            for _ in range(synthetic.CHAIN_LEN - 1):
                expected.append(rule[expected[-1]])
        else:
            j = i + 1
            while words[j] != "=":
                assert classes[j] == synthetic.RANDOM
                j += 1
            span = words[i + 1 : j]
            assert classes[j] == synthetic.RANDOM and synthetic.SYN_SPECIALS["eos_token"] not in span
            if task == "copy":
                expected = span
            else:
                assert all(b in synthetic.SYN_OPEN for b in span)
                expected = [synthetic.SYN_CLOSE[synthetic.SYN_OPEN.index(b)] for b in reversed(span)]
            j += 1
        for (
            e
        ) in expected:  # the rule's token (LEARNABLE) or anything else (CORRUPT), never the rule's by chance
            assert classes[j] in (synthetic.LEARNABLE, synthetic.CORRUPT)
            assert (words[j] == e) == (classes[j] == synthetic.LEARNABLE), (j, words[j], e, classes[j])
            seen["corrupt" if classes[j] == synthetic.CORRUPT else "learnable"] += 1
            j += 1
        i = j
    return seen


def test_classes_correct_by_construction(tok):
    cfg = cfg_for("--data.synthetic.n_train=300")
    rows = data.synthetic_rows(cfg, tok, "train")
    rule = synthetic.chain_rule(cfg.data.synthetic.rule_seed)
    total: collections.Counter = collections.Counter()
    for ids, cls, mask, reward in zip(
        rows["input_ids"], rows["token_class"], rows["loss_mask"], rows["reward"], strict=True
    ):
        seen = check_row(ids, cls, tok, rule)
        total += seen
        assert len(ids) <= cfg.data.max_length and mask == [False] + [True] * (len(ids) - 1)
        assert reward == pytest.approx(1 - (seen["junk"] + seen["corrupt"]) / (len(ids) - 1), abs=1e-12)
    assert sorted(total) == ["corrupt", "junk", "learnable"]
    q = total["corrupt"] / (total["corrupt"] + total["learnable"])
    assert abs(q - cfg.data.synthetic.corrupt) < 0.03, q  # 300 rows: ~1400 learnable positions


def test_seeded_and_clean_variant(tok):
    cfg = cfg_for("--data.synthetic.n_train=50", "--data.synthetic.n_test=40")
    a, b = data.synthetic_rows(cfg, tok, "train"), data.synthetic_rows(cfg, tok, "train")
    assert a == b
    other = cfg_for("--data.synthetic.n_train=50", "--data.synthetic.n_test=40", "--data.seed=7")
    assert data.synthetic_rows(other, tok, "train")["input_ids"] != a["input_ids"]
    assert data.synthetic_rows(cfg, tok, "validation")["input_ids"][:50] != a["input_ids"]
    test = data.synthetic_rows(cfg, tok, "test")
    assert test == data.synthetic_rows(other, tok, "test")  # the held-out set does not follow data.seed
    clean = cfg_for("--data.synthetic.n_train=200", "--data.synthetic.corrupt=0", "--data.synthetic.junk=0")
    for split_rows in (data.synthetic_rows(clean, tok, "train"), test):
        classes = {c for row in split_rows["token_class"] for c in row}
        assert classes == {-1, synthetic.LEARNABLE, synthetic.RANDOM}
        assert set(split_rows["reward"]) == {1.0}
    prompts = data.synthetic_prompts(cfg, tok)
    assert [p[0] for p in prompts[:3]] == ["copy", "nest", "chain"] and len(prompts) == 40
    rule = synthetic.chain_rule(0)
    for _, prompt, answer in prompts:  # prompt + answer is a clean segment: the answer is all LEARNABLE
        row = prompt + answer + [tok.eos_token_id]
        seen = check_row(
            row,
            [-1] + [synthetic.RANDOM] * (len(prompt) - 1) + [synthetic.LEARNABLE] * len(answer) + [1],
            tok,
            rule,
        )
        assert seen == {"learnable": len(answer)}


def test_tokenizer_and_batches_carry_classes(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(str(tmp_path / "t"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "t"))
    assert again("copy w3 ( = w3")["input_ids"] == [again.bos_token_id] + again.convert_tokens_to_ids(
        ["copy", "w3", "(", "=", "w3"]
    )
    assert again.decode(again("nest { = }")["input_ids"], skip_special_tokens=True) == "nest { = }"
    cfg = cfg_for("--data.synthetic.n_train=10")
    ds = data.build_dataset(cfg, tok, "train")
    batch = next(data.make_loader(ds, 4, tok.pad_token_id))
    B, S = batch["input_ids"].shape
    assert batch["token_class"].shape == (B, S) and batch["reward"].shape == (B,)
    for b, i in enumerate(batch["index"].tolist()):
        row = ds[i]["token_class"]
        assert batch["token_class"][b, : len(row)].tolist() == row
        assert (batch["token_class"][b, len(row) :] == -1).all()
        assert batch["reward"][b].item() == ds[i]["reward"]


def test_other_tokenizer_is_refused(tiny_dir):
    from transformers import AutoTokenizer

    bpe = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))  # the MBPP tokenizer
    with pytest.raises(data.DataError, match="lacks the synthetic words"):
        data.synthetic_rows(cfg_for(), bpe, "train")


def test_class_weight_metrics_on_hand_made_weights():
    # one row, H = 2; targets' classes per pair (t, k); weights chosen by hand
    L, R, J, X = synthetic.LEARNABLE, synthetic.RANDOM, synthetic.JUNK, synthetic.CORRUPT
    cls = torch.tensor([[[L, R], [R, J], [J, X], [X, -1]]])
    valid = torch.tensor([[[1, 1], [1, 1], [1, 1], [1, 0]]], dtype=torch.bool)
    w = torch.tensor([[[2.0, 0.5], [1.0, 0.5], [0.25, 0.1], [0.1, 0.0]]])
    counts = evaluate.class_weight_counts(w, valid, cls, w_max=3.0, bins=60)
    assert counts.shape == (4, 2, 61)
    m = evaluate.class_weight_metrics(counts)
    assert m["synth/weight_learnable"] == 2.0
    assert m["synth/weight_random"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["synth/weight_junk"] == pytest.approx((0.5 + 0.25) / 2)
    assert m["synth/weight_corrupt"] == pytest.approx(0.1)
    assert m["synth/weight_random_head2"] == 0.5 and m["synth/weight_junk_head1"] == 0.25
    assert m["synth/weight_noise_over_clean"] == pytest.approx((0.95 / 4) / (3.5 / 3))
    # clean {2, 0.5, 1} vs noise {0.5, 0.25, 0.1, 0.1}: 11 wins, 1 tie (0.5 = 0.5) of 12 pairs
    assert m["synth/auroc_clean_vs_noise"] == pytest.approx(11.5 / 12)
    # head 1: clean {2, 1} vs noise {0.25, 0.1}: 1; head 2: clean {0.5} vs noise {0.5, 0.1}: (0.5 + 1) / 2
    assert m["synth/auroc_clean_vs_noise_head1"] == 1.0
    assert m["synth/auroc_clean_vs_noise_head2"] == 0.75
    uniform = evaluate.class_weight_metrics(evaluate.class_weight_counts(valid.float(), valid, cls, 3.0))
    assert uniform["synth/auroc_clean_vs_noise"] == 0.5 and uniform["synth/weight_noise_over_clean"] == 1.0


def test_auroc_from_histograms():
    assert evaluate.auroc(torch.tensor([0.0, 0, 3]), torch.tensor([2.0, 1, 0])) == 1.0
    assert evaluate.auroc(torch.tensor([2.0, 1, 0]), torch.tensor([0.0, 0, 3])) == 0.0
    assert evaluate.auroc(torch.tensor([1.0, 1]), torch.tensor([1.0, 1])) == 0.5
    assert evaluate.auroc(torch.tensor([0.0, 1]), torch.tensor([1.0, 0])) == 1.0


def test_critic_dataset_reward(tok, tiny_dir):
    import score

    cfg = cfg_for(
        "--data.synthetic.n_train=12",
        "--loss.scorer=critic_delta_v1",
        "--critic.reward=dataset",
        "--critic.pretrain_steps=0",
    )
    ds = data.build_dataset(cfg, tok, "train")
    state = score.init_state(cfg, formats.load_meta(tiny_dir / "synthetic_base"), tok, "cpu", dataset=ds)
    score.prepare(state, None)  # the rewards of the whole train set, read from the rows
    assert state.rewards.values == {i: r for i, r in zip(ds["index"], ds["reward"], strict=True)}
    with pytest.raises(C.ConfigError, match="critic.reward' = 'dataset' needs a dataset"):
        C.load_config(None, ["--loss.scorer=critic_delta_v1", "--critic.reward=dataset"])


def test_synthetic_base(tiny_dir, tok):
    net = formats.load_meta(tiny_dir / "synthetic_base")
    assert net.args.n_future_tokens == 4 and net.args.vocab_size == len(synthetic.SYN_VOCAB) == len(tok)
    assert (
        M.count_params(net) == 1222272
        and M.count_params(formats.load_meta(tiny_dir / "synthetic_base", 1)) == 619392
    )
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tiny_dir / "synthetic_base")).get_vocab() == tok.get_vocab()


def test_next_token_base_grows_heads_as_copies_of_its_last_block(tiny_dir, tmp_path):
    """The next-token-base start of the study: an H=1 model saved in our format (train.py's export) loads with
    n_future_tokens = 4 as load_meta / load_hf do: the same trunk and head 1, heads 2..4 copies of its last
    block (own tensors), so at step 0 every head gives head 1's logits; the architecture is the H=4 base's."""
    h1 = formats.load_meta(tiny_dir / "synthetic_base", 1)
    formats.save_checkpoint(h1, tmp_path / "nt")
    net = formats.load_model(tmp_path / "nt", "wmtp", 4)
    assert net.args.n_future_tokens == 4 and M.count_params(net) == 1222272
    assert formats.read_model_args(tmp_path / "nt", "wmtp", 4) == net.args
    last = h1.layers[-1].state_dict()
    for k in range(4):
        block = net.head_block(k).state_dict()
        assert block.keys() == last.keys() and all(torch.equal(block[n], last[n]) for n in last)
    assert net.extra_heads[0].attention.wq.weight.data_ptr() != net.layers[-1].attention.wq.weight.data_ptr()
    ids = torch.randint(0, len(synthetic.SYN_VOCAB), (2, 12))
    with torch.no_grad():
        h = net(ids, stage="trunk")
        want = h1(ids)[:, :, 0]  # [B, S, H=1, V]: head 1
        for k in range(4):
            torch.testing.assert_close(net(h, stage=k), want, rtol=1e-5, atol=1e-5)


def context_free(net: M.Transformer, favourite: int) -> M.Transformer:
    """Blocks add nothing and every embedding is the same: every head of every position predicts `favourite`."""
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                p.zero_()
        net.tok_embeddings.weight.fill_(1.0)
        net.output.weight.zero_()
        net.output.weight[favourite] = 8.0 / net.args.dim
    return net


def test_speculative_acceptance_of_the_heads(tiny_dir, tok):
    """synth/spec_accept_head{k}: greedy self-speculative decoding of the held-out prompts, deterministic. Heads
    that always agree with head 1 are always accepted (tokens per forward near H); an H=1 model decodes plainly
    (1.0, no acceptance); a random model's rates are rates. Exact match is plain greedy's either way."""
    cfg = cfg_for("--data.synthetic.n_test=24")
    agree = context_free(formats.load_meta(tiny_dir / "synthetic_base"), tok.convert_tokens_to_ids("a"))
    out = evaluate.evaluate_synthetic(cfg, agree, tok, batch_size=8)
    assert [out[f"synth/spec_accept_head{k}"] for k in (2, 3, 4)] == [1.0, 1.0, 1.0]
    assert 2.0 < out["synth/spec_tokens_per_forward"] <= 4.0
    net = formats.load_meta(tiny_dir / "synthetic_base")
    out = evaluate.evaluate_synthetic(cfg, net, tok, batch_size=8)
    assert out == evaluate.evaluate_synthetic(cfg, net, tok, batch_size=8)  # greedy: the same every time
    rates = [v for k, v in out.items() if k.startswith("synth/spec_accept_head")]
    assert rates and all(0.0 <= r <= 1.0 for r in rates)
    assert 1.0 <= out["synth/spec_tokens_per_forward"] <= 4.0
    plain = evaluate.evaluate_synthetic(
        cfg, formats.load_meta(tiny_dir / "synthetic_base", 1), tok, batch_size=8
    )
    assert plain["synth/spec_tokens_per_forward"] == 1.0
    assert not any(k.startswith("synth/spec_accept") for k in plain)
