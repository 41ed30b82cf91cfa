"""The ``fedbench`` command line: run, list, show (and the subcommands other modules add)."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from fedbench.core.formatting import format_bytes, format_percent
from fedbench.core.registry import BACKBONES, METHODS, METRICS, TASKS, include
from fedbench.errors import FedbenchError, ResultsError, SpecError


def _sample(text: str) -> float | int:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction like 0.5 or a client count like 5") from None


# Terminal summaries: one decimal for bytes, "-" for what a record does not have.
_fmt_bytes = functools.partial(format_bytes, digits=1, missing="-")
_pct = functools.partial(format_percent, missing="-")


def summary_rows(record: dict[str, Any]) -> list[tuple[str, str]]:
    final = record["metrics"]["final"]
    last, best = final["last"], final.get("best_val") or {}
    n_rounds = max(final.get("rounds_run") or 0, 1)
    up, down = record["comm"]["up_bytes"], record["comm"]["down_bytes"]
    rows = [
        ("method / task", f"{record['spec']['method']} / {record['spec']['task']}"),
        ("backbone", record["spec"]["backbone"]),
        ("seed, rounds", f"{record['spec']['seed']}, {record['spec']['rounds']}"),
        ("global acc % (last round)", _pct(last.get("global_acc"))),
        ("global acc % (best-val round "
         f"{final.get('best_val_round')})", _pct(best.get("global_acc"))),
    ]
    if "heldout_acc" in last:
        for dom, acc in last["heldout_acc"].items():
            rows.append((f"held-out {dom} acc % (last / best-val)",
                         f"{_pct(acc)} / {_pct((best.get('heldout_acc') or {}).get(dom))}"))
    rows += [
        ("client acc % mean / weighted / worst",
         f"{_pct(last.get('client_acc_mean'))} / {_pct(last.get('client_acc_weighted'))} / "
         f"{_pct(last.get('client_acc_worst'))}"),
        ("bytes per round up / down", f"{_fmt_bytes(up / n_rounds)} / {_fmt_bytes(down / n_rounds)}"),
        ("bytes total up / down", f"{_fmt_bytes(up)} / {_fmt_bytes(down)}"),
        ("trainable params", f"{final.get('trainable_params'):,}"),
        ("wall time s (total, mean per round)",
         f"{record['timing']['total_seconds']:.1f}, "
         f"{sum(record['timing']['round_seconds']) / max(len(record['timing']['round_seconds']), 1):.2f}"),
        ("fidelity", record.get("fidelity", "")),
        ("spec hash", record["spec_hash"]),
    ]
    if record.get("path"):
        rows.append(("record", record["path"]))
    return rows


def print_summary(record: dict[str, Any]) -> None:
    from tabulate import tabulate

    print(tabulate(summary_rows(record), tablefmt="simple"))


class _Progress:
    """A tqdm bar over rounds with the current metrics; silent when stderr is not a terminal."""

    def __init__(self, total: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="round", disable=not sys.stderr.isatty(), leave=False)

    def __call__(self, record: dict[str, Any]) -> None:
        shown = {k: record[k] for k in ("global_acc", "val_acc", "client_acc_mean", "train_loss")
                 if record.get(k) is not None}
        self.bar.set_postfix({k: f"{v:.4f}" for k, v in shown.items()})
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _set_threads(threads: int | None) -> None:
    if threads is None:
        return
    if threads < 1:
        raise SpecError(f"--threads {threads}: must be >= 1")
    import torch

    torch.set_num_threads(threads)


def cmd_run(args: argparse.Namespace) -> int:
    from fedbench.harness.protocols import (
        expand_heldout_all,
        format_heldout_table,
        requests_heldout_all,
        summarize_heldout,
    )
    from fedbench.harness.run import resolve_spec

    _set_threads(args.threads)
    if requests_heldout_all(args.set or []):  # leave-one-domain-out over every domain in turn
        specs = expand_heldout_all(
            args.method, args.task, backbone=args.backbone, seed=args.seed, rounds=args.rounds,
            clients=args.clients, sample=args.sample, sets=args.set, eval_every=args.eval_every,
        )
        records = []
        for spec in specs:
            records.append(_execute(spec, args))
        rows = summarize_heldout(records, TASKS.get(args.task).obj.card, specs[0].backbone)
        print(format_heldout_table(rows, specs[0].backbone))
        if args.json:
            print(json.dumps(records, indent=1, sort_keys=True))
        for record in records:
            check_diverged(record)
        return 0
    spec = resolve_spec(
        args.method, args.task, backbone=args.backbone, seed=args.seed, rounds=args.rounds,
        clients=args.clients, sample=args.sample, sets=args.set or [], eval_every=args.eval_every,
    )
    record = _execute(spec, args)
    if args.json:
        print(json.dumps(record, indent=1, sort_keys=True))
    else:
        print_summary(record)
    check_diverged(record)
    return 0


def _execute(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One run with a progress bar; on Ctrl-C, says how to resume it before the interrupt goes on."""
    from fedbench.harness.run import execute

    progress = _Progress(spec.rounds)
    try:
        return execute(spec, args.results_dir, cache_dir=args.cache_dir, on_round=progress, device=args.device,
                       checkpoint_every=args.checkpoint_every, resume=args.resume)
    except KeyboardInterrupt:
        progress.close()  # first, so the bar does not overwrite the hint
        _say_how_to_resume(spec, args)
        raise
    finally:
        progress.close()


