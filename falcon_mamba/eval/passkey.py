"""Passkey retrieval: can the model recall a number hidden at some depth of a long filler text?

Each trial builds a prompt of about ``length`` tokens (the classic test of Mohtashami & Jaggi,
"Landmark Attention", 2023):

    There is an important info hidden inside a lot of irrelevant text. Find it and memorize it.
    I will quiz you about the important information there.
    <filler ...> The pass key is 48213. Remember it. 48213 is the pass key. <filler ...>
    What is the pass key? The pass key is

with a random 5-digit key placed at depth d (0 = start of the filler, 1 = end), then decodes
greedily a few tokens and checks that the first number in the output is the key. The prompt is
read with chunked prefill, so memory stays flat at any length.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

from falcon_mamba.errors import UserError

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
NEW_TOKENS = 8  # a 5-digit key is 2-3 tokens with a leading space; some slack for spacing


def parse_lengths(spec: str) -> list[int]:
    """'1k,8k,64k' -> [1024, 8192, 65536]; plain integers are token counts."""
    out = []
    for part in spec.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = {"k": 1024, "m": 1024 * 1024}.get(part[-1], 1)
        digits = part[:-1] if mult > 1 else part
        if not digits.isdigit() or int(digits) == 0:
            raise UserError(f"bad length {part!r} in --lengths; use token counts like 1k,8k,64k or 4096")
        out.append(int(digits) * mult)
    if not out:
        raise UserError("--lengths is empty; give token counts like 1k,8k,64k")
    return out


def build_prompt(tokenizer, length: int, key: int, depth: float) -> list[int]:
    """Token ids of a passkey prompt of at most ``length`` tokens (short of it by less than one
    filler word) with the key at ``depth``."""
    needle = NEEDLE.format(key=key)
    per_filler = len(tokenizer.encode(FILLER * 8)) / 8
    words = FILLER.split(" ")

    def text(n_fill: int, n_words: int = 0) -> str:
        before = round(n_fill * depth)
        return (INTRO + FILLER * before + needle + FILLER * (n_fill - before)
                + " ".join(words[:n_words]) + QUESTION)

    # Fillers: estimate, then correct by the measured length (tokens merge across sentence joins,
    # so the count is not exactly linear); then the largest count that fits.
    n_fill = max(0, int((length - len(tokenizer.encode(INTRO + needle + QUESTION))) / per_filler))
    for _ in range(4):
        step = int((length - len(tokenizer.encode(text(n_fill)))) / per_filler)
        if step == 0:
            break
        n_fill = max(0, n_fill + step)
    while n_fill > 0 and len(tokenizer.encode(text(n_fill))) > length:
        n_fill -= 1

    def encode(n_words: int) -> list[int]:
        return tokenizer.encode(text(n_fill, n_words))

    # Top up with the most words of one more filler that still fit (binary search: encodes are the
    # cost, a handful even at 64k tokens).
    lo, hi = 0, len(words) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(mid)) <= length:
            lo = mid
        else:
            hi = mid - 1
    return encode(lo)


@dataclass
class PasskeyRow:
    length: int  # requested tokens
    trials: int
    found: int
    mean_prompt_tokens: float
    seconds: float
    outputs: list[str]

    @property
    def accuracy(self) -> float:
        return self.found / self.trials


def found_key(output: str, key: int) -> bool:
    m = re.search(r"\d+", output)
    return m is not None and m.group() == str(key)


def run_passkey(model, tokenizer, lengths: list[int], trials: int = 5, seed: int = 0,
                chunk_size: int = 2048) -> list[PasskeyRow]:
    """One row per length; trial i puts the key at depth (i + 0.5) / trials."""
    from falcon_mamba.generate import generate

    if trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        keys = [rng.randint(10000, 99999) for _ in range(trials)]
        prompts = [build_prompt(tokenizer, length, k, (i + 0.5) / trials) for i, k in enumerate(keys)]
        t0 = time.perf_counter()
        outputs = generate(model, tokenizer, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0,
                           ignore_eos=True, prefill="chunked", chunk_size=chunk_size)
        rows.append(PasskeyRow(
            length=length, trials=trials, found=sum(found_key(o, k) for o, k in zip(outputs, keys)),
            mean_prompt_tokens=sum(map(len, prompts)) / trials, seconds=time.perf_counter() - t0,
            outputs=outputs))
    return rows


def format_table(rows: list[PasskeyRow]) -> str:
    lines = ["| length | prompt tokens | trials | found | accuracy | seconds |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.length:,} | {r.mean_prompt_tokens:,.0f} | {r.trials} | {r.found} | "
                     f"{r.accuracy:.0%} | {r.seconds:.1f} |")
    return "\n".join(lines)
