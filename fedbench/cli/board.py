"""CLI subcommands for sweeps, the leaderboard, regression checks, validation and comparison.

``fedbench.cli.main`` calls :func:`add_parsers` when this module is present. Each command returns
an exit code; user errors are raised as :class:`fedbench.errors.FedbenchError` (exit 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedbench.errors import FedbenchError, ResultsError

_NO_RERUN = object()  # --rerun not given (None means --rerun all)


def _sample(text: str) -> float | int:
    try:
        return float(text) if "." in text else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a fraction like 0.5 or a client count like 5") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedbench.harness.sweep import sweep

    report = sweep(
        args.methods, args.tasks, args.seeds, args.set or [], args.rounds, args.backbone, args.results_dir,
        executor=args.executor, address=args.address, sample=args.sample, eval_every=args.eval_every,
        cache_dir=args.cache_dir, keep_going=args.keep_going, num_cpus=args.num_cpus,
        cpus_per_run=args.cpus_per_run, includes=getattr(args, "include", None) or [],
        override=getattr(args, "override", False), dry_run=args.dry_run,
    )
    return 1 if report.failed else 0


def _check_out_dir(out: str) -> None:
    """Fail before building anything when ``--out`` cannot hold the leaderboard's files."""
    import tempfile

    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ResultsError(f"--out {out} is a file; the leaderboard is a folder (README.md, leaderboard.csv, "
                           f"index.html): pass --out DIR with a folder's path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError as exc:
        raise ResultsError(f"--out {out}: cannot write the leaderboard there ({exc.strerror or exc}); pass --out "
                           f"DIR with a folder you can write to") from None
    images = folder / "generated"  # where the records' image grids are copied
    if images.exists() and not images.is_dir():
        raise ResultsError(f"--out {out}: {images} is a file, but the leaderboard copies image grids into a "
                           f"folder of that name; remove it or pass another --out DIR")


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from fedbench.board.leaderboard import write_leaderboard

    if Path(args.results_dir).is_dir():  # else write_leaderboard says what --results-dir should be
        _check_out_dir(args.out)
    try:
        board, written = write_leaderboard(args.results_dir, args.out, include_ci=args.include_ci)
    except OSError as exc:  # the disk filled, an image grid vanished mid-way: each written file is whole
        raise ResultsError(f"the leaderboard in {args.out} is not complete: {exc.filename}: {exc.strerror or exc}; "
                           f"fix that and run it again (or pass --out DIR)") from None
    rows = sum(len(t.rows) for t in board.tables)
    print(f"{board.n_records} records -> {len(board.tables)} tables, {rows} rows: "
          + ", ".join(str(p) for p in written))
    for v in board.invalid:
        what = "diverged" if v.status == "DIVERGED" else "invalid"
        print(f"left out {what} record {v.path}: {'; '.join(v.reasons)}")
    return 1 if any(v.status == "FAIL" for v in board.invalid) and args.strict else 0


def cmd_check(args: argparse.Namespace) -> int:
    from fedbench.board.check import Tolerance, check

    if args.tol < 0 or args.loss_tol < 0:
        raise FedbenchError("--tol and --loss-tol must be >= 0")
    return check(args.suite, args.results_dir, Tolerance(acc=args.tol, loss=args.loss_tol), update=args.update,
                 cache_dir=args.cache_dir, verbose=args.verbose)


def _rerun_count(text: str) -> int | None:
    """``--rerun N`` (N >= 1) or ``--rerun all`` (None)."""
    if text == "all":
        return None
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a number of records >= 1, or all")
    return n


def cmd_validate(args: argparse.Namespace) -> int:
    from fedbench.board.rerun import choose_sample, print_reruns
    from fedbench.board.validate import print_validations, validate_paths

    if args.rerun is _NO_RERUN and args.seed is not None:
        raise FedbenchError(f"--seed {args.seed} picks the records --rerun N re-runs; give --rerun N too")
    verdicts = validate_paths(args.records)
    if not verdicts:  # a mistyped or empty folder must not read as a clean pass
        raise ResultsError(f"no record found in {' '.join(args.records)} (no .json files; hidden ones are skipped): "
                           f"give record files or the folder `fedbench run` wrote, e.g. `fedbench validate results/`")
    code = print_validations(verdicts)
    if args.rerun is _NO_RERUN:
        return code
    seed = args.seed or 0
    sample = choose_sample(verdicts, args.rerun, seed)
    passed = sum(not v.problems for v in verdicts)
    return max(code, print_reruns(sample, passed, seed, cache_dir=args.cache_dir))


def cmd_compare(args: argparse.Namespace) -> int:
    from fedbench.board.compare import compare_methods, compare_paths

    a, b = args.items
    if args.task:
        print(compare_methods(args.results_dir, args.task, a, b, table_id=args.table))
    else:
        if args.table:
            raise FedbenchError("--table picks a task protocol for --task T METHOD_A METHOD_B")
        print(compare_paths(a, b))
    return 0


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("sweep", parents=[common], help="run methods x tasks x seeds, skipping recorded runs")
    p.add_argument("methods", nargs="+", metavar="METHOD")
    p.add_argument("--tasks", nargs="+", required=True, metavar="TASK")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="SEED", help="default: 0 1 2")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="option for every run; METHOD.KEY=V or TASK.KEY=V for one method or task")
    p.add_argument("--rounds", type=int, default=None, help="default: each protocol's")
    p.add_argument("--backbone", default=None)
    p.add_argument("--sample", type=_sample, default=1.0, help="clients per round: a fraction or a count")
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--results-dir", default="results")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--address", default=None, help="Ray cluster address to join (default: start a local one)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray cluster (default: all)")
    p.add_argument("--cpus-per-run", type=int, default=1, help="CPUs (and torch threads) per Ray task")
    p.add_argument("--keep-going", action="store_true", help="record a failed run and go on")
    p.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("leaderboard", parents=[common], help="build leaderboard/ (Markdown, CSV, HTML) from results/")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--out", default="leaderboard")
    p.add_argument("--include-ci", action="store_true", help="also read the regression suite's references")
    p.add_argument("--strict", action="store_true", help="exit 1 when an invalid record was left out")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("check", parents=[common], help="re-run the CI suite and compare with stored references")
    p.add_argument("--suite", default="ci")
    p.add_argument("--update", action="store_true", help="rewrite the references and print what changed")
    p.add_argument("--results-dir", default="results", help="references live in RESULTS_DIR/ci/")
    p.add_argument("--tol", type=float, default=0.02, help="absolute tolerance for accuracies (default 0.02)")
    p.add_argument("--loss-tol", type=float, default=0.05, help="relative tolerance for losses (default 0.05)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--verbose", action="store_true", help="also list changes within tolerance")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("validate", parents=[common], help="check result records (files or folders) against the schema")
    p.add_argument("records", nargs="+", metavar="RECORD")
    p.add_argument("--rerun", type=_rerun_count, default=_NO_RERUN, metavar="N|all",
                   help="also re-run N records that pass (or all) and compare their metrics exactly: the only check "
                        "a consistent hand edit cannot pass")
    p.add_argument("--seed", type=int, default=None, help="with --rerun N: which N records (default 0)")
    p.add_argument("--cache-dir", default=None, help="with --rerun: the feature cache")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("compare", parents=[common], help="two records, or two methods on a task, side by side")
    p.add_argument("items", nargs=2, metavar="A_OR_METHOD")
    p.add_argument("--task", default=None, help="compare the leaderboard rows of two methods on this task")
    p.add_argument("--table", default=None, help="with --task: the task protocol (table id) to use")
    p.add_argument("--results-dir", default="results")
    p.set_defaults(func=cmd_compare)