def _say_how_to_resume(spec: Any, args: argparse.Namespace) -> None:
    from fedbench.harness.run import checkpoint_path

    if args.results_dir is not None and checkpoint_path(args.results_dir, spec).is_file():
        print("fedbench: a checkpoint of this run is saved; the same command with --resume continues it",
              file=sys.stderr)


def check_diverged(record: dict[str, Any]) -> None:
    """A diverged run is an error of the run's options, stated once its record is written."""
    from fedbench.errors import DivergedError

    diverged = record.get("diverged")
    if diverged:
        raise DivergedError(f"the run diverged at round {diverged['round']} ({diverged['reason']}) and stopped; "
                            f"its record {record.get('path', '')} is marked diverged and kept off the leaderboard's "
                            f"ranks. Try a smaller learning rate (--set lr=...)")


def cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    registry = {"methods": METHODS, "tasks": TASKS, "backbones": BACKBONES, "metrics": METRICS}[args.what]
    rows = [(e.name, e.description, e.fidelity, e.source + (f" (replaces {e.replaced})" if e.replaced else ""))
            for e in registry.entries()]
    print(tabulate(rows, headers=["name", "description", "fidelity", "source"], tablefmt="simple"))
    return 0


def show_rows(record: dict[str, Any], path: str) -> list[tuple[str, str]]:
    """The summary table of a loaded record, or a ResultsError naming what the record lacks."""
    try:
        rows = summary_rows(record)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        from fedbench.board.validate import check_record

        # The validator names the missing or mistyped field; the exception only its last key.
        problems = check_record(record) or [f"{type(exc).__name__}: {exc}"]
        raise ResultsError(f"{path} is not a whole fedbench record ({problems[0]}); `fedbench validate {path}` "
                           f"lists what is wrong") from None
    diverged = record.get("diverged")
    if isinstance(diverged, dict):
        rows.insert(3, ("diverged", f"round {diverged.get('round')}: {diverged.get('reason')}"))
    return rows


