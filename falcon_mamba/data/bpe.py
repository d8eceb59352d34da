"""Fit a small byte-level BPE tokenizer to a corpus with `tokenizers` (for small models, where the
65k-token Falcon vocabulary would be most of the parameters).

Byte-level like Falcon's (any UTF-8 text round-trips), digits split one by one, and one special
token, ``<|endoftext|>`` (id 0), that ends every document and every assistant turn.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

EOS = "<|endoftext|>"


def _line_batches(texts: Iterable[str], lines_per_item: int = 200):
    """Feed the trainer pieces of a few hundred lines: whole multi-MB strings train slowly."""
    for text in texts:
        lines = text.splitlines(keepends=True)
        for i in range(0, len(lines), lines_per_item):
            yield "".join(lines[i:i + lines_per_item])


def fit_bpe(texts: list[str], vocab_size: int, out_dir: str | Path) -> Path:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts``; write tokenizer.json and
    tokenizer_config.json into out_dir and return the tokenizer.json path."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from falcon_mamba.errors import UserError

    if vocab_size < 300:
        raise UserError(f"a byte-level BPE needs at least 300 tokens (256 bytes + merges), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_line_batches(texts), trainer=trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tokenizer.json"
    tok.save(str(path))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": EOS, "pad_token": EOS, "tokenizer_class": "PreTrainedTokenizerFast"}, indent=2) + "\n",
        encoding="utf-8")
    return path
