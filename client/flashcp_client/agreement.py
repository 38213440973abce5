"""Plan agreement: every rank of a CP group must execute the identical plan on matching inputs.

A collective whose shapes come from the plan (the KV exchange) hangs, aborts
the process or silently corrupts the output when ranks disagree. Before the
first KV moves, every rank contributes one fixed-size ``int64`` record (plan
fingerprint, group size seen, layer, and per tensor its token count, dtype,
head count and head dim) to one ``all_gather``: a collective that is safe
whatever the ranks hold. Every rank then runs the same pure diagnosis on the
same table (:func:`diagnose`), so a mismatch raises the *same*
:class:`~flashcp_client.PlanMismatchError` on every rank, before any KV moves.

:func:`cp_attention` does this by default on the first use of each plan object
with each input signature (:class:`AgreementCache`): one small collective per
micro-batch. Modes (``agreement=`` argument, or ``FLASHCP_AGREEMENT``):

* ``"first_use"`` (default): check a plan the first time it is used with given
  shapes and dtypes in a group; later layers reuse the verdict.
* ``"always"``: check on every call (catches a rank that skips a later layer).
* ``"off"``: never check; for users who guarantee agreement themselves.

The wait for the other ranks is bounded (``FLASHCP_AGREEMENT_TIMEOUT_S``,
default 300 s, well under the process-group timeout): a rank that failed
before reaching the check makes the others raise :class:`AgreementTimeout`
instead of waiting for the process-group timeout (30 min gloo, 10 min NCCL).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from flashcp_client import env
from flashcp_client.errors import PlanMismatchError
from flashcp_planner import Plan
from flashcp_planner.model import PLAN_FORMAT_VERSION

__all__ = [
    "AGREEMENT_MODES",
    "AgreementTimeout",
    "agreement_mode",
    "agreement_timeout_s",
    "check_plan_matches",
    "diagnose",
    "verify_plan_agreement",
]

AGREEMENT_MODES = ("first_use", "always", "off")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2,
           torch.int64, torch.int32)
_DIGEST_WORDS = 4  # 32 bytes of the SHA-256 fingerprint as int64 words
_ABSENT = -1
# Record layout: digest words, then these fields, then (tokens, dtype, heads, head_dim, ndim) for q, k, v.
_FIELDS = ("batch_ok", "version_ok", "plan_cp_size", "group_size", "layer", "device")
_TENSOR_FIELDS = ("tokens", "dtype", "heads", "head_dim", "ndim")
_TENSORS = ("q", "k", "v")
RECORD_WORDS = _DIGEST_WORDS + len(_FIELDS) + len(_TENSORS) * len(_TENSOR_FIELDS)


class AgreementTimeout(RuntimeError):
    """Some rank of the group did not reach the agreement check in time (it failed or skipped the call)."""


def agreement_mode(mode: str | None = None) -> str:
    """``mode`` if given, else ``FLASHCP_AGREEMENT`` (default ``"first_use"``), checked.

    Raises:
        ValueError: not one of :data:`AGREEMENT_MODES`.
    """
    value = mode if mode is not None else env.agreement()
    if value not in AGREEMENT_MODES:
        source = "agreement" if mode is not None else "FLASHCP_AGREEMENT"
        raise ValueError(f"{source}: expected one of {list(AGREEMENT_MODES)}, got {value!r}")
    return value


def agreement_timeout_s() -> float:
    """``FLASHCP_AGREEMENT_TIMEOUT_S``: how long a rank waits for the others at the check (default 300)."""
    return env.agreement_timeout_s()


def check_plan_matches(
    plan: Plan, *, group_size: int, rank: int, local_tokens: int | None = None, total_tokens: int | None = None
) -> None:
    """Local checks of a plan against the group and the batch (no communication).

    Raises:
        PlanMismatchError: wrong plan format version, CP size, rank, local or
            total token count.
    """
    if plan.version != PLAN_FORMAT_VERSION:
        raise PlanMismatchError(
            "version", f"plan format version {plan.version}, this client executes {PLAN_FORMAT_VERSION}"
        )
    if plan.cp_size != group_size:
        raise PlanMismatchError("cp_size", f"plan is for {plan.cp_size} ranks but the process group has {group_size}")
    if not 0 <= rank < plan.cp_size:
        raise PlanMismatchError("rank", f"rank {rank} is outside the plan's CP group of size {plan.cp_size}")
    if total_tokens is not None and total_tokens != plan.num_tokens:
        raise PlanMismatchError("total_tokens", f"batch has {total_tokens} tokens, plan covers {plan.num_tokens}")
    if local_tokens is not None and local_tokens != plan.ranks[rank].num_tokens:
        raise PlanMismatchError(
            "local_tokens", f"rank {rank} holds {local_tokens} tokens, plan gives it {plan.ranks[rank].num_tokens}"
        )


def _digest_words(plan: Plan) -> list[int]:
    raw = bytes.fromhex(plan.fingerprint())
    return [int.from_bytes(raw[8 * i: 8 * i + 8], "little", signed=True) for i in range(_DIGEST_WORDS)]


def _tensor_words(t: torch.Tensor | None) -> list[int]:
    if t is None:
        return [_ABSENT] * len(_TENSOR_FIELDS)
    dtype = _DTYPES.index(t.dtype) if t.dtype in _DTYPES else len(_DTYPES)
    if t.dim() == 3:
        return [t.shape[0], dtype, t.shape[1], t.shape[2], 3]
    return [t.shape[0] if t.dim() else _ABSENT, dtype, _ABSENT, _ABSENT, t.dim()]


def _record(
    plan: Plan,
    group_size: int,
    *,
    layer: int,
    tensors: Sequence[torch.Tensor | None],
    device: torch.device,
    batch_ok: bool = True,
) -> list[int]:
    words = [*_digest_words(plan), int(batch_ok), int(plan.version == PLAN_FORMAT_VERSION), plan.cp_size,
             group_size, layer, int(device.type == "cuda")]
    for t in tensors:
        words.extend(_tensor_words(t))
    assert len(words) == RECORD_WORDS, "record layout out of sync"
    return words


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]).removeprefix("torch.") if 0 <= code < len(_DTYPES) else "another dtype"


def _split(row: Sequence[int]) -> tuple[tuple[int, ...], dict[str, int], dict[str, dict[str, int]]]:
    digest = tuple(row[:_DIGEST_WORDS])
    head = dict(zip(_FIELDS, row[_DIGEST_WORDS:_DIGEST_WORDS + len(_FIELDS)], strict=True))
    rest = row[_DIGEST_WORDS + len(_FIELDS):]
    width = len(_TENSOR_FIELDS)
    tensors = {name: dict(zip(_TENSOR_FIELDS, rest[i * width:(i + 1) * width], strict=True))
               for i, name in enumerate(_TENSORS)}
    return digest, head, tensors


def _by_value(values: Sequence[Any]) -> str:
    groups: dict[Any, list[int]] = {}
    for r, value in enumerate(values):
        groups.setdefault(value, []).append(r)
    return "; ".join(f"ranks {ranks}: {value}" for value, ranks in groups.items())


def diagnose(rows: Sequence[Sequence[int]], plan: Plan) -> PlanMismatchError | None:
    """The error a gathered table of records stands for, or ``None`` if the ranks agree.

    Pure: every rank holds the same table, so every rank derives the same error
    (``plan`` is only read once the fingerprints are known to agree).
    """
    parsed = [_split(row) for row in rows]
    size = len(rows)
    heads = [h for _, h, _ in parsed]
    if len({h["layer"] for h in heads}) > 1:
        return PlanMismatchError(
            "layer", f"ranks are in different layers ({_by_value([h['layer'] for h in heads])}); "
                     "a rank skipped or reordered a cp_attention call")
    wrong_group = [r for r, h in enumerate(heads) if h["group_size"] != size]
    if wrong_group:
        return PlanMismatchError("group", f"ranks {wrong_group} are not in the same process group of {size} ranks")
    if any(h["plan_cp_size"] != size for h in heads):
        sizes = _by_value([h["plan_cp_size"] for h in heads])
        return PlanMismatchError("cp_size", f"the process group has {size} ranks, plans are for ({sizes})")
    bad_batch = [r for r, h in enumerate(heads) if not h["batch_ok"]]
    if bad_batch:
        return PlanMismatchError("total_tokens", f"ranks {bad_batch} hold a batch whose token count is not the "
                                                 f"plan's")
    old = [r for r, h in enumerate(heads) if not h["version_ok"]]
    if old:
        return PlanMismatchError("version", f"ranks {old} hold a plan of another format version than "
                                            f"{PLAN_FORMAT_VERSION}")
    digests = [d for d, _, _ in parsed]
    if len(set(digests)) > 1:
        labels = {d: f"plan {i}" for i, d in enumerate(dict.fromkeys(digests))}
        return PlanMismatchError(
            "fingerprint", f"ranks of the CP group hold different plans ({_by_value([labels[d] for d in digests])})"
        )
    if len({h["device"] for h in heads}) > 1:
        devices = _by_value(["cuda" if h["device"] else "cpu" for h in heads])
        return PlanMismatchError("device", f"ranks mix devices ({devices})")
    for name in _TENSORS:
        present = [t[name] for _, _, t in parsed]
        if all(t["tokens"] == _ABSENT and t["ndim"] == _ABSENT for t in present):
            continue
        if any(t["ndim"] != 3 for t in present):
            return PlanMismatchError(
                f"{name}.shape", f"must be [tokens, heads, head_dim] on every rank (dims: "
                                 f"{_by_value([t['ndim'] for t in present])})")
        tokens = [t["tokens"] for t in present]
        wrong = [r for r in range(size) if tokens[r] != plan.ranks[r].num_tokens]
        if wrong:
            detail = ", ".join(f"rank {r} holds {tokens[r]}, the plan gives it {plan.ranks[r].num_tokens}"
                               for r in wrong)
            return PlanMismatchError(f"{name}.shape[0]", f"token counts do not match the plan: {detail}")
    codes = [[t[name]["dtype"] for name in _TENSORS if t[name]["ndim"] != _ABSENT] for _, _, t in parsed]
    if len({c for row in codes for c in row}) > 1:
        described = [", ".join(f"{n}={_dtype_name(c)}" for n, c in zip(_TENSORS, row, strict=False)) for row in codes]
        return PlanMismatchError("dtype", f"q, k, v must share one dtype on every rank ({_by_value(described)})")
    for name in _TENSORS:
        shapes = [(t[name]["heads"], t[name]["head_dim"]) for _, _, t in parsed]
        if len(set(shapes)) > 1:
            return PlanMismatchError(
                f"{name}.shape[1:]", f"head count and head dim differ between ranks "
                                     f"({_by_value([f'{h} heads x {d}' for h, d in shapes])})")
    _, _, t = parsed[0]
    q, k, v = t["q"], t["k"], t["v"]
    if q["ndim"] == 3 and k["ndim"] == 3:
        if (k["heads"], k["head_dim"]) != (v["heads"], v["head_dim"]):
            return PlanMismatchError("k.shape", f"k and v must have the same shape: k has {k['heads']} heads x "
                                                f"{k['head_dim']}, v {v['heads']} x {v['head_dim']}")
        if q["head_dim"] != k["head_dim"] or k["heads"] < 1 or q["heads"] % k["heads"]:
            return PlanMismatchError("q.shape", f"q has {q['heads']} heads x {q['head_dim']}, k {k['heads']} x "
                                                f"{k['head_dim']}: head dims must match and kv heads divide heads")
    return None


def _collective_device(group: Any) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_records(record: list[int], group: Any, *, timeout_s: float | None = None) -> list[list[int]]:
    """All ranks' records, by one fixed-size ``all_gather``; waits at most ``timeout_s``.

    Raises:
        AgreementTimeout: the group did not complete the gather in time.
    """
    size = dist.get_world_size(group)
    mine = torch.tensor(record, dtype=torch.int64, device=_collective_device(group))
    records = [torch.empty_like(mine) for _ in range(size)]
    work = dist.all_gather(records, mine, group=group, async_op=True)
    limit = agreement_timeout_s() if timeout_s is None else timeout_s
    try:
        work.wait(timeout=timedelta(seconds=limit))
    except RuntimeError as exc:
        raise AgreementTimeout(
            f"rank {dist.get_rank(group)}: the other ranks of the CP group did not reach the plan agreement check "
            f"within {limit:g} s (a rank failed or skipped a cp_attention call): {exc}"
        ) from None
    return [r.tolist() for r in records]


def check_agreement(
    plan: Plan,
    group: Any,
    *,
    tensors: Sequence[torch.Tensor | None] = (None, None, None),
    layer: int = _ABSENT,
    timeout_s: float | None = None,
) -> None:
    """One agreement round: gather every rank's record and raise the diagnosis on every rank.

    Collective over ``group``. ``tensors`` are ``(q, k, v)`` (or ``None`` for
    what the caller does not pass); ``layer`` identifies the call site.

    Raises:
        PlanMismatchError: the same error on every rank, when anything differs.
        AgreementTimeout: the other ranks did not reach the check in time.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    size = dist.get_world_size(group)
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    rows = exchange_records(_record(plan, size, layer=layer, tensors=tensors, device=device), group,
                            timeout_s=timeout_s)
    error = diagnose(rows, plan)
    if error is not None:
        raise error


