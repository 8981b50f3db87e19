"""Fault injection for the cache path, off by default.

Set with `--faults` / `KVC_FAULTS` on a prefill or decode worker, a comma-separated spec:

    pull_drop=P        a pull stream breaks after its first block (probability P per pull)
    pull_delay_ms=MS   every pull waits MS milliseconds before starting
    corrupt=P          one byte of each pulled block is flipped in transit (probability P per block)
    push_fail=P        a push to a store fails (probability P per push)
    redis_down=1       every Redis index call fails as if Redis were unreachable
    seed=N             seed of the dice (default: random)

Each fault takes the worker down a recompute path; the output must not change.
"""

import random
import threading
from dataclasses import dataclass, field, fields

from kvcluster.errors import InvalidArgument


@dataclass(frozen=True)
class Faults:
    pull_drop: float = 0.0
    pull_delay_ms: float = 0.0
    corrupt: float = 0.0
    push_fail: float = 0.0
    redis_down: bool = False
    seed: int | None = None
    _rng: random.Random = field(default_factory=random.Random, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.seed is not None:
            self._rng.seed(self.seed)
        for name in ("pull_drop", "corrupt", "push_fail"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidArgument(f"faults.{name}", f"a probability in [0, 1], got {getattr(self, name)}")

    @classmethod
    def parse(cls, spec: str) -> "Faults":
        kinds = {f.name: f.type for f in fields(cls) if not f.name.startswith("_")}
        values = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            name, _, text = item.partition("=")
            if name not in kinds:
                raise InvalidArgument("faults", f"unknown fault {name!r}; known: {', '.join(sorted(kinds))}")
            try:
                values[name] = (text.strip() not in ("0", "false", "")) if name == "redis_down" else (
                    int(text) if name == "seed" else float(text))
            except ValueError:
                raise InvalidArgument(f"faults.{name}", f"not a number: {text!r}") from None
        return cls(**values)

    @property
    def active(self) -> bool:
        return bool(self.pull_drop or self.pull_delay_ms or self.corrupt or self.push_fail or self.redis_down)

    def roll(self, probability: float) -> bool:
        if probability <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < probability


NO_FAULTS = Faults()
