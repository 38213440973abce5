"""Train a small decoder on packed documents with FlashCP over a CP group of gloo ranks (CPU).

    python examples/train_packed_cp.py --ranks 2 --steps 8 [--compile] [--check]

Every rank packs the same document stream; only CP rank 0 plans (``plan_on_rank=0``)
and :func:`flashcp_client.share_plan` broadcasts each plan. Per micro-batch:
``cp_context`` (the plan of every attention layer), ``cp_loss`` (normalised by the
valid tokens of the whole micro-batch), ``backward``, ``all_reduce_gradients`` over
the CP group, optimizer step. ``--check`` also trains the unsharded model on rank 0
and prints the largest loss and gradient differences per step.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_decoder import TinyConfig, TinyDecoder  # noqa: E402

from flashcp_client import (  # noqa: E402
    PackedCPDataset,
    PackingStats,
    all_reduce_gradients,
    cp_context,
    cp_loss,
    global_mean,
    packed_labels,
    packed_position_ids,
    share_plan,
)


def documents(count: int, vocab: int, max_len: int, seed: int) -> list[list[int]]:
    """Documents of 1..max_len tokens (some longer than the context: they are split), each an arithmetic
    sequence modulo ``vocab`` with its own start and a stride from a few: learnable in context."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        start, stride = rng.randrange(vocab), rng.choice((1, 2, 3, 5, 7))
        out.append([(start + stride * i) % vocab for i in range(rng.randint(1, max_len))])
    return out


def reference_step(model: TinyDecoder, item: dict) -> torch.Tensor:
    """The unsharded model's mean loss on the whole packed micro-batch (backward done)."""
    packed = item["packed"]
    tokens, lengths = packed["tokens"], packed["doc_lengths"]
    labels = packed_labels(tokens, lengths, next_tokens=packed["next_tokens"])
    logits = model(tokens, packed_position_ids(lengths, packed["starts"]), lengths)
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)
    loss.backward()
    return loss.detach()


def train(rank: int, world: int, args: argparse.Namespace) -> list[dict]:
    """One CP rank's training loop; returns per-step records (loss, and differences with --check)."""
    config = TinyConfig()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = TinyDecoder(config, cp=True)
    reference = TinyDecoder(config, cp=False) if args.check else None
    if reference is not None:
        reference.load_state_dict(model.state_dict())
    step_fn = torch.compile(model, fullgraph=True, backend=args.compile) if args.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=args.lr) if reference is not None else None

    docs = documents(args.documents, config.vocab_size, args.max_doc_len, seed=1)
    dataset = PackedCPDataset(docs, context_size=args.context, cp_size=world, rank=rank, plan_on_rank=0)
    loader = DataLoader(dataset, batch_size=None, num_workers=args.workers)
    packing = PackingStats()
    records = []
    for step, item in enumerate(loader):
        if step == args.steps:
            break
        batch = share_plan(item, None)  # CP rank 0's plan, on every rank
        packing.add(batch)
        opt.zero_grad(set_to_none=True)
        with cp_context(batch["plan"]):
            logits = step_fn(batch["input_ids"], batch["position_ids"])
            loss = cp_loss(logits, batch["labels"])
            loss.backward()
        all_reduce_gradients(model)
        record = {"step": step, "loss": global_mean(loss), "plan": batch["plan_fingerprint"][:12]}
        if reference is not None:
            ref_opt.zero_grad(set_to_none=True)
            record["ref_loss"] = float(reference_step(reference, batch))
            record["max_grad_diff"] = max(
                (p.grad - r.grad).abs().max().item() for p, r in zip(model.parameters(), reference.parameters(),
                                                                      strict=True))
            record["max_grad"] = max(r.grad.abs().max().item() for r in reference.parameters())
            ref_opt.step()
        opt.step()
        records.append(record)
        if rank == 0 and args.verbose:
            extra = (f"  unsharded {record['ref_loss']:.6f}  max |dgrad| {record['max_grad_diff']:.2e}"
                     if reference is not None else "")
            print(f"step {step}  loss {record['loss']:.6f}{extra}  plan {record['plan']}", flush=True)
    if rank == 0 and args.verbose:
        print(f"packing: {packing}", flush=True)
    return records


def _worker(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))
    try:
        train(rank, world, args)
    finally:
        dist.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="CP group size (gloo processes)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--context", type=int, default=256, help="tokens per packed micro-batch")
    parser.add_argument("--documents", type=int, default=64)
    parser.add_argument("--max-doc-len", type=int, default=400)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    parser.add_argument("--compile", nargs="?", const="inductor", default=None,
                        help="torch.compile the model (fullgraph) with this backend (default inductor)")
    parser.add_argument("--check", action="store_true", help="compare with the unsharded model every step")
    parser.add_argument("--quiet", dest="verbose", action="store_false")
    return parser.parse_args(argv)


def main() -> None:
    import torch.multiprocessing as mp

    args = parse_args()
    port = int(os.environ.get("MASTER_PORT", "29533"))
    mp.spawn(_worker, args=(args.ranks, port, args), nprocs=args.ranks)


if __name__ == "__main__":
    main()