class AgreementCache:
    """Which (plan object, group, input signature) a group has already checked; a few recent entries.

    Keyed by the plan *object*, not its fingerprint: ranks that hold different
    plans could otherwise disagree on whether a plan is new, and only some of
    them would enter the check. Each micro-batch brings new plan objects, so
    each is checked once; the layers after the first reuse the verdict.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[Any, ...], Plan] = OrderedDict()

    def key(self, plan: Plan, group: Any, tensors: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        return (id(plan), id(group), *((t.dtype, tuple(t.shape), t.device) for t in tensors))

    def seen(self, key: tuple[Any, ...]) -> bool:
        if key in self._entries:
            self._entries.move_to_end(key)
            return True
        return False

    def add(self, key: tuple[Any, ...], plan: Plan) -> None:
        self._entries[key] = plan  # holding the plan keeps its id from being reused
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


CACHE = AgreementCache()
"""The process-wide cache :func:`flashcp_client.cp_attention` consults."""


def ensure_agreement(
    plan: Plan, group: Any, tensors: Sequence[torch.Tensor], *, mode: str | None = None, layer: int = _ABSENT
) -> None:
    """Check agreement for a ``cp_attention`` call according to ``mode`` (see the module docstring)."""
    mode = agreement_mode(mode)
    if mode == "off":
        return
    key = CACHE.key(plan, group, tensors)
    if mode == "first_use" and CACHE.seen(key):
        return
    check_agreement(plan, group, tensors=tensors, layer=layer)
    CACHE.add(key, plan)


def verify_plan_agreement(
    plan: Plan,
    group: Any = None,
    *,
    local_tokens: int | None = None,
    total_tokens: int | None = None,
    timeout_s: float | None = None,
) -> str:
    """Check that every rank of ``group`` holds the same plan and that it fits each rank's batch.

    Collective over ``group``; :func:`flashcp_client.cp_attention` already does
    this by default, so call it only to check earlier (e.g. right after the
    dataloader). It always enters exactly one fixed-size ``all_gather``, even
    when the local checks fail, so a problem on one rank raises the same error
    on every rank instead of leaving the others blocked in a later collective.

    Args:
        plan: the plan this rank is about to execute.
        group: the CP process group (default: the world).
        local_tokens: tokens this rank holds (checked against the plan if given).
        total_tokens: tokens of the packed micro-batch (checked if given).
        timeout_s: how long to wait for the other ranks (default :func:`agreement_timeout_s`).

    Returns:
        The agreed plan fingerprint.

    Raises:
        PlanMismatchError: on every rank, if any rank's plan differs or does not
            fit its batch.
        AgreementTimeout: the other ranks did not reach the check in time.
        RuntimeError: torch.distributed is not initialised.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call init_process_group first")
    size = dist.get_world_size(group)
    batch_ok = total_tokens is None or total_tokens == plan.num_tokens
    tokens = None if local_tokens is None else torch.empty((local_tokens, 0, 0))
    record = _record(plan, size, layer=_ABSENT, tensors=(tokens, None, None), device=torch.device("cpu"),
                     batch_ok=batch_ok)
    error = diagnose(exchange_records(record, group, timeout_s=timeout_s), plan)
    if error is not None:
        raise error
    return plan.fingerprint()
