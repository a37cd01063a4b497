"""The synthetic benchmark's language: token classes known in advance, and the generator of its rows (words).

data.py turns rows into token ids (`data.synthetic_rows` / `synthetic_prompts` / `synthetic_dataset`), evaluate.py
measures weights and CE per token class, tiny.py builds the word-level tokenizer over SYN_VOCAB.

A row is BOS, then 1..max_segments task segments, then EOS. Every target token has a class fixed by how it was
drawn, so the right weighting is known in advance (keep LEARNABLE and RANDOM, drop JUNK and CORRUPT):
  copy  s1 .. sL = s1 .. sL      the copy after "=" is LEARNABLE (an induction rule)
  nest  b1 .. bL = cL .. c1      the closing brackets, in order, are LEARNABLE
  chain x f(x) f(f(x)) ..        CHAIN_LEN values of a fixed permutation f of the symbols: LEARNABLE after x
Markers, spans, "=" (the span length is random) and EOS (so is the segment count) are RANDOM: clean but
unpredictable. Noise: a JUNK run of random tokens before a segment (probability `junk`), and each LEARNABLE token
replaced by another random token with probability `corrupt` (CORRUPT; the next tokens still follow the true
value). The clean variant is corrupt = junk = 0. The split "test" is always clean and seeded by test_seed.
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

LEARNABLE, RANDOM, JUNK, CORRUPT = 0, 1, 2, 3
TOKEN_CLASSES = ("learnable", "random", "junk", "corrupt")
SYN_SYMBOLS = tuple(f"w{i}" for i in range(48))
SYN_OPEN, SYN_CLOSE = ("(", "[", "{", "<"), (")", "]", "}", ">")
SYN_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
SYN_VOCAB = (*SYN_SPECIALS.values(), "copy", "nest", "chain", "=", *SYN_OPEN, *SYN_CLOSE, *SYN_SYMBOLS)
SYN_NOISE = (*SYN_SYMBOLS, *SYN_OPEN, *SYN_CLOSE)  # what junk and corruption draw from
CHAIN_LEN = 4
SYNTHETIC_VERSION = 1  # bump when the generator changes: it is part of the data hash


def chain_rule(rule_seed: int) -> dict[str, str]:
    """The chain task's fixed function: a random permutation of the symbols (the same for every row)."""
    image = list(SYN_SYMBOLS)
    random.Random(f"synthetic-rule:{rule_seed}").shuffle(image)
    return dict(zip(SYN_SYMBOLS, image, strict=True))


def segment(task: str, rng: random.Random, rule: dict[str, str], sc: Any) -> tuple[list[str], list[int]]:
    """One task segment's words and their classes (a held-out prompt is one, cut at its first LEARNABLE)."""
    if task == "chain":
        values = [rng.choice(SYN_SYMBOLS)]
        for _ in range(CHAIN_LEN):
            values.append(rule[values[-1]])
        return ["chain", *values], [RANDOM, RANDOM] + [LEARNABLE] * CHAIN_LEN
    n = rng.randint(sc.min_span, sc.max_span)
    if task == "copy":
        span = [rng.choice(SYN_SYMBOLS) for _ in range(n)]
        answer = span
    else:  # nest
        span = [rng.choice(SYN_OPEN) for _ in range(n)]
        answer = [SYN_CLOSE[SYN_OPEN.index(b)] for b in reversed(span)]
    return [task, *span, "=", *answer], [RANDOM] * (n + 2) + [LEARNABLE] * n


def example(
    rng: random.Random, rule: dict[str, str], sc: Any, budget: int, corrupt: float, junk: float
) -> tuple[list[str], list[int]]:
    """One row's words after BOS (EOS last) and the class of each; at most `budget` words."""
    words: list[str] = []
    classes: list[int] = []
    for i in range(rng.randint(1, sc.max_segments)):
        run: list[str] = []
        if rng.random() < junk:
            run = [rng.choice(SYN_NOISE) for _ in range(rng.randint(sc.min_span, sc.max_span))]
        seg, seg_cls = segment(rng.choice(sc.tasks), rng, rule, sc)
        if i > 0 and len(words) + len(run) + len(seg) + 1 > budget:
            break
        words += run + seg
        classes += [JUNK] * len(run) + seg_cls
    for j, c in enumerate(classes):
        if c == LEARNABLE and rng.random() < corrupt:
            words[j] = rng.choice([w for w in SYN_NOISE if w != words[j]])
            classes[j] = CORRUPT
    return words + [SYN_SPECIALS["eos_token"]], classes + [RANDOM]


def fingerprint(cfg: Any) -> str:
    """What decides the synthetic rows (the data hash of a run): generator version, its keys, seed, length."""
    spec = {
        "version": SYNTHETIC_VERSION,
        "synthetic": vars(cfg.data.synthetic),
        "seed": cfg.data.seed,
        "max_length": cfg.data.max_length,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
