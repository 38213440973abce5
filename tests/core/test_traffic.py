"""The per-rank traffic summed per document equals the traffic of the explicit transfer list."""

from __future__ import annotations

import dataclasses
import random

import pytest

from flashcp_planner import PlanOptions, PlanRequest, plan
from flashcp_planner.comm import transfers_and_traffic
from flashcp_planner.cost import rank_costs, rank_costs_of_traffic
from flashcp_planner.model import CommMode
from flashcp_planner.presets import get_preset


@pytest.mark.parametrize("comm", list(CommMode))
def test_closed_form_traffic_equals_summing_the_transfers(comm):
    rng = random.Random(7)
    for _ in range(12):
        lengths = [rng.randint(1, 30000) for _ in range(rng.randint(1, 14))]
        cp_size, gpn = rng.choice([2, 3, 4, 6, 8]), rng.choice([1, 2, 3, 4, 8])
        cost_model = dataclasses.replace(get_preset("h100-llama8b"), gpus_per_node=gpn)
        for strategy in ("flashcp", "per_doc", "zigzag", "whole_doc"):
            request = PlanRequest(micro_batches=[lengths], cp_size=cp_size, strategy=strategy,
                                  cost_model=cost_model, capacity=sum(lengths), options=PlanOptions(comm=comm))
            (p,) = plan(request)
            segments = [rp.segments for rp in p.ranks]
            transfers, recv, send = transfers_and_traffic(segments, comm, gpn)
            from_transfers = rank_costs(segments, transfers, cost_model)
            assert rank_costs_of_traffic(segments, recv, send, cost_model) == from_transfers
            assert tuple(rp.cost for rp in p.ranks) == from_transfers
