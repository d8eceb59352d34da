"""The data mixture: per-stage sampling weights of the sources (the curriculum).

Written as a string so that it fits a recipe field and ``--set mixture=...``:

    ""                                     every source in proportion to its training tokens
    "web=3,code=1"                         one stage, fixed weights
    "web=3,code=1@0.8; web=2,code=1,curated=2"
                                           stage 1 until 80% of the steps, then stage 2 mixes in curated

A stage's ``@F`` is the fraction of the run's steps where it ends (the last stage ends at 1).
Sources left out of a stage get weight 0 in it.
"""

from __future__ import annotations

from dataclasses import dataclass

from falcon_mamba.errors import UserError


@dataclass(frozen=True)
class Stage:
    until: float  # fraction of the total steps where this stage ends
    weights: tuple[tuple[str, float], ...]


def parse_mixture(spec: str) -> tuple[Stage, ...]:
    """Parse the mixture string (see the module docstring). An empty string gives ()."""
    spec = spec.strip()
    if not spec:
        return ()
    stages = []
    parts = [p.strip() for p in spec.split(";") if p.strip()]
    for i, part in enumerate(parts):
        body, at, until = part.partition("@")
        if at:
            try:
                end = float(until)
            except ValueError:
                raise UserError(f"mixture stage {part!r}: '@{until}' is not a number") from None
        else:
            end = 1.0
        if i == len(parts) - 1:
            end = 1.0
        elif not at:
            raise UserError(f"mixture stage {part!r}: every stage but the last needs '@F' (where it ends)")
        weights = []
        for item in body.split(","):
            name, eq, w = item.strip().partition("=")
            try:
                value = float(w)
            except ValueError:
                value = -1.0
            if not eq or not name or value < 0:
                raise UserError(f"mixture item {item.strip()!r}: write NAME=WEIGHT with WEIGHT >= 0")
            weights.append((name.strip(), value))
        if sum(w for _, w in weights) <= 0:
            raise UserError(f"mixture stage {part!r}: the weights sum to 0")
        if stages and end <= stages[-1].until or not 0 < end <= 1:
            raise UserError(f"mixture stage ends must increase within (0, 1]; got {end} in {spec!r}")
        stages.append(Stage(end, tuple(weights)))
    return tuple(stages)


def check_mixture(stages: tuple[Stage, ...], names: list[str]) -> None:
    """Fail when a stage names a source the data does not have, or gives only empty sources weight."""
    for st in stages:
        for name, _ in st.weights:
            if name not in names:
                raise UserError(f"the mixture names source {name!r}, which the data folder lacks; "
                                f"its sources are: {', '.join(names)}")
        if sum(w for n, w in st.weights if n in names) <= 0:
            raise UserError(f"a mixture stage gives weight only to empty sources: {st.weights}")


def weights_at(stages: tuple[Stage, ...], progress: float, sizes: dict[str, int]) -> dict[str, float]:
    """Normalised weights over the sources at ``progress`` = step / total steps in [0, 1].
    With no stages, sources weigh by their token counts."""
    if not stages:
        raw = dict(sizes)
    else:
        stage = next((s for s in stages if progress < s.until), stages[-1])
        given = dict(stage.weights)
        raw = {n: given.get(n, 0.0) if sizes[n] > 0 else 0.0 for n in sizes}
    total = sum(raw.values())
    if total <= 0:
        raise UserError("the mixture gives weight only to empty sources")
    return {n: w / total for n, w in raw.items()}
