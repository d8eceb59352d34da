"""A few Prometheus metrics in plain Python: counters, gauges, histograms, and the text format.

The engine thread records; the HTTP thread renders ``registry.render()`` for GET /metrics.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable


def _labels(d: dict) -> str:
    if not d:
        return ""
    esc = {k: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for k, v in d.items()}
    return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(esc.items())) + "}"


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, lock: threading.Lock):
        self.name, self.help, self._lock = name, help, lock

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a):
        super().__init__(*a)
        self._values: dict[tuple, float] = {}

    def inc(self, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + value

    def value(self, **labels) -> float:
        return self._values.get(tuple(sorted(labels.items())), 0.0)

    def lines(self) -> list[str]:
        vals = self._values or {(): 0.0}
        return self.header() + [f"{self.name}{_labels(dict(k))} {_num(v)}" for k, v in vals.items()]


class Gauge(_Metric):
    """A value read at scrape time from a function (queue depth, slots in use...)."""

    kind = "gauge"

    def __init__(self, name, help, lock, fn: Callable[[], float]):
        super().__init__(name, help, lock)
        self.fn = fn

    def lines(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.fn())}"]


class CounterFn(Gauge):
    """A counter kept elsewhere (monotonic), read at scrape time."""

    kind = "counter"


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, lock, buckets: list[float]):
        super().__init__(name, help, lock)
        self.buckets = sorted(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, x: float, count: int = 1) -> None:
        """Record x, count times (a step's rows often share one value: one call for them all)."""
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, x)] += count
            self.sum += x * count
            self.count += count

    def lines(self) -> list[str]:
        out = self.header()
        acc = 0
        for le, c in zip([*self.buckets, math.inf], self.counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_num(le)}"}} {acc}')
        out += [f"{self.name}_sum {_num(self.sum)}", f"{self.name}_count {self.count}"]
        return out


LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
TOKEN_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class Registry:
    def __init__(self, prefix: str = "falcon_mamba_"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._metrics: list[_Metric] = []

    def counter(self, name: str, help: str) -> Counter:
        return self._add(Counter(self.prefix + name, help, self._lock))

    def gauge(self, name: str, help: str, fn: Callable[[], float]) -> Gauge:
        return self._add(Gauge(self.prefix + name, help, self._lock, fn))

    def counter_fn(self, name: str, help: str, fn: Callable[[], float]) -> CounterFn:
        return self._add(CounterFn(self.prefix + name, help, self._lock, fn))

    def histogram(self, name: str, help: str, buckets: list[float]) -> Histogram:
        return self._add(Histogram(self.prefix + name, help, self._lock, buckets))

    def _add(self, m):
        self._metrics.append(m)
        return m

    def render(self) -> str:
        lines = []
        with self._lock:
            for m in self._metrics:
                lines += m.lines()
        return "\n".join(lines) + "\n"
