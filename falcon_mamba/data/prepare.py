"""Text or jsonl files -> a prepared data folder (token shards, document boundaries, validation split).

Inputs: ``path`` or ``name=path`` (several paths may share one source name). A ``.jsonl`` file is
one document per line (its ``text_field``, or its ``messages`` with ``chat=True``); any other file is
UTF-8 text, one document (or several, cut at ``doc_separator``).

Validation split: the last ``val_fraction`` of each text file by bytes, cut at a line break (as the
corpus README suggests), and the last ``val_fraction`` of each jsonl file's documents. The
tokenizer may be an existing one (a tokenizer.json or a model folder) or ``bpe:N``: a new byte-level
BPE of N tokens fitted to the training split only.

The folder is built next to its destination and renamed into place.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from falcon_mamba.atomic import replace_dir, temp_dir_beside
from falcon_mamba.data.shards import FORMAT, ShardWriter, dtype_for_vocab
from falcon_mamba.errors import UserError

_CHUNK_CHARS = 1 << 20
_CUT = re.compile(r"(?<=\S)\n(?=\S)")


@dataclass
class Doc:
    text: str = ""
    example: object = None  # chat data: an sft.Example


@dataclass
class SourceDocs:
    name: str
    files: list[str] = field(default_factory=list)
    train: list[Doc] = field(default_factory=list)
    val: list[Doc] = field(default_factory=list)


def _decode_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise UserError(f"{path}: not UTF-8 text (byte {e.start}, line {line}); convert it first, "
                        f"e.g. `iconv -f latin1 -t utf-8 {path}`") from None


def _read_text(path: Path, val_fraction: float, sep: str | None) -> tuple[list[Doc], list[Doc]]:
    data = path.read_bytes()
    cut = len(data)
    if val_fraction > 0 and data:
        target = int(len(data) * (1 - val_fraction))
        cut = data.rfind(b"\n", 0, target) + 1 or target  # at a line break when there is one
    train, val = _decode_utf8(path, data[:cut]), _decode_utf8(path, data[cut:])

    def docs(text: str) -> list[Doc]:
        parts = text.split(sep) if sep else [text]
        return [Doc(p) for p in parts if p.strip()]

    return docs(train), docs(val)


def _read_jsonl(path: Path, val_fraction: float, text_field: str, chat: bool) -> tuple[list[Doc], list[Doc]]:
    text = _decode_utf8(path, path.read_bytes())
    docs: list[Doc] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        except (ValueError, RecursionError) as e:  # a 5000-digit number, nesting too deep
            raise UserError(f"{path}:{lineno}: not valid JSON ({str(e)[:100]})") from None
        if chat:
            from falcon_mamba.sft import parse_example

            try:
                docs.append(Doc(example=parse_example(obj)))
            except UserError as e:
                raise UserError(f"{path}:{lineno}: {e}") from None
        else:
            value = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                raise UserError(f"{path}:{lineno}: no string field {text_field!r}; pick the field "
                                f"with --text-field")
            if value.strip():
                docs.append(Doc(value))
    n_val = 0
    if val_fraction > 0 and len(docs) >= 2:
        n_val = min(len(docs) - 1, max(1, round(len(docs) * val_fraction)))
    return docs[:len(docs) - n_val], docs[len(docs) - n_val:]


def read_sources(inputs: list[str], val_fraction: float = 0.02, text_field: str = "text",
                 chat: bool = False, doc_separator: str | None = None) -> list[SourceDocs]:
    """Parse ``path`` / ``name=path`` inputs into documents per source and split."""
    if not inputs:
        raise UserError("no input files; pass text or jsonl files to prepare")
    if not 0 <= val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    sources: dict[str, SourceDocs] = {}
    for spec in inputs:
        name, _, p = spec.partition("=") if "=" in spec else ("", "", spec)
        path = Path(p).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: no such file")
        name = name or path.stem
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise UserError(f"source name {name!r} may hold only letters, digits, '-', '_' and '.'; "
                            f"name it with NAME=PATH")
        src = sources.setdefault(name, SourceDocs(name))
        src.files.append(str(path))
        if path.suffix == ".jsonl":
            train, val = _read_jsonl(path, val_fraction, text_field, chat)
        elif chat:
            raise UserError(f"{path}: chat data must be .jsonl, one example per line ('messages', "
                            "ShareGPT 'conversations', or 'prompt' + 'completion')")
        else:
            train, val = _read_text(path, val_fraction, doc_separator)
        src.train += train
        src.val += val
    if not any(s.train for s in sources.values()):
        raise UserError("the inputs hold no text to train on (all empty)")
    return list(sources.values())


def _chunks(text: str):
    """Cut long text after a newline between two non-spaces, so the cut never changes a token
    (byte-level pre-tokenizers split there, and a whitespace run is never left at a chunk's end)."""
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        m = _CUT.search(text, start + _CHUNK_CHARS)
        if m is None:
            break
        yield text[start:m.end()]
        start = m.end()
    yield text[start:]


def _encode_docs(tok, raw, docs: list[Doc]):
    """Yield (ids, nbytes, mask or None) per document; eos appended after each plain document."""
    from falcon_mamba.sft import encode_example

    eos = tok.eos_token_id
    for d in docs:
        if d.example is not None:
            ids, mask = encode_example(tok, d.example)
            yield ids, len(tok.decode(ids).encode("utf-8")), mask
            continue
        ids: list[int] = []
        for enc in raw.encode_batch(list(_chunks(d.text)), add_special_tokens=False):
            ids += enc.ids
        if eos is not None:
            ids.append(eos)
        yield ids, len(d.text.encode("utf-8")), None


def prepare(inputs: list[str], out: str | Path, tokenizer: str, *, val_fraction: float = 0.02,
            text_field: str = "text", chat: bool = False, doc_separator: str | None = None,
            dtype: str = "auto", overwrite: bool = False, log=print) -> Path:
    """Build a prepared data folder at ``out`` (see the module docstring); returns its path."""
    from tokenizers import Tokenizer as RawTokenizer

    from falcon_mamba.outputs import check_output_folder
    from falcon_mamba.tokenizer import load_tokenizer

    # Never replace a folder that holds an input (the tokenizer's folder included), even with
    # --overwrite; a non-empty folder only with --overwrite.
    files = [spec.partition("=")[2] if "=" in spec else spec for spec in inputs]
    tok_path = None if tokenizer.startswith("bpe:") else tokenizer
    out = check_output_folder(out, [*files, tok_path], overwrite=overwrite, command="prepare-data")
    sources = read_sources(inputs, val_fraction, text_field, chat, doc_separator)
    tmp = temp_dir_beside(out)
    try:
        if tokenizer.startswith("bpe:"):
            from falcon_mamba.data.bpe import fit_bpe

            try:
                n = int(tokenizer[4:])
            except ValueError:
                raise UserError(f"--tokenizer {tokenizer!r}: write bpe:N, N the vocabulary size") from None
            log(f"fitting a {n}-token BPE to the training split ...")
            texts = [d.text for s in sources for d in s.train if d.example is None]
            fit_bpe(texts, n, tmp)
        else:
            src_tok = load_tokenizer(tokenizer)
            shutil.copyfile(src_tok.path, tmp / "tokenizer.json")
            for name in ("tokenizer_config.json", "chat_template.jinja"):
                if (src_tok.path.parent / name).is_file():
                    shutil.copyfile(src_tok.path.parent / name, tmp / name)
        tok = load_tokenizer(tmp)  # the folder: its tokenizer_config.json and chat template too
        raw = RawTokenizer.from_file(str(tmp / "tokenizer.json"))
        if chat:
            log(f"chat examples are rendered with {tok.describe_chat_template()}")
        shard_dtype = dtype_for_vocab(tok.vocab_size, dtype)
        meta = {"format": FORMAT, "dtype": shard_dtype, "vocab_size": tok.vocab_size,
                "eos_token_id": tok.eos_token_id, "chat": chat, "val_fraction": val_fraction,
                "tokenizer": tokenizer if not tokenizer.startswith("bpe:") else f"{tokenizer} (fitted)",
                "sources": {}}
        for s in sources:
            entry = {"files": s.files}
            for split, docs in (("train", s.train), ("val", s.val)):
                w = ShardWriter(tmp, split, s.name, shard_dtype, with_mask=chat)
                for ids, nbytes, mask in _encode_docs(tok, raw, docs):
                    w.add(ids, nbytes, mask)
                entry[split] = w.close()
            meta["sources"][s.name] = entry
            log(f"{s.name}: train {entry['train']['tokens']:,} tokens / {entry['train']['docs']} docs, "
                f"val {entry['val']['tokens']:,} tokens / {entry['val']['docs']} docs")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
