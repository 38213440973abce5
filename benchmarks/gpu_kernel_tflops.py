"""Segment-attention kernel TFLOP/s vs document length, against torch SDPA (GPU script).

For each document length L (128 .. 64K) a packed batch of ``--total-tokens / L``
documents of L tokens (one whole-document segment each) is timed:

* ours: ``segment_attention_forward`` (one varlen launch), and forward+backward
  through the autograd function;
* torch: ``scaled_dot_product_attention`` with ``is_causal=True`` on the same
  documents as a batch ``[num_docs, H, L, D]`` (equal lengths, so batching is
  exact), flash backend when available, K/V expanded to H heads beforehand.

FLOPs: forward = 4 * causal pairs * H * D with pairs = L(L+1)/2 per document;
backward = 2.5 x forward (five matmuls vs two), so forward+backward = 3.5 x.
Before timing, each length checks ours against SDPA (max abs difference, printed).

Run on a GPU:    python benchmarks/gpu_kernel_tflops.py            (writes benchmarks/results/gpu_kernels.md)
Smoke on a CPU:  python benchmarks/gpu_kernel_tflops.py --dry-run  (Triton interpreter, tiny shapes, no file)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_LENGTHS = [128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
RESULTS = Path(__file__).resolve().parent / "results" / "gpu_kernels.md"
BWD_FLOPS_RATIO = 2.5


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="comma-separated document lengths (default: 128..65536, powers of two)")
    p.add_argument("--total-tokens", type=int, default=65536, help="tokens per launch (default: %(default)s)")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dims", type=lambda s: [int(x) for x in s.split(",")], default=[128, 64],
                   help="comma-separated head dims (default: 128,64)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before timing (compiles the kernels)")
    p.add_argument("--no-backward", action="store_true", help="forward only")
    p.add_argument("--output", type=Path, default=None, help=f"markdown results (default: {RESULTS})")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU smoke test: Triton interpreter, fp32, tiny shapes, 1 rep, no file unless --output")
    args = p.parse_args(argv)
    if args.dry_run:
        args.lengths = args.lengths or [16, 32]
        args.total_tokens, args.heads, args.kv_heads, args.head_dims, args.reps, args.warmup = 64, 2, 1, [16], 1, 0
    else:
        args.lengths = args.lengths or DEFAULT_LENGTHS
        args.output = args.output or RESULTS
    return args


def sdpa_docs(q, k, v, num_docs: int, length: int):
    """SDPA over num_docs equal documents: q [T, H, D], k/v [T, H, D] (already expanded) -> [T, H, D]."""
    def docs(t):
        return t.view(num_docs, length, t.shape[1], t.shape[2]).transpose(1, 2)

    out = F.scaled_dot_product_attention(docs(q), docs(k), docs(v), is_causal=True)
    return out.transpose(1, 2).reshape(q.shape)


def sdpa_context(device: torch.device):
    """Flash backend on CUDA when this torch has it; the default choice otherwise."""
    from contextlib import nullcontext

    if device.type != "cuda":
        return nullcontext(), "default"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), "flash/efficient"


def bench_one(length, head_dim, args, device, dtype):
    from flashcp_kernels import segment_attention, segment_attention_forward
    from flashcp_kernels.profile import benchmark_ms, causal_pairs, packed_meta

    num_docs = max(1, args.total_tokens // length)
    tokens = num_docs * length
    meta = packed_meta(length, num_docs, device)
    gen = torch.Generator(device=device).manual_seed(length)
    q = torch.randn(tokens, args.heads, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(tokens, args.kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(tokens, args.kv_heads, head_dim, device=device, dtype=dtype, generator=gen)
    groups = args.heads // args.kv_heads
    k_full, v_full = (t.repeat_interleave(groups, dim=1).contiguous() for t in (k, v))
    ctx, sdpa_name = sdpa_context(device)

    out, _ = segment_attention_forward(q, k, v, meta)
    with ctx:
        ref = sdpa_docs(q, k_full, v_full, num_docs, length)
    max_diff = (out.float() - ref.float()).abs().max().item()

    def tflops(flops, fn):
        return flops / (benchmark_ms(fn, device=device, reps=args.reps, warmup=args.warmup) * 1e9)

    fwd_flops = 4.0 * causal_pairs(0, length) * num_docs * args.heads * head_dim
    row = {"length": length, "docs": num_docs, "head_dim": head_dim, "max_diff": max_diff, "sdpa": sdpa_name}
    row["ours_fwd"] = tflops(fwd_flops, lambda: segment_attention_forward(q, k, v, meta))
    with ctx:
        row["sdpa_fwd"] = tflops(fwd_flops, lambda: sdpa_docs(q, k_full, v_full, num_docs, length))
    if not args.no_backward:
        total_flops = fwd_flops * (1 + BWD_FLOPS_RATIO)
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        qf, kf, vf = (t.detach().requires_grad_() for t in (q, k_full, v_full))
        dout = torch.randn_like(q)

        def ours_step():
            segment_attention(qg, kg, vg, meta).backward(dout)

        def sdpa_step():
            with ctx:
                sdpa_docs(qf, kf, vf, num_docs, length).backward(dout)

        row["ours_fwdbwd"] = tflops(total_flops, ours_step)
        row["sdpa_fwdbwd"] = tflops(total_flops, sdpa_step)
    return row


def to_markdown(rows, args, device_name: str) -> str:
    lines = [
        "# Segment-attention kernel throughput vs torch SDPA",
        "",
        f"Device: {device_name}; dtype {args.dtype if not args.dry_run else 'fp32 (dry run)'}; "
        f"heads {args.heads}/{args.kv_heads} (GQA); {args.total_tokens} tokens per launch "
        "(packed equal documents, causal per document). TFLOP/s from causal-pair FLOPs "
        f"(fwd = 4*pairs*H*D, fwd+bwd = {1 + BWD_FLOPS_RATIO}x). Produced by benchmarks/gpu_kernel_tflops.py.",
        "",
        "| head_dim | doc length | docs | ours fwd | SDPA fwd | ours/SDPA fwd | ours fwd+bwd | SDPA fwd+bwd "
        "| ours/SDPA fwd+bwd | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fb = (f"{r['ours_fwdbwd']:.1f} | {r['sdpa_fwdbwd']:.1f} | {r['ours_fwdbwd'] / r['sdpa_fwdbwd']:.2f}"
              if "ours_fwdbwd" in r else "- | - | -")
        lines.append(f"| {r['head_dim']} | {r['length']} | {r['docs']} | {r['ours_fwd']:.1f} | {r['sdpa_fwd']:.1f} "
                     f"| {r['ours_fwd'] / r['sdpa_fwd']:.2f} | {fb} | {r['max_diff']:.2e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # read at kernel build time by flashcp_kernels
        device, dtype = torch.device("cpu"), torch.float32
    else:
        if not torch.cuda.is_available():
            print("gpu_kernel_tflops: no CUDA GPU (use --dry-run for a CPU smoke test)", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)"
    rows = []
    for head_dim in args.head_dims:
        for length in args.lengths:
            row = bench_one(length, head_dim, args, device, dtype)
            rows.append(row)
            print(f"D={head_dim:<4} L={length:<6} docs={row['docs']:<5} ours fwd {row['ours_fwd']:8.2f} "
                  f"sdpa fwd {row['sdpa_fwd']:8.2f} TFLOP/s"
                  + (f" | fwd+bwd ours {row['ours_fwdbwd']:8.2f} sdpa {row['sdpa_fwdbwd']:8.2f}"
                     if "ours_fwdbwd" in row else "")
                  + f" | max diff {row['max_diff']:.2e}", flush=True)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(to_markdown(rows, args, device_name))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
