"""The ``flashcp`` command line: plan, compare strategies, list strategies/presets/workloads, serve, explore,
profile.

Every user error (bad lengths, unknown names, out-of-range numbers, infeasible
requests, bad cost files) exits with status 2 and one line on stderr naming the
field and the problem. ``serve``, ``explore`` and ``profile`` are provided by the
``flashcp_service`` and ``flashcp_kernels`` packages, imported only when those
commands run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from flashcp_planner.errors import Infeasible, InvalidRequest, PlanningError
from flashcp_planner.model import CommMode
from flashcp_planner.report import OPTIMUM_MAX_DOCS
from flashcp_planner.request import PlanOptions, PlanRequest

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
"""Exit status of every user error (argparse convention)."""


class _UsageError(Exception):
    """An argparse error, reported as one line instead of usage + message."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


@dataclass(frozen=True, slots=True, kw_only=True)
class _Delegate:
    """A command implemented by another package, imported only when the command runs."""

    module: str
    add_arguments: str
    """Name of ``add_*_arguments(parser)`` in ``module``."""
    run: str
    """Name of ``run_*(args) -> int`` in ``module``."""
    help: str
    missing: str
    """One-line message when ``module`` cannot be imported."""


_DELEGATES = {
    "serve": _Delegate(module="flashcp_service.cli", add_arguments="add_serve_arguments", run="run_serve",
                       help="run the planner as a gRPC + HTTP sidecar",
                       missing="flashcp serve needs the server extra: pip install 'flashcp[server]'"),
    "explore": _Delegate(module="flashcp_service.cli", add_arguments="add_explore_arguments", run="run_explore",
                         help="open the plan explorer (a local sidecar with its page at /ui/) in a browser",
                         missing="flashcp explore needs the server extra: pip install 'flashcp[server]'"),
    "profile": _Delegate(module="flashcp_kernels.profile", add_arguments="add_profile_arguments", run="run_profile",
                         help="measure attention kernels on this GPU to calibrate a cost model",
                         missing="flashcp profile needs the kernels extra: pip install 'flashcp[kernels]'"),
}


def _add_cost_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cp", type=int, required=True, metavar="N", help="ranks in the CP group")
    p.add_argument("--cost", default="h100-llama8b", metavar="PRESET|FILE",
                   help="cost-model preset name or JSON cost-model file (default: %(default)s; see `flashcp presets`)")
    p.add_argument("--slack", type=float, default=0.25, metavar="F",
                   help="per-rank capacity is ceil(T/N)*(1+F) tokens (default: %(default)s)")
    p.add_argument("--capacity", type=int, default=None, metavar="C",
                   help="absolute per-rank token capacity (overrides --slack)")
    p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")