def cmd_show(args: argparse.Namespace) -> int:
    from fedbench.core.results import load_record

    record = load_record(args.record)
    record["path"] = args.record
    if args.json:
        print(json.dumps(record, indent=1, sort_keys=True))
    else:
        from tabulate import tabulate

        print(tabulate(show_rows(record, args.record), tablefmt="simple"))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from fedbench.models.pretrained import prepare

    folder = prepare(args.name, args.out, seed=args.seed, quick=args.quick, progress=sys.stderr.isatty())
    print(f"fedbench prepare: wrote {folder}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's own default must not erase an --include given before it.
    common.add_argument("--include", action="append", default=argparse.SUPPRESS, metavar="PATH",
                        help="load a local plugin file that registers methods/tasks/backbones (repeatable)")
    common.add_argument("--override", action="store_true", default=argparse.SUPPRESS,
                        help="let --include plugins replace built-in names (otherwise a clash is an error)")
    parser = argparse.ArgumentParser(prog="fedbench", parents=[common],
                                     description="Federated learning with vision-language models: benchmark harness")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", parents=[common], help="run one method on one task and record it")
    run.add_argument("method")
    run.add_argument("task")
    run.add_argument("--backbone", default=None, help="e.g. offline-pair, tiny-clip, openclip:ViT-B-32/openai")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--rounds", type=int, default=None, help="default: the protocol's")
    run.add_argument("--clients", type=int, default=None, help="number of clients (tasks that allow it)")
    run.add_argument("--sample", type=_sample, default=1.0,
                     help="clients per round: a fraction (0.5) or a count (5); default all")
    run.add_argument("--eval-every", type=int, default=1)
    run.add_argument("--set", action="append", metavar="KEY=VALUE",
                     help="any method or task option (method.KEY / task.KEY when both have it)")
    run.add_argument("--results-dir", default="results")
    run.add_argument("--cache-dir", default=None, help="feature cache (default $FEDBENCH_CACHE or ~/.cache/fedbench)")
    run.add_argument("--threads", type=int, default=None,
                     help="torch intra-op threads (default: torch's choice). On a busy machine 1 thread avoids "
                          "OpenMP spin-waits that can slow small models tenfold; recorded in provenance")
    run.add_argument("--device", default="cpu",
                     help="cpu (default), cuda or cuda:N; recorded in provenance, not in the spec (the protocol "
                          "is the same; the last digits of a metric may differ between devices)")
    run.add_argument("--json", action="store_true", help="print the result record as JSON")
    run.add_argument("--resume", action="store_true",
                     help="continue from the checkpoint a killed or interrupted run of this spec left")
    run.add_argument("--checkpoint-every", type=int, default=None, metavar="K",
                     help="checkpoint every K rounds (0: never; default: every few minutes)")
    run.set_defaults(func=cmd_run)

    lst = sub.add_parser("list", parents=[common], help="list registered methods, tasks, backbones or metrics")
    lst.add_argument("what", choices=["methods", "tasks", "backbones", "metrics"])
    lst.set_defaults(func=cmd_list)

    show = sub.add_parser("show", parents=[common], help="print a result record")
    show.add_argument("record")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_show)

    prep = sub.add_parser("prepare", parents=[common],
                          help="pretrain one of fedbench's offline models (digits-clip, digits-t2i)")
    prep.add_argument("name")
    prep.add_argument("--out", default=None, help="folder to write (default: $FEDBENCH_CACHE/pretrained/NAME)")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--quick", action="store_true", help="a few steps only (smoke test; weights learn little)")
    prep.set_defaults(func=cmd_prepare)

    for module in ("fedbench.cli.cache", "fedbench.cli.board"):
        try:
            mod = __import__(module, fromlist=["add_parsers"])
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.add_parsers(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        # Inside the try: building the parser imports torch (seconds), and Ctrl-C then is no error.
        parser = build_parser()
        args = parser.parse_args(argv)
        for path in getattr(args, "include", []):
            include(path, override=getattr(args, "override", False))
        return int(args.func(args) or 0)
    except FedbenchError as exc:
        print(f"fedbench: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("fedbench: interrupted; no record was written for the unfinished run", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`fedbench list methods | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
