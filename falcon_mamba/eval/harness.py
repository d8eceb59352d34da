"""lm-evaluation-harness model "falcon-mamba": loglikelihood, loglikelihood_rolling, generate_until.

Three ways in, after ``pip install "falcon-mamba[eval]"`` (or ``pip install -e ".[dev]"``):

    falcon-mamba eval harness --model falcon-mamba --model_args pretrained=FOLDER,dtype=bfloat16 \\
        --tasks hellaswag --batch_size 16          (lm-eval's own CLI, with the model registered)
    python -m falcon_mamba.eval.harness ...        (the same)
    lm_eval.simple_evaluate(model=FalconMambaLM(pretrained=FOLDER), tasks=[...])   (Python)

Importing this module registers "falcon-mamba" in lm-eval's model registry, so after
``import falcon_mamba.eval.harness`` also ``simple_evaluate(model="falcon-mamba", ...)`` works.
lm-eval (0.4.13 checked) reads no plugin entry points, so a plain ``lm_eval --model falcon-mamba``
cannot find the model by itself; the ``lm_eval.models`` entry point in pyproject.toml is for
lm-eval versions that read them. (No start-up hook is installed: code that would run at every
Python start of a user's environment is not ours to add.)

Model args: pretrained (folder or Hub id; default: the embedded model), device, dtype, batch_size,
max_gen_toks (256), chunk_size (tokens per forward chunk, 2048).

How each request type runs:
- loglikelihood: (context, continuation) pairs sorted by length, batched with right padding (a
  causal model's positions never see the padding after them), and read in chunks of positions
  that carry the state, so the logits in memory stay bounded.
- loglikelihood_rolling: the whole document in one pass of chunks carrying the state: with a
  recurrent state there is no context window, so every token is scored with all text before it.
- generate_until: falcon_mamba.generate (prompts prefilled row by row, decoded as one batch),
  stopping at the ``until`` strings and EOS.

Legend: B batch, L length, V vocab.
"""

from __future__ import annotations

import json
import logging

import lm_eval.models  # noqa: F401  (fills the registry first: get_model only does it when empty)
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry, register_model
from tqdm import tqdm

LOGITS_BUDGET = 1 << 27  # fp32 logits elements held at once (512 MB) when scoring a batch
ALIASES = ("falcon-mamba", "falcon_mamba")  # the names lm-eval's --model accepts


