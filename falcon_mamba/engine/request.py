"""What the engine serves: a Request (one prompt, n continuations) and its Sequences (one each).

A request is admitted as a whole: it takes n state slots at once, its prompt is prefilled once into
the first sequence's slot, and that state is copied to the others (forking is a copy of a fixed
number of bytes, whatever the prompt length). From then on each sequence decodes on its own.

No torch here: the scheduler and its tests use these objects without a model.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"  # in the queue, no slot yet
    PREFILL = "prefill"  # has its slots; prompt being read chunk by chunk
    DECODE = "decode"  # sequences generate one token per engine step
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One continuation (a `choice` in the OpenAI API)."""

    request: Request
    index: int
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    # Engine-side companions (a generator, a detokenizer, stop-string state...); opaque here.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str) -> None:
        if self.finish_reason is None:
            self.finish_reason = reason

    @property
    def key(self) -> tuple[int, int]:
        return (self.request.uid, self.index)


@dataclass(eq=False)
class Request:
    """prompt_ids: the full prompt; n: how many continuations; params: the sampling parameters
    (opaque to the scheduler). num_computed counts prompt tokens already in the state: a prefix
    cache hit sets it before the first chunk, each prefilled chunk advances it."""

    prompt_ids: list[int]
    params: Any = None
    n: int = 1
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)
    uid: int = field(default_factory=lambda: next(_ids))
    status: Status = Status.WAITING
    num_computed: int = 0
    num_cached: int = 0  # prompt tokens that came from the prefix cache
    chunk: int | None = None  # prompt tokens per chunk for this request (None: the scheduler's)
    cancelled: bool = False
    seqs: list[Sequence] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("a request needs at least one prompt token")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not self.seqs:
            self.seqs = [Sequence(self, i) for i in range(self.n)]

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.seqs)

    def cancel(self) -> None:
        """Ask for the request to stop (thread-safe: a flag the scheduler reads at the next step)."""
        self.cancelled = True
