"""Evaluation: perplexity / bits per byte of text files, passkey retrieval, lm-evaluation-harness.

    from falcon_mamba.eval import perplexity_file, run_passkey
    res = perplexity_file(model, tok, "book.txt")          # res.perplexity, res.bits_per_byte
    rows = run_passkey(model, tok, [1024, 8192])            # one PasskeyRow per length

The harness adapter (falcon_mamba.eval.harness) needs the ``eval`` extra and is imported on demand.
"""

from falcon_mamba.eval.passkey import format_table, parse_lengths, run_passkey
from falcon_mamba.eval.perplexity import PerplexityResult, perplexity_file, perplexity_text

__all__ = ["PerplexityResult", "format_table", "parse_lengths", "perplexity_file", "perplexity_text",
           "run_passkey"]
