"""Workload generators: packing rule, determinism, distribution shapes, bad arguments."""

from __future__ import annotations

import gzip
import json
from importlib import resources

import numpy as np
import pytest

from flashcp_planner.errors import InvalidRequest
from flashcp_planner.workloads import (
    EQUAL_DOC_TOKENS,
    MAX_ONES_CONTEXT,
    TINY_DOC_TOKENS,
    WORKLOADS,
    _prolong_lengths,
    generate,
)

RANDOM_FAMILIES = ("prolong", "web", "code", "longctx", "half-plus-tiny")


@pytest.mark.parametrize("name", sorted(WORKLOADS))
@pytest.mark.parametrize("context", [1, 1000, 65536])
def test_every_micro_batch_fills_the_context_exactly(name: str, context: int) -> None:
    mbs = generate(name, context=context, seed=3, num_micro_batches=3)
    assert len(mbs) == 3
    for lengths in mbs:
        assert sum(lengths) == context
        assert all(isinstance(x, int) and x >= 1 for x in lengths)


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_deterministic_per_seed_and_prefix_stable(name: str) -> None:
    a = generate(name, context=32768, seed=7, num_micro_batches=4)
    assert a == generate(name, context=32768, seed=7, num_micro_batches=4)
    # micro-batch k does not depend on how many micro-batches are requested
    assert generate(name, context=32768, seed=7, num_micro_batches=2) == a[:2]


@pytest.mark.parametrize("name", RANDOM_FAMILIES)
def test_seeds_and_micro_batches_differ(name: str) -> None:
    a = generate(name, context=65536, seed=0, num_micro_batches=2)
    b = generate(name, context=65536, seed=1, num_micro_batches=2)
    assert a != b
    assert a[0] != a[1]


def test_prolong_histogram_is_the_documented_distribution() -> None:
    lengths = _prolong_lengths()
    # BACKGROUND.md section 5: 77,932 documents, mean 3,052, median 1,914, max 340,149
    assert len(lengths) == 77_932
    assert round(float(lengths.mean())) == 3052
    assert float(np.median(lengths)) == pytest.approx(1913.5)
    assert int(lengths.max()) == 340_149
    data_dir = resources.files("flashcp_planner").joinpath("data")
    assert "Apache License" in data_dir.joinpath("LICENSE-DistCA").read_text()
    raw = json.loads(gzip.decompress(data_dir.joinpath("doclens-prolong.json.gz").read_bytes()))
    assert raw["lengths"] == sorted(raw["lengths"]) and sum(raw["counts"]) == 77_932


def _untruncated(name: str, context: int, count: int) -> list[int]:
    """Documents of generated micro-batches, without each micro-batch's truncated last document."""
    return [x for mb in generate(name, context=context, seed=0, num_micro_batches=count) for x in mb[:-1]]


def test_prolong_samples_follow_the_data() -> None:
    docs = _untruncated("prolong", 1 << 20, 8)
    assert len(docs) > 2000
    assert 2500 < np.mean(docs) < 3600
    assert 1700 < np.median(docs) < 2150
    assert min(docs) >= 575  # shortest document of the data


def test_lognormal_families_have_their_documented_means() -> None:
    web = _untruncated("web", 1 << 20, 4)
    code = _untruncated("code", 1 << 20, 8)
    assert 1000 < np.mean(web) < 2000
    assert 4000 < np.mean(code) < 6000
    assert np.mean(web) < np.mean(code)


def test_longctx_has_a_few_long_documents() -> None:
    mbs = generate("longctx", context=1 << 19, seed=0, num_micro_batches=8)
    long_docs = [sum(x >= 32768 for x in mb) for mb in mbs]
    assert all(n >= 1 for n in long_docs)
    # heavy tail: the long documents carry most of the tokens
    share = sum(x for mb in mbs for x in mb if x >= 32768) / sum(sum(mb) for mb in mbs)
    assert share > 0.5


def test_single_is_one_document() -> None:
    assert generate("single", context=131072, seed=5, num_micro_batches=2) == [[131072], [131072]]


def test_half_plus_tiny_shape() -> None:
    (mb,) = generate("half-plus-tiny", context=65536, seed=2)
    assert mb[0] == 32768
    lo, hi = TINY_DOC_TOKENS
    assert all(lo <= x <= hi for x in mb[1:-1])
    assert 1 <= mb[-1] <= hi
    assert len(mb) > 32768 // hi


def test_equal_shape() -> None:
    (mb,) = generate("equal", context=65536, seed=0)
    assert mb == [EQUAL_DOC_TOKENS] * (65536 // EQUAL_DOC_TOKENS)
    (odd,) = generate("equal", context=10001, seed=0)
    assert max(odd) - min(odd) <= 1 and sum(odd) == 10001


def test_ones_shape_and_cap() -> None:
    (mb,) = generate("ones", context=65536, seed=0)
    assert mb == [1] * 65536
    with pytest.raises(InvalidRequest) as info:
        generate("ones", context=MAX_ONES_CONTEXT + 1, seed=0)
    assert info.value.field == "context"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "nope", "context": 100, "seed": 0}, "workload"),
        ({"name": "web", "context": 0, "seed": 0}, "context"),
        ({"name": "web", "context": -5, "seed": 0}, "context"),
        ({"name": "web", "context": 10.5, "seed": 0}, "context"),
        ({"name": "web", "context": True, "seed": 0}, "context"),
        ({"name": "web", "context": 100, "seed": -1}, "seed"),
        ({"name": "web", "context": 100, "seed": 0, "num_micro_batches": 0}, "num_micro_batches"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict, field: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(InvalidRequest) as info:
        generate(name, **kwargs)
    assert info.value.field == field
