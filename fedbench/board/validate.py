"""Check result records before anyone trusts them: ``fedbench validate RECORD...``.

A record is read as plain JSON (``NaN`` and ``Infinity`` refused; a folder, FIFO, device,
unreadable, non-UTF-8 or oversized file is a clear problem, never a hang or a traceback);
nothing in it is executed and nothing is unpickled. A record passes when:

- it has the schema's keys and types and no others (schema version 1: the keys
  ``fedbench.harness.run.execute`` writes; an unknown top-level key fails), spec version 1, or 2
  with the method's code identity: ``method_class`` a non-empty import path, ``method_version``
  an integer >= 1;
- its ``spec_hash`` is the hash of its ``spec`` (a spec edited after the run fails);
- it lies where its spec says, ``<task>/<method>/<spec_hash>.json`` (a moved file fails), and
  the image grids it lists are plain file names beside it (``<spec_hash>.<name>.png``);
- every accuracy is in [0, 1], every byte and message count a non-negative integer, every
  number finite; every round that trains has a finite ``train_loss`` (and ``global_loss``
  where it was evaluated);
- its rounds are the spec's rounds, 1 to ``spec.rounds`` (``rounds_run`` says how many);
  per-round bytes sum to the run's totals, the per-round rows of ``comm`` and ``metrics``
  agree, and ``metrics.final`` repeats exactly what its rounds say (a final block edited
  by hand fails).

A run whose loss stopped being finite is stopped by the engine and marked
``"diverged": {"round": R, "reason": ...}``. Such a record is reported DIVERGED (neither OK nor
FAIL) when it is consistent: its rounds are 1 to R, R <= ``spec.rounds``, and only round R has
a null loss. A record with a null or non-finite loss that is *not* marked diverged fails (a
diverged run written before runs were marked).

What this can promise: structure, internal consistency and code identity (the spec names the
method class and version that ran). It cannot promise authenticity: a hand edit that changes a
metric everywhere it appears (the round row and the final block) is consistent, and passes. A
digest of the metrics stored in the record would not help, since whoever edits the metrics can
recompute an unsigned digest. The check that does is to run the record's spec again and compare
(``fedbench validate --rerun N|all [--seed S]``, :mod:`fedbench.board.rerun`).

:func:`check_record` is what the leaderboard calls on every record it reads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedbench.core.results import REQUIRED_KEYS, SCHEMA_VERSION, read_json_strict
from fedbench.core.spec import RunSpec
from fedbench.errors import ResultsError, SpecError

SPEC_TYPES: dict[str, tuple[type, ...]] = {
    "method": (str,), "task": (str,), "backbone": (str,), "seed": (int,), "rounds": (int,),
    "sample": (int, float), "method_options": (dict,), "task_options": (dict,), "eval_every": (int,),
    "spec_version": (int,), "method_class": (str,), "method_version": (int,),
}
# Spec versions this fedbench reads: 1 (no code identity; loads as method_version 0) and 2.
SPEC_VERSIONS = (1, 2)
CODE_IDENTITY = ("method_class", "method_version")
COMM_COUNTS = ("up_bytes", "down_bytes", "up_messages", "down_messages")
# The top-level keys fedbench.harness.run.execute writes (besides REQUIRED_KEYS), with their types.
# "path" is what `fedbench run --json` adds to the record it prints; "images" lists the grids a
# generator wrote beside the record; "diverged" marks a run the engine stopped at a non-finite loss.
OPTIONAL_KEY_TYPES: dict[str, type] = {
    "fidelity": str, "method_source": str, "task_source": str, "partition": dict, "timing": dict,
    "images": dict, "path": str, "diverged": dict,
}
ALLOWED_KEYS = frozenset(REQUIRED_KEYS) | frozenset(OPTIONAL_KEY_TYPES)
LOSS_KEYS = ("train_loss", "global_loss")
DIVERGED_KEYS = frozenset({"round", "reason"})


@dataclass
class Validation:
    """The verdict on one record file: ``status`` OK (no problems), DIVERGED (no problems, a
    consistently marked diverged run) or FAIL (problems)."""

    path: Path
    problems: list[str] = field(default_factory=list)
    record: dict[str, Any] | None = None

    @property
    def diverged(self) -> dict[str, Any] | None:
        """The record's ``diverged`` block when the record is a consistent diverged run."""
        if self.problems or self.record is None:
            return None
        return self.record.get("diverged")

    @property
    def ok(self) -> bool:
        """No problems: a valid record, of a finished run or a consistently marked diverged one
        (``status`` tells them apart)."""
        return not self.problems

    @property
    def status(self) -> str:
        return "FAIL" if self.problems else "DIVERGED" if self.diverged is not None else "OK"

    @property
    def reasons(self) -> list[str]:
        """Why a record is not OK, for a reader who leaves it out: its problems, or its divergence."""
        if self.problems:
            return list(self.problems)
        d = self.diverged
        return [f"diverged at round {d['round']}: {d['reason']}"] if d is not None else []


