"""The on-disk format of a prepared data folder: token shards with document boundaries.

    DIR/meta.json                  format, dtype, vocab size, eos id, per-source token/doc/byte counts
    DIR/tokenizer.json             the tokenizer the shards were made with (+ tokenizer_config.json)
    DIR/{split}/{source}.tokens    token ids, flat, numpy memmap of ``dtype`` (uint16 or uint32)
    DIR/{split}/{source}.docs      int64 offsets of each document's first token (ascending, starts at 0)
    DIR/{split}/{source}.mask      uint8 per token, 1 where the token is a training target (chat data)

``split`` is ``train`` or ``val``. A source is one input (a file, or a ``name=path`` group); the
mixture weights sources by name. Every document ends with the eos token when the tokenizer has one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from falcon_mamba.errors import UserError

FORMAT = "falcon-mamba-data/1"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def dtype_for_vocab(vocab_size: int, requested: str = "auto") -> str:
    """The smallest shard dtype that holds every id of the vocabulary (or check a requested one)."""
    if requested == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"
    if requested not in DTYPES:
        raise UserError(f"unknown shard dtype {requested!r}; use auto, uint16 or uint32")
    limit = np.iinfo(DTYPES[requested]).max + 1
    if vocab_size > limit:
        raise UserError(f"the vocabulary has {vocab_size} tokens but {requested} holds ids below {limit}; "
                        f"use --dtype uint32 (or auto)")
    return requested


@dataclass
class Source:
    """One source of one split, memory-mapped."""

    name: str
    tokens: np.ndarray  # (T,) uint16/uint32 memmap
    doc_starts: np.ndarray  # (docs,) int64
    mask: np.ndarray | None  # (T,) uint8 memmap, or None when every token is a target
    nbytes: int  # UTF-8 bytes of the text these tokens encode (for bits per byte)

    def __len__(self) -> int:
        return len(self.tokens)


class ShardWriter:
    """Appends documents to one source of one split; ``close()`` returns its counts."""

    def __init__(self, folder: Path, split: str, name: str, dtype: str, with_mask: bool):
        (folder / split).mkdir(parents=True, exist_ok=True)
        self.dtype = DTYPES[dtype]
        self.tokens_f = open(folder / split / f"{name}.tokens", "wb")
        self.mask_f = open(folder / split / f"{name}.mask", "wb") if with_mask else None
        self.docs_path = folder / split / f"{name}.docs"
        self.doc_starts: list[int] = []
        self.ntokens = 0
        self.nbytes = 0

    def add(self, ids: list[int], nbytes: int, mask: list[int] | None = None) -> None:
        if not ids:
            return
        self.doc_starts.append(self.ntokens)
        np.asarray(ids, dtype=self.dtype).tofile(self.tokens_f)
        if self.mask_f is not None:
            assert mask is not None and len(mask) == len(ids)
            np.asarray(mask, dtype=np.uint8).tofile(self.mask_f)
        self.ntokens += len(ids)
        self.nbytes += nbytes

    def close(self) -> dict:
        self.tokens_f.close()
        if self.mask_f is not None:
            self.mask_f.close()
        np.asarray(self.doc_starts, dtype=np.int64).tofile(self.docs_path)
        return {"tokens": self.ntokens, "docs": len(self.doc_starts), "bytes": self.nbytes}


def _check_meta(path: Path, meta: dict) -> None:
    """The fields training trusts (a vocab_size of 1e12 would size a 256 TB embedding table)."""
    def bad(what: str):
        raise UserError(f"{path}: {what}; prepare the data again")

    dtype = meta.get("dtype")
    if dtype not in DTYPES:
        bad(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    v = meta.get("vocab_size")
    limit = 1 << (16 if dtype == "uint16" else 32)
    if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= limit:
        bad(f"vocab_size {v!r} is not a token count in [1, {limit}] (the ids are {dtype})")
    eos = meta.get("eos_token_id")
    if eos is not None and (not isinstance(eos, int) or isinstance(eos, bool) or not 0 <= eos < v):
        bad(f"eos_token_id {eos!r} is not a token id below vocab_size {v}")
    sources = meta.get("sources")
    if not isinstance(sources, dict) or not sources:
        bad("'sources' must be an object naming the data sources")
    for name, src in sources.items():
        for split in ("train", "val"):
            counts = src.get(split) if isinstance(src, dict) else None
            if not isinstance(counts, dict) or not all(
                    isinstance(counts.get(k), int) and counts[k] >= 0 for k in ("tokens", "docs")):
                bad(f"source {name!r} has no valid {split} token and document counts")


class ShardSet:
    """A prepared data folder, opened read-only."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.folder = folder
        if not folder.is_dir():
            raise UserError(f"{folder}: no such data folder; make one with `falcon-mamba prepare-data`")
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            what = "is empty" if not any(folder.iterdir()) else "has no meta.json"
            raise UserError(f"{folder}: {what}; it is not a prepared data folder. Make one with "
                            f"`falcon-mamba prepare-data --tokenizer T --out {folder} FILE...`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (ValueError, RecursionError) as e:
            raise UserError(f"{meta_path}: not valid JSON ({str(e)[:200]}); prepare the data again") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            got = meta.get("format") if isinstance(meta, dict) else None
            raise UserError(f"{meta_path}: format {got!r} is not {FORMAT!r}; "
                            "prepare the data again with this version")
        _check_meta(meta_path, meta)
        self.meta = meta
        self.vocab_size: int = meta["vocab_size"]
        self.eos_token_id: int | None = meta.get("eos_token_id")
        self.dtype = DTYPES[meta["dtype"]]
        self.source_names: list[str] = list(meta["sources"])
        if not any(meta["sources"][n]["train"]["tokens"] for n in self.source_names):
            raise UserError(f"{folder}: the training split holds no tokens; give prepare-data some text")
        self._cache: dict[tuple[str, str], Source] = {}

    @property
    def tokenizer_path(self) -> Path:
        return self.folder / "tokenizer.json"

    @property
    def has_mask(self) -> bool:
        return bool(self.meta.get("chat"))

    def source(self, split: str, name: str) -> Source:
        key = (split, name)
        if key not in self._cache:
            counts = self.meta["sources"][name][split]
            base = self.folder / split / name
            n = counts["tokens"]
            try:
                tokens = (np.memmap(f"{base}.tokens", dtype=self.dtype, mode="r", shape=(n,)) if n
                          else np.zeros(0, self.dtype))
                docs = np.fromfile(f"{base}.docs", dtype=np.int64)
                mask = None
                if self.has_mask:
                    mask = (np.memmap(f"{base}.mask", dtype=np.uint8, mode="r", shape=(n,)) if n
                            else np.zeros(0, np.uint8))
            except (FileNotFoundError, ValueError) as e:
                raise UserError(f"{base}: shard missing or truncated ({e}); prepare the data again") from None
            if len(docs) != counts["docs"]:
                raise UserError(f"{base}.docs: {len(docs)} documents, meta.json says {counts['docs']}; "
                                "prepare the data again")
            self._cache[key] = Source(name, tokens, docs, mask, counts["bytes"])
        return self._cache[key]

    def split(self, split: str) -> dict[str, Source]:
        """The non-empty sources of a split, by name."""
        return {n: self.source(split, n) for n in self.source_names
                if self.meta["sources"][n][split]["tokens"] > 0}

    def describe(self) -> str:
        lines = []
        for n in self.source_names:
            s = self.meta["sources"][n]
            lines.append(f"{n}: train {s['train']['tokens']:,} tokens in {s['train']['docs']} docs, "
                         f"val {s['val']['tokens']:,} tokens")
        return "\n".join(lines)