class FalconMambaLM(TemplateLM):
    def __init__(self, pretrained: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str = 8, max_gen_toks: int = 256, chunk_size: int = 2048,
                 **unused):
        super().__init__()
        import falcon_mamba as fm
        from falcon_mamba.dtypes import parse_dtype
        from falcon_mamba.tokenizer import check_fits

        if pretrained is None:
            from falcon_mamba import default_model

            pretrained = str(default_model.path())
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm_eval's CLI passes --device cuda by default, also on machines without a GPU.
            if device is not None:
                logging.getLogger(__name__).warning("no CUDA GPU here: running falcon-mamba on the CPU")
            device = "cuda" if torch.cuda.is_available() else "cpu"
        default_dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.model = fm.load_model(pretrained, parse_dtype(dtype, default_dtype), device)
        self.tokenizer = fm.load_tokenizer(pretrained)
        check_fits(self.tokenizer, self.model.config.vocab_size)
        self._device = self.model.device
        # "auto" (or "auto:N") has no meaning here: memory is bounded by chunk_size, not by lengths.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)
        self.chunk_size = int(chunk_size)
        self.pretrained = str(pretrained)

    # ---- tokens ------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.model.config.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        from falcon_mamba.eval.perplexity import prefix_token_id

        return prefix_token_id(self.tokenizer, self.model)

    @property
    def max_length(self) -> int:
        return 1 << 30  # no context window: the state is the same size at any length

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    # ---- loglikelihood -----------------------------------------------------------------------
    @torch.no_grad()
    def _score_batch(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """rows of (context ids, continuation ids) -> (sum log p(continuation), all greedy)."""
        seqs = [(ctx + cont)[:-1] for ctx, cont in rows]
        B, Lmax, V = len(rows), max(map(len, seqs)), self.model.config.vocab_size
        ids_BL = torch.full((B, Lmax), self.eot_token_id, dtype=torch.long)
        for b, s in enumerate(seqs):
            ids_BL[b, :len(s)] = torch.tensor(s)
        ids_BL = ids_BL.to(self.model.device)
        # Row b's continuation is predicted at positions [len(seq) - len(cont), len(seq)).
        spans = [(len(s) - len(cont), len(s)) for s, (_, cont) in zip(seqs, rows)]
        logp = [0.0] * B
        greedy = [True] * B
        chunk = max(1, min(self.chunk_size, LOGITS_BUDGET // (B * V)))
        state = None
        for s0 in range(0, Lmax, chunk):
            logits_BLV, state = self.model(ids_BL[:, s0:s0 + chunk], state=state)
            for b, (lo, hi) in enumerate(spans):
                a, z = max(lo, s0), min(hi, s0 + logits_BLV.shape[1])
                if a >= z:
                    continue
                lp = F.log_softmax(logits_BLV[b, a - s0:z - s0].float(), dim=-1)
                target = torch.tensor(rows[b][1][a - lo:z - lo], device=lp.device)
                logp[b] += lp.gather(-1, target[:, None]).sum().item()
                greedy[b] = greedy[b] and bool((lp.argmax(-1) == target).all())
        return list(zip(logp, greedy))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        order = sorted(range(len(requests)), key=lambda i: -(len(requests[i][1]) + len(requests[i][2])))
        results: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood")
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            for i, res in zip(idx, self._score_batch([(requests[i][1], requests[i][2]) for i in idx])):
                results[i] = res
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], res)
            bar.update(len(idx))
        bar.close()
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from falcon_mamba.eval.perplexity import NLLScorer

        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling"):
            (text,) = req.args
            scorer = NLLScorer(self.model, self.prefix_token_id, self.chunk_size)
            scorer.feed(self.tok_encode(text))
            scorer.finish()
            out.append(-scorer.nll)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), out[-1])
        return out

    # ---- generation --------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from falcon_mamba.generate import generate

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until")
        for idx in groups.values():
            kw = dict(requests[idx[0]].args[1])
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = {"max_new_tokens": int(kw.pop("max_gen_toks", self.max_gen_toks)),
                        "stop": tuple(u for u in until if u)}
            if kw.pop("do_sample", False):
                sampling["temperature"] = float(kw.pop("temperature", 1.0))
                for name in ("top_k", "top_p", "seed"):
                    if name in kw:
                        sampling[name] = kw.pop(name)
            else:
                sampling["temperature"] = 0.0
            for start in range(0, len(idx), self.batch_size):
                part = idx[start:start + self.batch_size]
                prompts = [self.tok_encode(requests[i].args[0]) or [self.prefix_token_id] for i in part]
                texts = generate(self.model, self.tokenizer, prompts, **sampling)
                for i, text in zip(part, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(part))
        bar.close()
        return out

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """For --apply_chat_template: the tokenizer's template (or the documented fallback)."""
        return self.tokenizer.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def get_model_info(self) -> dict:
        info = {"model_source": self.pretrained, "model_dtype": str(self.model.dtype)}
        if getattr(self.model, "quantization", None):
            q = self.model.quantization
            info["quantization"] = f"int{q['bits']}" + (f"-g{q['group_size']}" if q["group_size"] else "")
        return info


if __name__ == "__main__":
    # Run as `python -m falcon_mamba.eval.harness`, this file's class is a copy that cannot be imported
    # by name (__main__.FalconMambaLM); register the importable one lazily.
    for _alias in ALIASES:
        if _alias not in model_registry:
            model_registry.register(_alias, target="falcon_mamba.eval.harness:FalconMambaLM")
else:
    register_model(*ALIASES)(FalconMambaLM)


def main(argv: list[str] | None = None) -> None:
    """lm-eval's CLI with this model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = ["lm_eval", *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
