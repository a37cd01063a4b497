"""evaluate.py: pass@k, the judge on real references and wrong solutions, the judge CLI, and evaluate_model."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

import data
import evaluate
from config import REPO, default_data_root

ROOT = Path(default_data_root())
FIXTURES = Path(__file__).parent / "fixtures" / "codecontests"


@pytest.fixture(scope="module")
def mbpp():
    return evaluate.load_problems("mbpp", ROOT)


@pytest.fixture(scope="module")
def humaneval():
    return evaluate.load_problems("humaneval", ROOT)


@pytest.fixture(scope="module")
def codecontests():
    return evaluate.load_problems("codecontests", ROOT)


def comb_pass(n: int, c: int, k: int) -> float:
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def test_pass_at_k_matches_the_combinatorial_form():
    for n in (1, 5, 10, 37, 200):
        for c in range(0, n + 1, max(1, n // 7)):
            for k in (1, 5, 10, 100):
                if k <= n:
                    assert evaluate.pass_at_k(n, c, k) == pytest.approx(comb_pass(n, c, k), abs=1e-12)
    assert evaluate.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert evaluate.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)
    assert evaluate.pass_at_k(10, 3, 10) == 1.0
    assert evaluate.pass_at_k(1000, 1, 1) == pytest.approx(0.001)  # stable where C(n, k) overflows floats
    with pytest.raises(ValueError):
        evaluate.pass_at_k(5, 6, 1)


def test_half_reference_half_wrong_gives_exactly_one_half(mbpp):
    ids = [t for t in sorted(mbpp) if 11 <= t <= 30]
    preds = {
        t: [mbpp[t]["code"] if i % 2 == 0 else "def unrelated():\n    return 0\n"] for i, t in enumerate(ids)
    }
    m = evaluate.judge("mbpp", mbpp, preds, timeout=10, workers=2)
    assert m["pass@1"] == 0.5 and m["exact_match"] == 0.5
    assert (m["n_problems"], m["n_samples"]) == (20, 20)
    assert "pass@5" not in m  # only k <= n
    failed = m["problems"][str(ids[1])]
    assert failed["passed"] == 0 and failed["failures"][0]["kind"] == "runtime_error"
    assert m["network_isolated"] is (os.geteuid() == 0)


def test_ten_samples_closed_form_pass_at_k(mbpp):
    wrong = "def {name}(*a, **k):\n    return None\n"
    preds = {}
    for t, c in ((11, 3), (12, 7)):
        name = mbpp[t]["test_list"][0].split("assert ")[1].split("(")[0].strip()
        preds[t] = [mbpp[t]["code"]] * c + [wrong.format(name=name)] * (10 - c)
    m = evaluate.judge("mbpp", mbpp, preds, timeout=10, workers=2)
    for k in (1, 5, 10):
        assert m[f"pass@{k}"] == pytest.approx((comb_pass(10, 3, k) + comb_pass(10, 7, k)) / 2)
    assert "pass@100" not in m
    assert m["problems"]["11"]["passed"] == 3 and m["problems"]["12"]["passed"] == 7
    kinds = {f["kind"] for f in m["problems"]["11"]["failures"]}
    assert kinds == {"wrong_answer"} and len(m["problems"]["11"]["failures"]) == 7


def test_mbpp_reference_subset_passes(mbpp):
    """120 references across all four splits, including the slow task 123."""
    ids = sorted({*range(1, 11), *range(11, 511, 9), *range(511, 601, 6), *range(601, 975, 9), 123})[:120]
    assert 123 in ids and {1, 11, 511, 601} <= set(ids) and len(ids) == 120
    m = evaluate.judge("mbpp", mbpp, {t: [mbpp[t]["code"]] for t in ids}, timeout=20, workers=2)
    assert m["pass@1"] == 1.0 and m["exact_match"] == 1.0, m["failure_kinds"]


def test_humaneval_canonical_solutions_pass(humaneval):
    preds = {k: [p["canonical_solution"]] for k, p in humaneval.items()}
    m = evaluate.judge("humaneval", humaneval, preds, timeout=20, workers=2)
    assert m["n_problems"] == 164 and m["pass@1"] == 1.0, m["failure_kinds"]


def _fixture_preds(problems: dict, max_tests: int | None) -> tuple[dict, dict]:
    preds, probs = {}, {}
    for f in sorted(FIXTURES.glob("*_correct.py")):
        prefix = f.name[: -len("_correct.py")]
        name = next(k for k in problems if k.startswith(prefix + "."))
        preds[name] = [f.read_text(), (FIXTURES / f"{prefix}_wrong.py").read_text()]
        p = problems[name]
        probs[name] = dict(p, tests=p["tests"][:max_tests]) if max_tests else p
    assert len(preds) >= 5
    return preds, probs


def _check_fixtures(m: dict) -> None:
    for name, p in m["problems"].items():
        assert p["passed"] == 1 and p["failures"][0]["sample"] == 1, name  # correct passes, wrong fails
        assert p["failures"][0]["kind"] == "wrong_answer"
    assert m["pass@1"] == 0.5 and m["exact_match"] is None and "checker" in m["note"]


def test_codecontests_fixtures_on_public_and_first_hidden_tests(codecontests):
    preds, probs = _fixture_preds(codecontests, max_tests=8)
    _check_fixtures(evaluate.judge("codecontests", probs, preds, workers=2))


@pytest.mark.slow
def test_codecontests_fixtures_on_every_test(codecontests):
    preds, probs = _fixture_preds(codecontests, max_tests=None)
    _check_fixtures(evaluate.judge("codecontests", probs, preds, workers=2))


def test_codecontests_tokens_and_time_limit(codecontests):
    p = dict(next(iter(codecontests.values())), tests=[("3\n", "1 2\n3\n")], time_limit_s=0.2)
    assert evaluate.judge_io("print(' 1  2 ')\nprint(3)", p)["passed"]  # whitespace-token comparison
    assert evaluate.judge_io("print(1, 2, 4)", p)["kind"] == "wrong_answer"
    slow = evaluate.judge_io("while True: pass", p, time_scale=1.0)
    assert slow["kind"] == "timeout"


@pytest.mark.slow
def test_all_974_mbpp_references_pass(mbpp):
    m = evaluate.judge("mbpp", mbpp, {t: [r["code"]] for t, r in mbpp.items()}, timeout=30, workers=2)
    assert m["n_problems"] == 974 and m["pass@1"] == 1.0, m["failure_kinds"]


# --------------------------------------------------------------------------- CLI


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WMTP_DATA_DIR=str(ROOT))
    return subprocess.run(
        [sys.executable, str(REPO / "evaluate.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_judge_cli_end_to_end(tmp_path, mbpp):
    pred = tmp_path / "p.jsonl"
    lines = [
        {"task_id": 11, "completions": [mbpp[11]["code"], "x = ("]},
        {"task_id": 12, "completions": ["pass", "pass"]},
    ]
    pred.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "sub" / "metrics.json"
    r = _cli("judge", "--dataset", "mbpp", "--predictions", str(pred), "--out", str(out), "--workers", "2")
    assert r.returncode == 0, r.stderr
    m = json.loads(out.read_text())
    assert m["pass@1"] == 0.25 and m["n_problems"] == 2 and m["n_samples"] == 4
    assert m["problems"]["11"]["failures"] == [
        {"sample": 1, "kind": "syntax", "detail": m["problems"]["11"]["failures"][0]["detail"]}
    ]
    assert not list(out.parent.glob(".*"))  # no temp file left


def test_judging_runs_without_torch():
    """evaluate.py imports torch (and model, generate, parallel) inside the functions that need it, so judging
    (the judge CLI, the critic's `tests` reward) starts without it."""
    code = (
        "import sys, evaluate\n"
        "v = evaluate.judge_completion('mbpp', {'test_list': ['assert f() == 1'], 'test_setup_code': ''},"
        " 'def f():\\n    return 1\\n')\n"
        "assert v['passed'], v\n"
        "assert 'torch' not in sys.modules, 'judging imported torch'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "line, message",
    [
        ({"task_id": 99999, "completions": ["pass"]}, "p.jsonl:2: unknown task_id 99999"),
        ({"task_id": 11, "completions": []}, "p.jsonl:2: 'completions' must be"),
        ({"completions": ["pass"]}, "p.jsonl:2: expected an object with 'task_id'"),
    ],
)
def test_bad_predictions_name_the_line(tmp_path, line, message):
    pred = tmp_path / "p.jsonl"
    pred.write_text(json.dumps({"task_id": 12, "completions": ["pass"]}) + "\n" + json.dumps(line) + "\n")
    r = _cli("judge", "--dataset", "mbpp", "--predictions", str(pred), "--out", str(tmp_path / "m.json"))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--timeout", "0"], "--timeout 0.0: expected seconds per program, a number > 0"),
        (["--timeout", "nan"], "--timeout nan: expected seconds per program, a number > 0"),
        (["--workers", "-3"], "--workers -3: expected parallel programs, an integer >= 0 (0: all cores)"),
        (["--time-scale", "-2"], "--time-scale -2.0: expected a factor of the time limits, > 0"),
    ],
)
def test_judge_options_out_of_range_are_one_line(tmp_path, capsys, args, message):
    """--timeout 0 judged every program a timeout (pass@1 = 0, isolation reported off); now refused."""
    pred = tmp_path / "p.jsonl"
    pred.write_text('{"task_id": 11, "completions": ["pass"]}\n')
    out = tmp_path / "m.json"
    argv = ["judge", "--dataset", "mbpp", "--predictions", str(pred), "--out", str(out), *args]
    assert evaluate.main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "m.json").exists()