def load_json_strict(path: str | Path) -> Any:
    """Parse a file as strict JSON: no NaN/Infinity, never code, never pickle (ResultsError otherwise)."""
    return read_json_strict(path)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_accuracy_key(key: str) -> bool:
    return "acc" in key.split("_")


def _walk(value: Any, where: str) -> Iterator[tuple[str, str, Any]]:
    """Yield (location, nearest dict key, leaf value) for every leaf."""
    stack: list[tuple[str, str, Any]] = [(where, where.rsplit(".", 1)[-1], value)]
    while stack:
        loc, key, v = stack.pop()
        if isinstance(v, dict):
            # Inside an accuracy block (heldout_acc: {domain: acc}) every leaf is an accuracy.
            stack.extend((f"{loc}.{k}", key if _is_accuracy_key(key) else str(k), x) for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((f"{loc}[{i}]", key, x) for i, x in enumerate(v))
        else:
            yield loc, key, v


def _leaf_problems(block: Any, where: str) -> list[str]:
    """Range rules by key name: accuracies in [0,1], bytes/messages counts, all numbers finite."""
    problems = []
    for loc, key, v in _walk(block, where):
        if isinstance(v, float) and not math.isfinite(v):
            problems.append(f"{loc} is {v}, not a finite number")
        elif _is_accuracy_key(key) and v is not None and not (_is_number(v) and 0 <= v <= 1):
            problems.append(f"{loc} = {v!r}: an accuracy must be a fraction in [0, 1]")
        elif ("bytes" in key or "messages" in key) and not _is_count(v):
            problems.append(f"{loc} = {v!r}: must be a non-negative integer")
    return problems


def _code_identity_problems(spec_d: Mapping[str, Any]) -> list[str]:
    """A version-2 spec names the method code that ran; a version-1 spec predates that and must not."""
    version = spec_d.get("spec_version")
    if version not in SPEC_VERSIONS:
        return [f"spec.spec_version = {version!r}: this fedbench reads spec versions "
                f"{', '.join(map(str, SPEC_VERSIONS))}"]
    if version == 1:
        present = [k for k in CODE_IDENTITY if k in spec_d]
        # A version-1 hash leaves these out, so a value added later would pass unchecked.
        return [f"spec.{k} in a version-1 spec: version 1 records no method code identity" for k in present]
    problems = []
    if not spec_d.get("method_class"):
        problems.append("spec.method_class is missing or empty: a version-2 spec names the method's class")
    method_version = spec_d.get("method_version")
    if not isinstance(method_version, int) or method_version < 1:
        problems.append(f"spec.method_version = {method_version!r}: a version-2 spec needs the method's version, "
                        f"an integer >= 1")
    return problems


def _spec_problems(record: Mapping[str, Any]) -> tuple[RunSpec | None, list[str]]:
    spec_d = record.get("spec")
    if not isinstance(spec_d, dict):
        return None, ["spec is not an object"]
    problems = [f"spec.{k} = {spec_d[k]!r}: expected {' or '.join(t.__name__ for t in types)}"
                for k, types in SPEC_TYPES.items()
                if k in spec_d and (not isinstance(spec_d[k], types) or isinstance(spec_d[k], bool))]
    if not problems:  # the identity rules read the types checked above
        problems = _code_identity_problems(spec_d)
    if problems:
        return None, problems
    try:
        spec = RunSpec.from_dict(spec_d)
    except (SpecError, TypeError) as exc:
        return None, [f"spec does not load: {exc}"]
    if spec.rounds < 1 or spec.eval_every < 1:
        problems.append("spec.rounds and spec.eval_every must be >= 1")
    if not isinstance(record.get("spec_hash"), str):
        problems.append("spec_hash is missing or not a string")
    elif record["spec_hash"] != spec.spec_hash:
        problems.append(f"spec_hash {record['spec_hash']} is not the hash of the spec ({spec.spec_hash}): "
                        f"the spec was edited after the run; re-run it instead")
    return spec, problems


def _path_problems(spec: RunSpec, path: Path) -> list[str]:
    expected = Path(spec.task) / spec.method / f"{spec.spec_hash}.json"
    got = Path(*path.parts[-3:]) if len(path.parts) >= 3 else path
    if got != expected:
        return [f"record lies at .../{got.as_posix()} but its spec says .../{expected.as_posix()}"]
    return []


def _top_level_problems(record: Mapping[str, Any]) -> list[str]:
    unknown = sorted(str(k) for k in record if k not in ALLOWED_KEYS)
    problems = []
    if unknown:
        problems.append(f"unknown top-level keys {unknown}: a fedbench record has only "
                        f"{', '.join(sorted(ALLOWED_KEYS))}; remove them (or re-run the spec)")
    for key, kind in OPTIONAL_KEY_TYPES.items():
        if key in record and not isinstance(record[key], kind):
            problems.append(f"{key} = {record[key]!r:.60}: expected {'an object' if kind is dict else 'a string'}")
    return problems


def _images_problems(images: Mapping[str, Any], spec_hash: Any) -> list[str]:
    """Image grids are plain file names beside the record, as the engine writes them: anything
    else (a path with folders, ``..``) would let a record make the leaderboard copy any file."""
    problems = []
    for name, file in images.items():
        expected = f"{spec_hash}.{name}.png"
        if not (isinstance(file, str) and str(name).replace("_", "").replace("-", "").isalnum()
                and file == expected):
            problems.append(f"images.{name} = {file!r:.80}: an image grid is the file {expected!r} beside the "
                            f"record (names of letters, digits, _ and -)")
    return problems


def _diverged_problems(diverged: Mapping[str, Any], spec: RunSpec | None) -> tuple[int | None, list[str]]:
    """The round a well-formed ``diverged`` block names, and what is wrong with the block."""
    problems = []
    if set(diverged) != DIVERGED_KEYS:
        problems.append(f"diverged has keys {sorted(map(str, diverged))}: expected exactly "
                        f"{sorted(DIVERGED_KEYS)}")
    r = diverged.get("round")
    if not (_is_count(r) and r >= 1):
        problems.append(f"diverged.round = {r!r}: must be the round (an integer >= 1) whose loss was not finite")
        r = None
    elif spec is not None and r > spec.rounds:
        problems.append(f"diverged.round = {r} but the spec asked for {spec.rounds} rounds")
    if not (isinstance(diverged.get("reason"), str) and diverged["reason"].strip()):
        problems.append("diverged.reason is missing or empty: it says what stopped the run")
    return r, problems


def _loss_problems(trained: list[dict[str, Any]], diverged_round: int | None) -> list[str]:
    """Every round that trains has a finite train_loss (and global_loss where evaluated); only a
    record marked diverged may have a null loss, and only in its last round."""
    problems = []
    for row in trained:
        if "train_loss" not in row:
            problems.append(f"round {row['round']}: no train_loss (every round that trains reports one)")
        for key in LOSS_KEYS:
            v = row.get(key)
            if key not in row or (_is_number(v) and math.isfinite(v)):
                continue
            if diverged_round is not None and row["round"] == diverged_round:
                continue
            if diverged_round is not None:
                problems.append(f"round {row['round']}: {key} = {v!r} before diverged.round {diverged_round}: "
                                f"a diverged run stops at its first non-finite loss")
            else:
                problems.append(f"round {row['round']}: {key} = {v!r}, not a finite number: the run diverged, "
                                f"but the record is not marked diverged (written before fedbench marked "
                                f"diverged runs); re-run its spec with this fedbench")
    return problems


def _rounds_problems(metrics: Mapping[str, Any], comm: Mapping[str, Any], spec: RunSpec | None,
                     diverged_round: int | None = None) -> list[str]:
    rounds, final = metrics.get("rounds"), metrics.get("final")
    if not isinstance(rounds, list) or not all(isinstance(r, dict) for r in rounds):
        return ["metrics.rounds is not a list of objects"]
    if not isinstance(final, dict):
        return ["metrics.final is not an object"]
    if not rounds:
        return ["metrics.rounds is empty: a record holds at least one evaluated round"]
    problems: list[str] = []
    numbers = [r.get("round") for r in rounds]
    if not all(_is_count(n) for n in numbers) or numbers != sorted(set(numbers)):
        problems.append(f"metrics.rounds: round numbers {numbers} are not increasing non-negative integers")
        return problems
    by_round = {r["round"]: r for r in rounds}
    trained = [r for r in rounds if r["round"] >= 1]
    if spec is not None and len(trained) > spec.rounds:
        problems.append(f"metrics.rounds has {len(trained)} rounds but the spec asked for {spec.rounds}")
    elif trained:
        # A run that trains records every round 1..rounds; a diverged one stops at its round.
        last = diverged_round if diverged_round is not None else spec.rounds if spec is not None else None
        numbered = [r["round"] for r in trained]
        # Compared without building range(last): a spec's rounds may be any integer.
        if last is not None and (len(numbered) != last or numbered != list(range(1, len(numbered) + 1))):
            what = f"diverged.round {last}" if diverged_round is not None else f"the spec's {last} rounds"
            problems.append(f"metrics.rounds has rounds {numbered}, not 1..{last} "
                            f"({what}): a record cut short or edited; re-run its spec")
    elif diverged_round is not None:
        problems.append("diverged names a round, but metrics.rounds has no round that trains")
    problems += _loss_problems(trained, diverged_round)
    expected_run = len(rounds) if trained else 0  # what the engine writes
    if _is_count(final.get("rounds_run")) and final["rounds_run"] != expected_run:
        problems.append(f"metrics.final.rounds_run = {final['rounds_run']} but metrics.rounds says {expected_run}")

    per_round = comm.get("per_round")
    if not isinstance(per_round, list) or not all(isinstance(p, dict) for p in per_round):
        problems.append("comm.per_round is not a list of objects")
    else:
        for key in ("up_bytes", "down_bytes"):
            values = [p.get(key) for p in per_round]
            if all(_is_count(v) for v in values) and _is_count(comm.get(key)) and sum(values) != comm[key]:
                problems.append(f"comm.per_round {key} sum to {sum(values)}, not comm.{key} = {comm[key]}")
        if len(per_round) != len(trained):
            problems.append(f"comm.per_round has {len(per_round)} rows for {len(trained)} trained rounds")
        else:
            for p, r in zip(per_round, trained, strict=True):
                for key in ("up_bytes", "down_bytes"):
                    if key in r and r[key] != p.get(key):
                        problems.append(f"round {r['round']}: metrics says {key}={r[key]}, comm says {p.get(key)}")

    for name, block_key, round_key in (("last", "last", None), ("best_val", "best_val", "best_val_round")):
        block = final.get(block_key)
        if block is None and block_key == "best_val":
            if final.get(round_key) is not None:
                problems.append(f"metrics.final.best_val is null but best_val_round is {final[round_key]!r}")
            continue
        if not isinstance(block, dict) or not _is_count(block.get("round")) or block["round"] not in by_round:
            problems.append(f"metrics.final.{name} does not name a round of metrics.rounds")
            continue
        source = by_round[block["round"]]
        for k, v in block.items():
            if k in source and source[k] != v:
                problems.append(f"metrics.final.{name}.{k} = {v!r} but round {block['round']} says {source[k]!r}")
        if round_key and final.get(round_key) != block["round"]:
            problems.append(f"metrics.final.{round_key} = {final.get(round_key)!r} but best_val is round "
                            f"{block['round']}")
    best = final.get("best_val")
    if isinstance(best, dict) and _is_number(best.get("val_acc")):
        top = max((r["val_acc"] for r in rounds if _is_number(r.get("val_acc"))), default=None)
        if top is not None and best["val_acc"] != top:
            problems.append(f"metrics.final.best_val has val_acc {best['val_acc']} but the best round has {top}")
    for key in ("rounds_run", "trainable_params"):
        if not _is_count(final.get(key)):
            problems.append(f"metrics.final.{key} = {final.get(key)!r}: must be a non-negative integer")
    return problems


def check_record(record: Any, path: str | Path | None = None) -> list[str]:
    """Every problem with one record (an empty list means valid). ``path`` adds the location check."""
    if not isinstance(record, dict):
        return ["not a JSON object"]
    missing = [k for k in REQUIRED_KEYS if k not in record]
    if missing:
        return [f"missing keys {missing}: not a fedbench record"]
    problems: list[str] = _top_level_problems(record)
    version = record["schema_version"]
    if not (type(version) is int and version == SCHEMA_VERSION):  # true == 1 in Python, not in a schema
        problems.append(f"schema_version {version!r}: this fedbench reads {SCHEMA_VERSION}")
    spec, spec_problems = _spec_problems(record)
    problems += spec_problems
    if spec is not None and path is not None:
        problems += _path_problems(spec, Path(path))
    if isinstance(record.get("images"), dict):
        problems += _images_problems(record["images"], record.get("spec_hash"))
    diverged_round = None
    if isinstance(record.get("diverged"), dict):
        diverged_round, diverged_problems = _diverged_problems(record["diverged"], spec)
        problems += diverged_problems
    metrics, comm = record["metrics"], record["comm"]
    if not isinstance(metrics, dict) or not isinstance(comm, dict):
        return problems + ["metrics and comm must be objects"]
    for key in COMM_COUNTS:
        if not _is_count(comm.get(key)):
            problems.append(f"comm.{key} = {comm.get(key)!r}: must be a non-negative integer")
    problems += _leaf_problems(metrics, "metrics") + _leaf_problems(comm, "comm")
    problems += _rounds_problems(metrics, comm, spec, diverged_round)
    timing = record.get("timing")
    if isinstance(timing, dict):
        total = timing.get("total_seconds")
        if not (_is_number(total) and math.isfinite(total) and total >= 0):
            problems.append(f"timing.total_seconds = {total!r}: must be a non-negative number")
    if not isinstance(record["provenance"], dict):
        problems.append("provenance is not an object")
    return problems


def validate_file(path: str | Path) -> Validation:
    """Load ``path`` as strict JSON and check it, location included."""
    path = Path(path)
    result = Validation(path)
    try:
        record = read_json_strict(path)
    except ResultsError as exc:
        result.problems.append(str(exc))
        return result
    result.problems = check_record(record, path)
    result.record = record if isinstance(record, dict) else None
    return result


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def record_files(paths: Iterable[str | Path], skip: Iterable[str | Path] = ()) -> list[Path]:
    """Expand folders into their ``*.json`` files (sorted; hidden and temp files skipped)."""
    # realpath, not Path.resolve: resolve raises on a symlink loop, realpath leaves it for the reader.
    skipped = [Path(os.path.realpath(s)) for s in skip]
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            try:
                found = sorted(f for f in p.rglob("*.json") if not _hidden(f, p))
            except OSError as exc:
                raise ResultsError(f"cannot list the records under {p} ({exc.strerror or exc}); check the folder "
                                   f"and its permissions") from None
            out += [f for f in found if not any(Path(os.path.realpath(f)).is_relative_to(s) for s in skipped)]
        else:
            out.append(p)
    return out


def validate_paths(paths: Iterable[str | Path]) -> list[Validation]:
    return [validate_file(p) for p in record_files(paths)]


def _counts(labels: list[str], order: tuple[str, ...]) -> str:
    shown = [s for s in order if s in labels or s in ("OK", "FAIL")]
    return ", ".join(f"{labels.count(s)} {s}" for s in shown)


def print_validations(results: list[Validation]) -> int:
    """One line per record, OK, DIVERGED or FAIL with every problem; returns the exit code (1 on
    any FAIL). No record at all is an error: a mistyped folder must not read as a clean pass."""
    if not results:
        raise ResultsError("found no record to check: give record files or folders holding them "
                           "(`fedbench validate results/`); hidden files and folders are skipped")
    for r in results:
        if r.status == "OK":
            print(f"OK   {r.path}")
        elif r.status == "DIVERGED":
            print(f"DIVERGED {r.path} ({r.reasons[0]})")
        else:
            print(f"FAIL {r.path}")
            for problem in r.problems:
                print(f"     - {problem}")
    print(_counts([r.status for r in results], ("OK", "DIVERGED", "FAIL")))
    return 1 if any(r.status == "FAIL" for r in results) else 0