def _add_input_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--lengths", metavar="FILE|-",
                     help="document lengths: integers separated by whitespace/commas (one micro-batch), or JSON "
                          "(a list, or a list of lists for several micro-batches); '-' reads stdin")
    src.add_argument("--workload", metavar="NAME", help="generate micro-batches (see `flashcp workloads`)")
    p.add_argument("--context", type=int, metavar="TOKENS", help="tokens per generated micro-batch")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="workload seed (default: %(default)s)")
    p.add_argument("--micro-batches", type=int, default=1, metavar="K",
                   help="generated micro-batches (default: %(default)s)")


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The argument parser. ``argv`` decides whether ``serve``/``profile`` import their packages."""
    parser = _Parser(prog="flashcp", description="Sharding plans for context-parallel attention over packed "
                                                 "documents.")
    parser.add_argument("--version", action="version", version=f"flashcp {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plan", help="plan micro-batches with one strategy",
                       description="Plan every micro-batch with one strategy and print the per-rank breakdown.")
    _add_input_arguments(p)
    _add_cost_arguments(p)
    p.add_argument("--strategy", default="flashcp", metavar="NAME",
                   help="strategy (default: %(default)s; see `flashcp strategies`)")
    p.add_argument("--comm", choices=[m.value for m in CommMode], default=None,
                   help="override the strategy's communication mechanism")
    p.add_argument("--time-limit", type=float, default=10.0, metavar="S",
                   help="time limit of exact strategies, seconds (default: %(default)s)")
    p.set_defaults(run=_run_plan)

    p = sub.add_parser("compare", help="compare strategies side by side",
                       description="Plan every micro-batch with every strategy and compare makespans, speedups over "
                                   "per_doc and zigzag, the lower bound and KV volume (forward bytes received).")
    _add_input_arguments(p)
    _add_cost_arguments(p)
    p.add_argument("--strategies", metavar="A,B,...",
                   help="comma-separated strategies (default: all registered; exact ones are skipped on micro-batches "
                        f"of more than {OPTIMUM_MAX_DOCS} documents unless named here)")
    p.add_argument("--time-limit", type=float, default=5.0, metavar="S",
                   help="time limit of exact strategies per micro-batch, seconds (default: %(default)s)")
    p.add_argument("--plot", metavar="FILE.png", help="write per-rank stacked time bars of every strategy as a PNG")
    p.add_argument("--plot-micro-batch", type=int, default=0, metavar="I",
                   help="micro-batch drawn by --plot (default: %(default)s)")
    p.set_defaults(run=_run_compare)

    for name, helptext, runner in (("strategies", "list planning strategies", _run_strategies),
                                   ("presets", "list cost-model presets", _run_presets),
                                   ("workloads", "list workload generators", _run_workloads)):
        p = sub.add_parser(name, help=helptext, description=helptext.capitalize() + ".")
        p.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
        p.set_defaults(run=runner)

    command = _command(argv)
    for name, delegate in _DELEGATES.items():
        if command == name:
            add_arguments, run = _load_delegate(delegate)
            p = sub.add_parser(name, help=delegate.help, description=delegate.help.capitalize() + ".")
            add_arguments(p)
            p.set_defaults(run=run)
        else:  # listed in --help; never parsed, so its package is not imported
            sub.add_parser(name, help=delegate.help, add_help=False)
    return parser


def _version() -> str:
    from flashcp_planner import __version__

    return __version__


class _MissingExtra(Exception):
    """``serve``/``profile`` asked for but their package (or one of its dependencies) is not installed."""


def _command(argv: Sequence[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def _load_delegate(delegate: _Delegate) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[Any], int]]:
    try:
        module = importlib.import_module(delegate.module)
        return getattr(module, delegate.add_arguments), getattr(module, delegate.run)
    except (ImportError, AttributeError) as exc:
        raise _MissingExtra(f"{delegate.missing} ({exc})") from None


# -- commands ----------------------------------------------------------------------------------


def _micro_batches(args: argparse.Namespace) -> list[list[int]]:
    if args.lengths is not None:
        if args.context is not None:
            raise InvalidRequest("context", "--context only applies to --workload")
        from flashcp_planner.lengths_io import read_lengths

        return read_lengths(args.lengths)
    if args.context is None:
        raise InvalidRequest("context", "--workload needs --context TOKENS")
    from flashcp_planner.workloads import generate

    return generate(args.workload, context=args.context, seed=args.seed, num_micro_batches=args.micro_batches)


def _request(args: argparse.Namespace, *, strategy: str, comm: str | None) -> PlanRequest:
    from flashcp_planner.presets import load_cost_model

    return PlanRequest(
        micro_batches=_micro_batches(args),
        cp_size=args.cp,
        cost_model=load_cost_model(args.cost),
        strategy=strategy,
        capacity_slack=args.slack,
        capacity=args.capacity,
        options=PlanOptions(comm=comm, time_limit_s=args.time_limit),
    )


def _progress(total: int, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="plan", file=sys.stderr, delay=1.0, leave=False,
                disable=not sys.stderr.isatty())


def _run_plan(args: argparse.Namespace) -> int:
    from flashcp_planner.planner import plan_context
    from flashcp_planner.report import plan_table

    request = _request(args, strategy=args.strategy, comm=args.comm)
    contexts = request.contexts()
    with _progress(len(contexts), "planning") as bar:
        plans = []
        for ctx in contexts:
            plans.append(plan_context(ctx, request.strategy))
            bar.update(1)
    if args.format == "json":
        print(json.dumps({"plans": [p.to_dict() for p in plans]}))
    else:
        print("\n\n".join(plan_table(p, index=i) for i, p in enumerate(plans)))
    return 0


def _run_compare(args: argparse.Namespace) -> int:
    from flashcp_planner.report import (
        REFERENCE_STRATEGIES,
        comparison_json,
        comparison_tables,
        plot_comparison,
        run_comparison,
    )
    from flashcp_planner.strategies import STRATEGIES

    request = _request(args, strategy="flashcp", comm=None)
    if args.strategies is not None:
        names = [s.strip() for s in args.strategies.split(",") if s.strip()]
        if not names:
            raise InvalidRequest("strategies", "no strategy named")
        if len(set(names)) != len(names):
            raise InvalidRequest("strategies", f"a strategy is named twice in {args.strategies!r}")
    else:
        names = list(STRATEGIES)
    if args.plot is not None and not 0 <= args.plot_micro_batch < len(request.micro_batches):
        raise InvalidRequest("plot_micro_batch", f"must be in [0, {len(request.micro_batches) - 1}], "
                                                 f"got {args.plot_micro_batch}")
    request.contexts()  # report capacity infeasibility before any planning
    total = len(request.micro_batches) * len(set(names) | (set(REFERENCE_STRATEGIES) & set(STRATEGIES)))
    with _progress(total, "comparing") as bar:
        comparisons, notes = run_comparison(request, names, explicit=args.strategies is not None, progress=bar)
    if args.plot is not None:
        plot_comparison(comparisons[args.plot_micro_batch], args.plot, cp_size=args.cp,
                        cost_model=request.cost_model.name)
    if args.format == "json":
        header = {"cp_size": args.cp, "cost_model": request.cost_model.name}
        if args.workload is not None:
            header["workload"] = {"name": args.workload, "context": args.context, "seed": args.seed,
                                  "micro_batches": args.micro_batches}
        print(json.dumps(comparison_json(comparisons, names, notes, header)))
    else:
        print(comparison_tables(comparisons, names, cp_size=args.cp, cost_model=request.cost_model.name,
                                notes=notes))
        if args.plot is not None:
            print(f"plot of micro-batch {args.plot_micro_batch} written to {args.plot}")
    return 0


def _run_strategies(args: argparse.Namespace) -> int:
    from flashcp_planner.report import format_table
    from flashcp_planner.strategies import STRATEGIES

    items = [{"name": s.name, "description": s.description, "is_optimal": s.is_optimal,
              "default_comm": s.default_comm.value} for s in STRATEGIES.values()]
    if args.format == "json":
        print(json.dumps({"strategies": items}))
    else:
        print(format_table(["name", "optimal", "default_comm", "description"],
                           [[i["name"], "yes" if i["is_optimal"] else "no", i["default_comm"], i["description"]]
                            for i in items]))
    return 0


def _run_presets(args: argparse.Namespace) -> int:
    from flashcp_planner.presets import PRESETS, cost_model_to_dict
    from flashcp_planner.report import format_table

    if args.format == "json":
        print(json.dumps({"presets": {name: cost_model_to_dict(cm) for name, cm in PRESETS.items()}}))
        return 0
    rows = [[name, f"{cm.hidden_size}/{cm.num_heads}/{cm.num_kv_heads}x{cm.head_dim}", f"{cm.gemm_tflops:g}",
             f"{cm.attention_tflops:g}", f"{cm.intra_node_gbps:g}", f"{cm.inter_node_gbps:g}", str(cm.gpus_per_node)]
            for name, cm in PRESETS.items()]
    print(format_table(["name", "hidden/heads/kv_heads x head_dim", "gemm_TFLOPs", "attn_TFLOPs", "intra_GBps",
                        "inter_GBps", "gpus_per_node"], rows))
    return 0


def _run_workloads(args: argparse.Namespace) -> int:
    from flashcp_planner.report import format_table
    from flashcp_planner.workloads import WORKLOADS

    if args.format == "json":
        print(json.dumps({"workloads": {w.name: w.description for w in WORKLOADS.values()}}))
    else:
        print(format_table(["name", "description"], [[w.name, w.description] for w in WORKLOADS.values()]))
    return 0


# -- entry point ------------------------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``flashcp`` command line; returns the exit status.

    Args:
        argv: arguments without the program name (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        return int(args.run(args) or 0)
    except _UsageError as exc:
        print(_one_line(f"{exc} (see flashcp --help)"), file=sys.stderr)
    except _MissingExtra as exc:
        print(_one_line(str(exc)), file=sys.stderr)
    except Infeasible as exc:
        print(_one_line(f"flashcp: infeasible: {exc}"), file=sys.stderr)
    except PlanningError as exc:
        print(_one_line(f"flashcp: error: {exc}"), file=sys.stderr)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else EXIT_USAGE)
    except KeyboardInterrupt:
        print("flashcp: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        sys.stderr.close()  # output piped into e.g. `head`; nothing left to report
        return 0
    return EXIT_USAGE