def test_a_predictions_file_that_is_not_utf8_names_the_line(tmp_path, capsys):
    pred = tmp_path / "p.jsonl"
    pred.write_bytes(
        b'{"task_id": 12, "completions": ["pass"]}\n{"task_id": 13, "completions": ["caf\xe9"]}\n'
    )
    argv = ["judge", "--dataset", "mbpp", "--predictions", str(pred), "--out", str(tmp_path / "m.json")]
    assert evaluate.main(argv) == 2
    assert capsys.readouterr().err == f"error: {pred}:2: not UTF-8 text (byte 0xe9 at column 37)\n"


def test_unknown_task_id_error_in_python(tmp_path, humaneval):
    pred = tmp_path / "p.jsonl"
    pred.write_text(
        '{"task_id": "HumanEval/0", "completions": ["pass"]}\n{"task_id": "HumanEval/999", "completions": ["x"]}\n'
    )
    with pytest.raises(
        evaluate.EvalError, match=r"p.jsonl:2: unknown task_id 'HumanEval/999' for dataset humaneval"
    ):
        evaluate.read_predictions(pred, "humaneval", humaneval)


# --------------------------------------------------------------------------- with a model


TOKENIZERS = ["tokenizer", "tokenizer_llama"]  # tiny.py's byte-level BPE and Llama-2 style tokenizers


