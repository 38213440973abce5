"""Conversions between the ``flashcp.v1`` protobuf messages and planning-core objects.

Shared by the server (``flashcp_service``) and the client library
(``flashcp_client``); depends on protobuf and ``flashcp_planner`` only.

Conventions:

* Decoding a request (``*_from_pb``) validates it through the core's own
  constructors, so a malformed message raises
  :class:`flashcp_planner.errors.InvalidRequest` naming the field, exactly as
  the HTTP API and the embedded planner would.
* ``plan_to_pb`` / ``plan_from_pb`` are lossless: for every plan ``p``,
  ``plan_from_pb(plan_to_pb(p)) == p`` and ``plan_pb_to_dict(plan_to_pb(p)) ==
  p.to_dict()``, floats included (both sides are IEEE doubles). Segments,
  document shardings and transfers travel as packed integer lists (see
  ``planner.proto``). With ``list_transfers=False`` the transfers are left out
  (``transfers_omitted``): the decoded plan has ``transfers=None`` (derived on
  use, so it still equals ``p``) and the dict form has no ``"transfers"`` key.
* Unset ``optional`` request fields take the core defaults; a request cost
  model is a preset name or a (partial) :class:`CostModel` message whose unset
  fields come from the preset named by ``base``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from collections.abc import Iterator, Sequence
from typing import Any

from flashcp.v1 import planner_pb2 as pb
from flashcp_planner.comm import kv_transfer_rows
from flashcp_planner.cost import CostModel
from flashcp_planner.errors import InvalidRequest
from flashcp_planner.model import (
    CommMode,
    DocSharding,
    KVTransfer,
    Optimality,
    Plan,
    RankCost,
    RankPlan,
    Segment,
    Segments,
    ShardingKind,
    Shardings,
)
from flashcp_planner.planner import Comparison
from flashcp_planner.presets import PRESETS, cost_model_from_dict, cost_model_to_dict, get_preset
from flashcp_planner.request import PlanOptions, PlanRequest

__all__ = [
    "DEFAULT_COST_MODEL",
    "DEFAULT_STRATEGY",
    "comm_from_pb",
    "comm_to_pb",
    "comparisons_from_pb",
    "comparisons_to_pb",
    "compare_request_from_pb",
    "compare_request_to_pb",
    "cost_model_from_pb",
    "cost_model_to_pb",
    "options_from_pb",
    "options_to_pb",
    "plan_from_pb",
    "plan_pb_to_dict",
    "plan_to_pb",
    "request_from_pb",
    "request_to_pb",
    "total_documents",
]

DEFAULT_COST_MODEL = "h100-llama8b"
"""Preset used when a request names no cost model."""
DEFAULT_STRATEGY = "flashcp"
"""Strategy used when a request names none."""

_COMM_TO_PB = {
    CommMode.ALL_GATHER: pb.COMM_MODE_ALL_GATHER,
    CommMode.SHARDING_AWARE: pb.COMM_MODE_SHARDING_AWARE,
    CommMode.EXACT_NEED: pb.COMM_MODE_EXACT_NEED,
    CommMode.NODE_DEDUP: pb.COMM_MODE_NODE_DEDUP,
}
_COMM_FROM_PB = {v: k for k, v in _COMM_TO_PB.items()}
_KIND_TO_PB = {
    ShardingKind.WHOLE: pb.SHARDING_KIND_WHOLE,
    ShardingKind.PER_DOC: pb.SHARDING_KIND_PER_DOC,
    ShardingKind.SUB_GROUP: pb.SHARDING_KIND_SUB_GROUP,
    ShardingKind.PACKED: pb.SHARDING_KIND_PACKED,
}
_KIND_FROM_PB = {v: k for k, v in _KIND_TO_PB.items()}
_KIND_VALUE_FROM_PB = {v: k.value for k, v in _KIND_TO_PB.items()}

_COST_FIELDS = tuple(f.name for f in dataclasses.fields(CostModel) if f.init)
_COST_SCALARS = tuple(name for name in _COST_FIELDS if name not in ("name", "attention_efficiency"))
_OPTION_SCALARS = ("allow_sub_group", "time_limit_s", "num_workers", "random_seed")


# ---------------------------------------------------------------- enums


def comm_to_pb(comm: CommMode | None) -> int:
    """``None`` maps to ``COMM_MODE_UNSPECIFIED``."""
    return pb.COMM_MODE_UNSPECIFIED if comm is None else _COMM_TO_PB[CommMode(comm)]


def comm_from_pb(value: int, *, field: str = "options.comm") -> CommMode | None:
    """``COMM_MODE_UNSPECIFIED`` maps to ``None``.

    Raises:
        InvalidRequest: an enum number this server does not know.
    """
    if value == pb.COMM_MODE_UNSPECIFIED:
        return None
    try:
        return _COMM_FROM_PB[value]
    except KeyError:
        raise InvalidRequest(field, f"unknown communication mode number {value}") from None


# ---------------------------------------------------------------- cost models


def cost_model_to_pb(cost_model: CostModel) -> pb.CostModel:
    """Every field set, ``base`` empty."""
    data = cost_model_to_dict(cost_model)
    points = [pb.EfficiencyPoint(query_tokens=q, efficiency=e) for q, e in data.pop("attention_efficiency")]
    return pb.CostModel(attention_efficiency=points, **data)


def cost_model_from_pb(message: pb.CostModel) -> CostModel:
    """Build a cost model: set fields override the preset named by ``base``.

    Raises:
        InvalidRequest: unknown base preset or an out-of-range constant.
    """
    data: dict[str, Any] = {name: getattr(message, name) for name in _COST_SCALARS if message.HasField(name)}
    if message.HasField("name"):
        data["name"] = message.name
    if message.base:
        data["base"] = message.base
    if message.attention_efficiency:
        data["attention_efficiency"] = [[p.query_tokens, p.efficiency] for p in message.attention_efficiency]
    return cost_model_from_dict(data)


def _cost_model_of(message: pb.PlanRequest | pb.CompareRequest, default: CostModel | None) -> CostModel:
    which = message.WhichOneof("cost_model")
    if which == "cost_model_preset":
        return get_preset(message.cost_model_preset)
    if which == "cost_model_custom":
        return cost_model_from_pb(message.cost_model_custom)
    return default if default is not None else get_preset(DEFAULT_COST_MODEL)


def _set_cost_model(message: pb.PlanRequest | pb.CompareRequest, cost_model: CostModel) -> None:
    if PRESETS.get(cost_model.name) == cost_model:
        message.cost_model_preset = cost_model.name
    else:
        message.cost_model_custom.CopyFrom(cost_model_to_pb(cost_model))


# ---------------------------------------------------------------- requests


def options_to_pb(options: PlanOptions) -> pb.PlanOptions:
    """Every option set explicitly."""
    return pb.PlanOptions(
        comm=comm_to_pb(options.comm),
        allow_sub_group=options.allow_sub_group,
        time_limit_s=options.time_limit_s,
        num_workers=options.num_workers,
        random_seed=options.random_seed,
    )


def options_from_pb(message: pb.PlanOptions) -> PlanOptions:
    """Unset fields take the :class:`PlanOptions` defaults.

    Raises:
        InvalidRequest: an option is out of range.
    """
    values: dict[str, Any] = {name: getattr(message, name) for name in _OPTION_SCALARS if message.HasField(name)}
    return PlanOptions(comm=comm_from_pb(message.comm), **values)


def _request_fields(
    message: pb.PlanRequest | pb.CompareRequest, default_cost_model: CostModel | None
) -> dict[str, Any]:
    values: dict[str, Any] = {
        "micro_batches": [mb.doc_lengths[:] for mb in message.micro_batches],  # a slice is a bulk copy
        "cp_size": message.cp_size,
        "cost_model": _cost_model_of(message, default_cost_model),
    }
    if message.HasField("capacity_slack"):
        values["capacity_slack"] = message.capacity_slack
    if message.HasField("capacity"):
        values["capacity"] = message.capacity
    if message.HasField("options"):
        values["options"] = options_from_pb(message.options)
    return values


def request_from_pb(message: pb.PlanRequest, *, default_cost_model: CostModel | None = None) -> PlanRequest:
    """Decode and validate a plan request.

    Args:
        message: the request.
        default_cost_model: used when the request names none (default: the
            ``h100-llama8b`` preset).

    Raises:
        InvalidRequest: a field is missing, of the wrong kind or out of range.
    """
    return PlanRequest(strategy=message.strategy or DEFAULT_STRATEGY, **_request_fields(message, default_cost_model))


def compare_request_from_pb(
    message: pb.CompareRequest, *, default_cost_model: CostModel | None = None
) -> tuple[PlanRequest, tuple[str, ...] | None]:
    """Decode a compare request into the request to plan and the strategies (``None``: all).

    Raises:
        InvalidRequest: as :func:`request_from_pb`; unknown strategy names are
            reported by the planner itself.
    """
    strategies = tuple(message.strategies) or None
    return PlanRequest(**_request_fields(message, default_cost_model)), strategies


def _fill_request(
    message: pb.PlanRequest | pb.CompareRequest, request: PlanRequest, request_id: str, omit_transfers: bool
) -> None:
    for lengths in request.micro_batches:
        message.micro_batches.add().doc_lengths.extend(lengths)
    message.cp_size = request.cp_size
    _set_cost_model(message, request.cost_model)
    if request.capacity is not None:
        message.capacity = request.capacity
    else:
        message.capacity_slack = request.capacity_slack
    message.options.CopyFrom(options_to_pb(request.options))
    message.request_id = request_id
    message.omit_transfers = omit_transfers


def request_to_pb(request: PlanRequest, *, request_id: str = "", omit_transfers: bool = False) -> pb.PlanRequest:
    """Encode a request (a cost model equal to its preset travels by name).

    ``omit_transfers`` asks the server to leave the KV transfer lists out of the plans
    (callers that derive them with :func:`flashcp_planner.kv_transfers`).
    """
    message = pb.PlanRequest(strategy=request.strategy)
    _fill_request(message, request, request_id, omit_transfers)
    return message


def compare_request_to_pb(
    request: PlanRequest, strategies: Sequence[str] | None = None, *, request_id: str = "", omit_transfers: bool = False
) -> pb.CompareRequest:
    """Encode a compare request; ``request.strategy`` is not sent."""
    message = pb.CompareRequest(strategies=list(strategies or ()))
    _fill_request(message, request, request_id, omit_transfers)
    return message


def total_documents(message: pb.PlanRequest | pb.CompareRequest) -> int:
    """Documents over all micro-batches, counted before any validation (for size limits)."""
    return sum(len(mb.doc_lengths) for mb in message.micro_batches)


# ---------------------------------------------------------------- plans


# The bulk of a plan travels as packed repeated int64 fields (see planner.proto): flat
# lists of fixed-size tuples (segments, transfers) and parallel columns (document
# shardings). Both directions stay in C loops: ``extend(chain.from_iterable(records))``
# flattens named tuples, ``zip(it, it, it)`` regroups a flat list, and
# ``tuple.__new__(KVTransfer, record)`` builds the very named tuple ``KVTransfer(*record)``
# would, without the Python-level ``__new__`` that named tuples define. Segments leave as
# :meth:`Segments.flat` and come back as columns (strided slices of the flat list).
_flatten = itertools.chain.from_iterable
_new_transfer = functools.partial(tuple.__new__, KVTransfer)
_new_doc_sharding = functools.partial(tuple.__new__, DocSharding)
_doc_of, _kind_of, _ranks_of = (operator.itemgetter(DocSharding._fields.index(f)) for f in ("doc", "kind", "ranks"))
_SEGMENT_WIDTH = len(Segment._fields)
_TRANSFER_WIDTH = len(KVTransfer._fields)


def plan_to_pb(plan: Plan, out: pb.Plan | None = None, *, list_transfers: bool = True) -> pb.Plan:
    """Encode a plan; lossless (see module docstring).

    Args:
        plan: the plan.
        out: an empty message to fill in place (e.g. ``response.plans.add()``),
            which saves the deep copy that ``extend``/``CopyFrom`` would make;
            default: a new message.
        list_transfers: list the KV transfers (derived with
            :func:`~flashcp_planner.kv_transfers` when the plan does not list
            them; never for ``ALL_GATHER``). False leaves them out and sets
            ``transfers_omitted`` (``PlanRequest.omit_transfers``).
    """
    message = pb.Plan() if out is None else out
    message.version = plan.version
    message.strategy = plan.strategy
    message.cp_size = plan.cp_size
    message.doc_lengths.extend(plan.doc_lengths)
    message.capacity = plan.capacity
    message.comm = _COMM_TO_PB[plan.comm]
    if plan.gpus_per_node is not None:
        message.gpus_per_node = plan.gpus_per_node
    message.cost_model = plan.cost_model
    message.makespan_ms = plan.makespan_ms
    message.lower_bound_ms = plan.lower_bound_ms
    add_rank = message.ranks.add
    for rp in plan.ranks:
        c = rp.cost
        add_rank(
            rank=rp.rank,
            tokens=c.tokens,
            linear_ms=c.linear_ms,
            attention_ms=c.attention_ms,
            comm_ms=c.comm_ms,
            exposed_comm_ms=c.exposed_comm_ms,
            total_ms=c.total_ms,
            recv_bytes=c.recv_bytes,
            send_bytes=c.send_bytes,
        ).segments.extend(rp.segments.flat())
    documents = plan.documents
    if isinstance(documents, Shardings):  # compact form: whole documents as a rank column
        _fill_compact_shardings(message.documents, documents)
    elif documents:
        # One column at a time (zip(*documents) would hold an iterator per record: GC work).
        shardings = message.documents
        shardings.docs.extend(map(_doc_of, documents))
        shardings.shardings.extend(map(_KIND_TO_PB.__getitem__, map(_kind_of, documents)))  # str enums hash in C
        ranks = list(map(_ranks_of, documents))
        shardings.rank_counts.extend(map(len, ranks))
        shardings.ranks.extend(_flatten(ranks))
    if not list_transfers:
        message.transfers_omitted = True
    elif plan.comm is not CommMode.ALL_GATHER:
        message.transfers.extend(kv_transfer_rows(plan).ravel().tolist())
    if plan.optimality is not None:
        o = plan.optimality
        message.optimality.CopyFrom(
            pb.Optimality(
                status=o.status,
                objective_ms=o.objective_ms,
                bound_ms=o.bound_ms,
                heuristic_ms=o.heuristic_ms,
                heuristic_gap=o.heuristic_gap,
                solve_time_s=o.solve_time_s,
            )
        )
    return message


def _comm_of_plan(message: pb.Plan) -> CommMode:
    comm = comm_from_pb(message.comm, field="plan.comm")
    if comm is None:
        raise InvalidRequest("plan.comm", "missing communication mode")
    return comm


def _fill_compact_shardings(out: pb.DocShardings, documents: Shardings) -> None:
    """The columns of ``documents`` without building a record per whole document."""
    num_docs = len(documents)
    kinds = [_KIND_TO_PB[ShardingKind.WHOLE]] * num_docs
    counts = [1] * num_docs
    ranks: list[int | tuple[int, ...]] = list(documents.whole_rank)
    for doc, record in documents.split.items():
        kinds[doc] = _KIND_TO_PB[record.kind]
        counts[doc] = len(record.ranks)
        ranks[doc] = record.ranks
    out.docs.extend(range(num_docs))
    out.shardings.extend(kinds)
    out.rank_counts.extend(counts)
    if documents.split:
        out.ranks.extend(_flatten((r,) if isinstance(r, int) else r for r in ranks))
    else:
        out.ranks.extend(ranks)  # type: ignore[arg-type]


def _groups(values: list[int], width: int, field: str) -> Iterator[tuple[int, ...]]:
    """``values`` regrouped into consecutive ``width``-tuples (a C-level iterator)."""
    if len(values) % width:
        raise InvalidRequest(field, f"{len(values)} values do not make whole records of {width}")
    it = iter(values)
    return zip(*(it,) * width, strict=True)


def _rank_segments(message: pb.Plan) -> list[Iterator[tuple[int, ...]]]:
    return [_groups(r.segments[:], _SEGMENT_WIDTH, f"plan.ranks[{i}].segments") for i, r in enumerate(message.ranks)]


def _rank_segment_columns(message: pb.Plan) -> list[Segments]:
    out = []
    for i, r in enumerate(message.ranks):
        flat = r.segments[:]
        if len(flat) % _SEGMENT_WIDTH:
            raise InvalidRequest(f"plan.ranks[{i}].segments",
                                 f"{len(flat)} values do not make whole records of {_SEGMENT_WIDTH}")
        out.append(Segments(flat[0::3], flat[1::3], flat[2::3]))
    return out


def _doc_sharding_columns(message: pb.Plan) -> tuple[list[int], list[int], Iterator[list[int]]]:
    """``(docs, sharding numbers, per-record rank lists)`` of ``message.documents``, checked for consistency."""
    d = message.documents
    docs, shardings, counts, ranks = d.docs[:], d.shardings[:], d.rank_counts[:], d.ranks[:]
    if not len(docs) == len(shardings) == len(counts):
        raise InvalidRequest(
            "plan.documents",
            f"columns differ in length: {len(docs)} docs, {len(shardings)} shardings, {len(counts)} rank_counts",
        )
    if counts and min(counts) < 0:
        raise InvalidRequest("plan.documents.rank_counts", "negative rank count")
    if sum(counts) != len(ranks):
        raise InvalidRequest("plan.documents.ranks", f"{len(ranks)} ranks, but rank_counts add up to {sum(counts)}")
    it = iter(ranks)
    return docs, shardings, map(list, map(itertools.islice, itertools.repeat(it), counts))


def plan_from_pb(message: pb.Plan, *, validate: bool = True) -> Plan:
    """Decode a plan. Its ``transfers`` are ``None`` (derived on use) when the message lists none.

    Args:
        message: the encoded plan.
        validate: also check coverage, capacity and transfers with
            :func:`flashcp_planner.validation.validate_plan` (clients should;
            it costs about as much as decoding).

    Raises:
        InvalidRequest: unknown format version or enum value, a packed field
            that does not split into whole records, or (``validate``) a
            structurally invalid plan.
    """
    from flashcp_planner.model import PLAN_FORMAT_VERSION

    if message.version != PLAN_FORMAT_VERSION:
        raise InvalidRequest(
            "plan.version", f"unknown plan format version {message.version}, expected {PLAN_FORMAT_VERSION}"
        )
    ranks = tuple(
        RankPlan(
            rank=r.rank,
            segments=segments,
            cost=RankCost(
                tokens=r.tokens,
                linear_ms=r.linear_ms,
                attention_ms=r.attention_ms,
                comm_ms=r.comm_ms,
                exposed_comm_ms=r.exposed_comm_ms,
                recv_bytes=r.recv_bytes,
                send_bytes=r.send_bytes,
            ),
        )
        for r, segments in zip(message.ranks, _rank_segment_columns(message), strict=True)
    )
    docs, shardings, rank_lists = _doc_sharding_columns(message)
    try:
        kinds = list(map(_KIND_FROM_PB.__getitem__, shardings))
    except KeyError as exc:
        raise InvalidRequest("plan.documents", f"unknown sharding kind number {exc.args[0]}") from None
    documents = tuple(map(_new_doc_sharding, zip(docs, kinds, map(tuple, rank_lists), strict=True)))
    transfers = tuple(map(_new_transfer, _groups(message.transfers[:], _TRANSFER_WIDTH, "plan.transfers")))
    optimality = None
    if message.HasField("optimality"):
        o = message.optimality
        optimality = Optimality(
            status=o.status,
            objective_ms=o.objective_ms,
            bound_ms=o.bound_ms,
            heuristic_ms=o.heuristic_ms,
            heuristic_gap=o.heuristic_gap,
            solve_time_s=o.solve_time_s,
        )
    plan = Plan(
        strategy=message.strategy,
        cp_size=message.cp_size,
        doc_lengths=tuple(message.doc_lengths[:]),
        capacity=message.capacity,
        comm=_comm_of_plan(message),
        cost_model=message.cost_model,
        ranks=ranks,
        documents=documents,
        transfers=transfers or None,
        makespan_ms=message.makespan_ms,
        lower_bound_ms=message.lower_bound_ms,
        optimality=optimality,
        version=message.version,
        gpus_per_node=message.gpus_per_node if message.HasField("gpus_per_node") else None,
    )
    if validate:
        from flashcp_planner.validation import validate_plan

        validate_plan(plan)
    return plan


def plan_pb_to_dict(message: pb.Plan, *, include_timing: bool = True) -> dict[str, Any]:
    """The :meth:`Plan.to_dict` form of an encoded plan, without building a :class:`Plan`.

    A plan whose transfers were omitted (``transfers_omitted``) has no ``"transfers"`` key.

    Raises:
        InvalidRequest: an unknown enum value or a packed field that does not split into whole records.
    """
    docs, shardings, rank_lists = _doc_sharding_columns(message)
    try:
        kinds = list(map(_KIND_VALUE_FROM_PB.__getitem__, shardings))
    except KeyError as exc:
        raise InvalidRequest("plan.documents", f"unknown sharding kind number {exc.args[0]}") from None
    out: dict[str, Any] = {
        "version": message.version,
        "strategy": message.strategy,
        "cp_size": message.cp_size,
        "doc_lengths": message.doc_lengths[:],
        "capacity": message.capacity,
        "comm": _comm_of_plan(message).value,
        "cost_model": message.cost_model,
        "makespan_ms": message.makespan_ms,
        "lower_bound_ms": message.lower_bound_ms,
        "ranks": [
            {
                "rank": r.rank,
                "segments": list(map(list, segments)),
                "tokens": r.tokens,
                "linear_ms": r.linear_ms,
                "attention_ms": r.attention_ms,
                "comm_ms": r.comm_ms,
                "exposed_comm_ms": r.exposed_comm_ms,
                "total_ms": r.total_ms,
                "recv_bytes": r.recv_bytes,
                "send_bytes": r.send_bytes,
            }
            for r, segments in zip(message.ranks, _rank_segments(message), strict=True)
        ],
        "documents": [
            {"doc": doc, "sharding": kind, "ranks": ranks}
            for doc, kind, ranks in zip(docs, kinds, rank_lists, strict=True)
        ],
    }
    if not message.transfers_omitted:
        out["transfers"] = list(map(list, _groups(message.transfers[:], _TRANSFER_WIDTH, "plan.transfers")))
    if message.HasField("gpus_per_node"):
        out["gpus_per_node"] = message.gpus_per_node
    if message.HasField("optimality"):
        o = message.optimality
        opt = {
            "status": o.status,
            "objective_ms": o.objective_ms,
            "bound_ms": o.bound_ms,
            "heuristic_ms": o.heuristic_ms,
            "heuristic_gap": o.heuristic_gap,
        }
        if include_timing:
            opt["solve_time_s"] = o.solve_time_s
        out["optimality"] = opt
    return out


# ---------------------------------------------------------------- comparisons


def comparisons_to_pb(
    comparisons: Sequence[Sequence[Comparison]], *, list_transfers: bool = True
) -> list[pb.MicroBatchComparison]:
    """Encode :func:`flashcp_planner.compare` output (one row per micro-batch); ``list_transfers`` as in
    :func:`plan_to_pb`."""
    rows = []
    for row in comparisons:
        message = pb.MicroBatchComparison()
        for c in row:
            result = message.results.add(strategy=c.strategy, error=c.error)
            if c.plan is not None:
                plan_to_pb(c.plan, result.plan, list_transfers=list_transfers)
        rows.append(message)
    return rows


def comparisons_from_pb(
    rows: Sequence[pb.MicroBatchComparison], *, validate: bool = True
) -> tuple[tuple[Comparison, ...], ...]:
    """Decode the ``comparisons`` of a :class:`CompareResponse`."""
    return tuple(
        tuple(
            Comparison(
                strategy=r.strategy,
                plan=plan_from_pb(r.plan, validate=validate) if r.HasField("plan") else None,
                error=r.error,
            )
            for r in row.results
        )
        for row in rows
    )
