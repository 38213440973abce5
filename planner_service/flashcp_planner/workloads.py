"""Synthetic micro-batches: document lengths packed to a context size.

Every generator draws documents and appends them until the context is full,
the last one truncated to fit (BACKGROUND.md section 5), so each micro-batch
sums exactly to ``context`` tokens. Micro-batch ``k`` of a workload is drawn
from ``numpy.random.default_rng([seed, k])``: it is the same whatever the
number of micro-batches requested, and identical on every machine.

Families:

* ``prolong``: samples of a measured ProLong-like long-context mix (bundled,
  from hao-ai-lab/DistCA, Apache-2.0; see ``data/README.md``).
* lognormal ``web``, ``code``, ``longctx``: short web-like documents, code-like
  files, and a heavy-tailed long-context mix.
* adversarial ``single``, ``half-plus-tiny``, ``equal``, ``ones``.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

import numpy as np

from flashcp_planner.errors import InvalidRequest

__all__ = ["MAX_CONTEXT", "MAX_MICRO_BATCHES", "MAX_ONES_CONTEXT", "WORKLOADS", "Workload", "generate"]

MAX_CONTEXT = 1 << 24
"""Largest context (tokens per micro-batch) a generator accepts."""
MAX_MICRO_BATCHES = 4096
"""Most micro-batches one call generates."""
MAX_ONES_CONTEXT = 1 << 18
"""Largest context of the ``ones`` workload (one document per token)."""
EQUAL_DOC_TOKENS = 4096
"""Target document length of the ``equal`` workload."""
TINY_DOC_TOKENS = (16, 128)
"""Inclusive length range of the tiny documents of ``half-plus-tiny``."""

Sampler = Callable[[np.random.Generator, int], np.ndarray]
"""Draws ``count`` document lengths (integers >= 1) from a distribution."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Workload:
    """One named micro-batch generator."""

    name: str
    """Registry key, e.g. ``"prolong"``."""
    description: str
    """One line for listings."""
    build: Callable[[np.random.Generator, int], list[int]]
    """``build(rng, context)`` returns document lengths summing to ``context``."""


def _pack(rng: np.random.Generator, context: int, sample: Sampler, batch: int = 64) -> list[int]:
    """Append sampled documents until ``context`` tokens are reached; truncate the last one."""
    out: list[int] = []
    filled = 0
    while filled < context:
        for length in sample(rng, batch).tolist():
            length = min(int(length), context - filled)
            out.append(length)
            filled += length
            if filled == context:
                break
    return out


@functools.cache
def _prolong_lengths() -> np.ndarray:
    """Every document length of the bundled ProLong histogram, sorted (77,932 values)."""
    raw = resources.files("flashcp_planner").joinpath("data", "doclens-prolong.json.gz").read_bytes()
    data = json.loads(gzip.decompress(raw))
    lengths = np.repeat(np.asarray(data["lengths"], dtype=np.int64), np.asarray(data["counts"], dtype=np.int64))
    assert len(lengths) == data["num_documents"] and lengths.min() >= 1
    return lengths


def _prolong_sample(rng: np.random.Generator, count: int) -> np.ndarray:
    lengths = _prolong_lengths()
    return lengths[rng.integers(0, len(lengths), size=count)]


def _lognormal(*, mean: float, sigma: float) -> Sampler:
    """Lognormal lengths with the given mean (tokens) and log-space standard deviation."""
    mu = math.log(mean) - sigma * sigma / 2

    def sample(rng: np.random.Generator, count: int) -> np.ndarray:
        return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size=count))).astype(np.int64)

    return sample


def _sampled(sample: Sampler) -> Callable[[np.random.Generator, int], list[int]]:
    return lambda rng, context: _pack(rng, context, sample)


def _single(rng: np.random.Generator, context: int) -> list[int]:
    return [context]


def _half_plus_tiny(rng: np.random.Generator, context: int) -> list[int]:
    half = max(1, context // 2)
    lo, hi = TINY_DOC_TOKENS
    tiny = _pack(rng, context - half, lambda g, n: g.integers(lo, hi + 1, size=n)) if context > half else []
    return [half, *tiny]


def _equal(rng: np.random.Generator, context: int) -> list[int]:
    count = -(-context // EQUAL_DOC_TOKENS)
    base, extra = divmod(context, count)
    return [base + 1] * extra + [base] * (count - extra)


def _ones(rng: np.random.Generator, context: int) -> list[int]:
    if context > MAX_ONES_CONTEXT:
        raise InvalidRequest("context", f"the 'ones' workload makes one document per token; context must be <= "
                             f"{MAX_ONES_CONTEXT}, got {context}")
    return [1] * context


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload(name="prolong", description="samples of a ProLong-like long-context mix (mean 3.1K, p99 16K, "
                 "max 340K; DistCA data)", build=_sampled(_prolong_sample)),
        Workload(name="web", description="lognormal web-like text, mean 1.5K tokens (sigma 1.0)",
                 build=_sampled(_lognormal(mean=1500.0, sigma=1.0))),
        Workload(name="code", description="lognormal code-like files, mean 5K tokens (sigma 1.1)",
                 build=_sampled(_lognormal(mean=5000.0, sigma=1.1))),
        Workload(name="longctx", description="heavy-tailed lognormal, mean 15K tokens (sigma 1.6): "
                 "a few documents of 32K+", build=_sampled(_lognormal(mean=15000.0, sigma=1.6))),
        Workload(name="single", description="adversarial: one document filling the context", build=_single),
        Workload(name="half-plus-tiny", description="adversarial: one half-context document, then "
                 f"{TINY_DOC_TOKENS[0]}-{TINY_DOC_TOKENS[1]} token documents", build=_half_plus_tiny),
        Workload(name="equal", description=f"adversarial: equal documents of about {EQUAL_DOC_TOKENS} tokens "
                 "(lengths differ by at most one)", build=_equal),
        Workload(name="ones", description=f"adversarial: every document 1 token long (context <= "
                 f"{MAX_ONES_CONTEXT})", build=_ones),
    )
}
"""Name -> workload generator."""


def _check_int(field: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise InvalidRequest(field, f"must be an integer in [{lo}, {hi}], got {value!r}")
    return int(value)


def generate(name: str, *, context: int, seed: int, num_micro_batches: int = 1) -> list[list[int]]:
    """Generate micro-batches of document lengths, each summing exactly to ``context``.

    Args:
        name: a key of :data:`WORKLOADS`.
        context: tokens per micro-batch.
        seed: non-negative seed; the same arguments give the same lengths everywhere.
        num_micro_batches: how many micro-batches to draw.

    Returns:
        One list of document lengths (each >= 1) per micro-batch, in packed order.

    Raises:
        InvalidRequest: unknown workload or an argument out of range.
    """
    workload = WORKLOADS.get(name) if isinstance(name, str) else None
    if workload is None:
        raise InvalidRequest("workload", f"unknown workload {name!r}; expected one of {sorted(WORKLOADS)}")
    context = _check_int("context", context, 1, MAX_CONTEXT)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    count = _check_int("num_micro_batches", num_micro_batches, 1, MAX_MICRO_BATCHES)
    out = []
    for k in range(count):
        lengths = workload.build(np.random.default_rng([seed, k]), context)
        assert sum(lengths) == context and min(lengths) >= 1, (name, context)
        out.append(lengths)
    return out