@pytest.mark.parametrize("tok_name", [*TOKENIZERS, "tokenizer_llama3", "tokenizer_qwen"])  # + today's BPEs
def test_evaluation_prompts_are_the_training_rows_prompts(tok_name, tiny_dir, tmp_path, mbpp):
    """Generation starts from exactly the tokens that precede the completion in training (same split here)."""
    from transformers import AutoTokenizer

    import config

    tok = AutoTokenizer.from_pretrained(str(tiny_dir / tok_name))
    cfg = config.load_config(
        None, [f"--storage.cache_dir={json.dumps(str(tmp_path))}", "--eval.split=validation"]
    )
    items = evaluate._prompts(cfg, "mbpp", mbpp, 0)
    rows = {r["task_id"]: r for r in data.build_dataset(cfg, tok, "validation")}
    assert sorted(rows) == sorted(k for k, _ in items) and len(rows) == 90
    for (key, _), ids in zip(items, evaluate.prompt_ids(tok, [p for _, p in items], 4096), strict=True):
        row = rows[key]
        assert ids == row["input_ids"][: row["loss_mask"].index(True)], key


@pytest.mark.parametrize("tok_name", TOKENIZERS)
def test_evaluate_model_on_tiny_model_writes_the_report(tok_name, tiny_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer

    import config
    import formats

    torch.manual_seed(0)
    net = formats.load_model(tiny_dir / "base_meta", "meta", 4)
    tok = AutoTokenizer.from_pretrained(str(tiny_dir / tok_name))
    cfg = config.load_config(None, ["--eval.max_new_tokens=24", "--eval.batch_size=4", "--eval.workers=2"])
    cfg.storage.data_root = str(ROOT)
    hist = tmp_path / "w.png"
    hist.write_bytes(b"\x89PNG fake")
    out = tmp_path / "report"
    flat = evaluate.evaluate_model(
        cfg, net, tok, ["mbpp", "humaneval", "codecontests"], 2, 2, out, weight_histogram=hist
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for ds in (
        "mbpp",
        "humaneval",
        "codecontests",
    ):  # pass@1 with n = 2: the mean fraction of passing samples
        per = metrics[ds]["problems"].values()
        assert flat[f"{ds}/pass_at_1"] == pytest.approx(sum(q["passed"] / q["n"] for q in per) / len(per))
    for k in range(1, 5):
        assert math.isfinite(flat[f"mbpp/head{k}_ce"]) and flat[f"mbpp/head{k}_ce"] > 0
    assert "codecontests/head1_ce" not in flat  # no references to score
    names = {p.name for p in out.iterdir()}
    assert {
        "samples.jsonl",
        "metrics.json",
        "pass_fail.png",
        "head_ce_mbpp.png",
        "weight_histogram.png",
    } <= names
    assert metrics["mbpp"]["n_problems"] == 2 and metrics["mbpp"]["n_samples"] == 4
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {s["dataset"] for s in samples} == {"mbpp", "humaneval", "codecontests"}
    for s in samples:
        if s["dataset"] == "mbpp":
            assert not any(stop in s["completion"] for stop in data.MBPP_STOP)


# --------------------------------------------------------------------------- evaluate.py CONFIG --checkpoint DIR


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_dir, tmp_path_factory):
    """The tiny base in our format with its tokenizer beside it (what checkpoints/final holds)."""
    import shutil

    import formats

    ck = tmp_path_factory.mktemp("ck") / "final"
    formats.save_checkpoint(formats.load_model(tiny_dir / "base_meta", "meta"), ck)
    for f in (tiny_dir / "tokenizer").iterdir():
        shutil.copy(f, ck / f.name)
    return ck


def test_model_cli_defaults_options_and_a_report_that_agrees_with_itself(tiny_checkpoint, capsys):
    """The tokenizer comes from the checkpoint (model.tokenizer empty), the report goes to <checkpoint>/eval,
    --limit and --n set the problems and samples; every sample's pass flag is its problem's verdict in
    metrics.json, and pass@1 is the mean fraction of passing samples."""
    argv = ["configs/tiny_mbpp.toml", "--checkpoint", str(tiny_checkpoint), "--limit", "3", "--n", "2"]
    argv += ["--model.tokenizer=", "--eval.max_new_tokens=12", "--eval.temperature=0.8", "--eval.workers=2"]
    assert evaluate.main(argv) == 0
    flat = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = tiny_checkpoint / "eval"
    m = json.loads((report / "metrics.json").read_text())["mbpp"]
    assert (m["n_problems"], m["n_samples"]) == (3, 6) and list(m["problems"]) == ["11", "12", "13"]
    assert flat["mbpp/pass_at_1"] == pytest.approx(
        sum(q["passed"] / q["n"] for q in m["problems"].values()) / 3
    )
    samples = [json.loads(line) for line in (report / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6
    for i, smp in enumerate(samples):
        failed = {f["sample"]: f["kind"] for f in m["problems"][str(smp["task_id"])]["failures"]}
        assert smp["passed"] == (i % 2 not in failed) and smp["kind"] == failed.get(i % 2, "ok")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--datasets", "mbpp,mpbb"], "error: --datasets: unknown ['mpbb']"),
        (["--checkpoint", "/nonexistent/ck"], "error: --checkpoint: "),
        (["--n", "-2"], "error: --n -2: expected the number of samples per problem, an integer >= 1"),
        (["--limit", "-3"], "error: --limit -3: expected the number of problems, an integer >= 0 (0: all)"),
        (["--datasets", ",,"], "error: --datasets ',,': an empty name; expected a comma list of mbpp, "),
    ],
)
def test_model_cli_errors_are_one_line_and_exit_2(args, message, tiny_checkpoint, capsys):
    argv = ["configs/tiny_mbpp.toml", "--checkpoint", str(tiny_checkpoint), "--model.tokenizer=", *args]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.splitlines()) == 1 and "Traceback" not in err, err


def test_greedy_completions_do_not_depend_on_the_batch_size(tiny_checkpoint):
    from transformers import AutoTokenizer

    import config
    import formats

    net = formats.load_checkpoint(tiny_checkpoint).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    problems = data.mbpp_split(data.load_mbpp(ROOT / "mbpp"), "test")[:4]
    prompts = [data.mbpp_prompt(p) for p in problems]
    got = []
    for bs in (1, 4):
        cfg = config.load_config(
            None, ["--eval.temperature=0", "--eval.max_new_tokens=16", f"--eval.batch_size={bs}"]
        )
        got.append(evaluate.generate(cfg, net, tok, prompts, 1, data.MBPP_STOP))
    assert got[0] == got[1] and all(len(c) == 1 for c in got[0])


@pytest.mark.parametrize("tok_name", ["tokenizer_llama3", "tokenizer_qwen"])
def test_prompts_cut_to_room_keep_bos_only_when_there_is_one(tok_name, tiny_dir):
    """A prompt too long for the room loses its oldest tokens: after BOS (Llama 3), from the very start (Qwen)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir / tok_name))
    text = "def f(x):\n    return x + 1\n" * 8
    full = data.encode_prompt(tok, text)
    [cut] = evaluate.prompt_ids(tok, [text], 10)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    assert len(full) > 10 and cut == bos + full[len(full) - 10 + len(bos) :] and len(cut) == 10
