"""Protocols made of several runs: leave-one-domain-out over every domain (``--set heldout=all``).

The FedCLIP protocol (and DomainBed's) holds one domain out per run and reports a table with one
column per held-out domain plus their mean. :func:`expand_heldout_all` turns one request into one
:class:`~fedbench.core.spec.RunSpec` per domain (each an ordinary run with its own record);
:func:`summarize_heldout` reads the records back into that table, with the paper's numbers beside
the measured ones when the backbone is the paper's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedbench.core.registry import TASKS
from fedbench.core.spec import RunSpec, parse_sets
from fedbench.data.dataset import TaskCard
from fedbench.errors import SpecError
from fedbench.harness.run import resolve_spec

# The backbone of the FedCLIP paper's tables (CLIP ViT-B/32, OpenAI weights). Published numbers
# are shown beside measured ones only for it: on any other backbone they compare different models.
PAPER_BACKBONES = ("openclip:ViT-B-32/openai", "openclip:ViT-B/32/openai")
_TRAINABLE_WORDS = ("full", "lora", "head")


def _as_dict(sets: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    return dict(sets) if isinstance(sets, Mapping) else parse_sets(list(sets))


def _heldout_keys(raw: Mapping[str, str]) -> list[str]:
    return [k for k in raw if k in ("heldout", "task.heldout")]


def requests_heldout_all(sets: Sequence[str] | Mapping[str, str]) -> bool:
    """True when the ``--set`` pairs ask for every domain in turn (``heldout=all``)."""
    raw = _as_dict(sets)
    return any(raw[k].strip().lower() == "all" for k in _heldout_keys(raw))


def task_domains(task: str, options: Any, seed: int = 0) -> list[str]:
    """The domains a task can hold out, under resolved ``options``.

    Asked in this order: a ``heldout_domains(options)`` function on the task class; the options'
    ``domain_list()`` (tasks whose domains are an option); a ``domains`` list on the task class;
    and, for tasks that declare none, the ``domains`` of the loaded dataset (slow: loads the data).
    """
    task_cls = TASKS.get(task).obj
    if callable(getattr(task_cls, "heldout_domains", None)):
        domains = list(task_cls.heldout_domains(options))
    elif callable(getattr(options, "domain_list", None)):
        domains = list(options.domain_list())
    elif getattr(task_cls, "domains", None):
        domains = list(task_cls.domains)
    else:
        domains = list(task_cls().load(options, seed).domains)
    if not domains:
        raise SpecError(f"task {task!r} has no domains to hold out; heldout=all needs a leave-one-domain-out task")
    return domains


def expand_heldout_all(method: str, task: str, **resolve_kwargs: Any) -> list[RunSpec]:
    """One resolved spec per domain of ``task``, each holding that domain out.

    ``resolve_kwargs`` are :func:`fedbench.harness.run.resolve_spec`'s (backbone, seed, rounds, sets, ...);
    the ``heldout`` entry of ``sets`` (``all``) is replaced by each domain in turn, every other
    option is kept and checked once before any spec is made.
    """
    raw = _as_dict(resolve_kwargs.pop("sets", ()))
    rest = {k: v for k, v in raw.items() if k not in _heldout_keys(raw)}
    task_cls = TASKS.get(task).obj
    if "heldout" not in getattr(task_cls.Options, "__dataclass_fields__", {}):
        raise SpecError(f"heldout=all: task {task!r} has no heldout option (not a leave-one-domain-out task)")
    base = resolve_spec(method, task, sets=rest, **resolve_kwargs)
    domains = task_domains(task, task_cls.Options(**base.task_options), base.seed)
    return [resolve_spec(method, task, sets={**rest, "task.heldout": d}, **resolve_kwargs) for d in domains]


def _published_row(published: Mapping[str, Any], method: str, options: Mapping[str, Any]) -> tuple[str, dict] | None:
    """The card's published entry for this method: its name starts with the method's name
    ("FedCLIP" for fedclip); for methods with a ``trainable`` option the entry must name the same
    choice ("full", "lora", "head"), a name without one meaning full fine-tuning (as in the paper)."""
    trainable = options.get("trainable")
    for name, values in published.items():
        if name.startswith("_") or not isinstance(values, Mapping):
            continue
        head = re.match(r"[\w-]+", name)
        if head is None or head.group(0).lower() != method.lower():
            continue
        if trainable is not None:
            named = [w for w in _TRAINABLE_WORDS if re.search(rf"\b{w}\b", name.lower())]
            if (named[0] if named else "full") != trainable:
                continue
        return name, dict(values)
    return None


def _pct(x: float | None) -> float | None:
    return None if x is None else round(100 * float(x), 2)


def summarize_heldout(records: Sequence[Mapping[str, Any]], task_card: TaskCard, backbone: str) -> list[dict[str, Any]]:
    """The leave-one-domain-out table: one row per held-out domain, then their mean.

    Columns: held-out accuracy (%) of the server model at the last round and at the round with the
    best validation accuracy, those two round numbers, and, when ``backbone`` is the paper's and
    the task card publishes a row for this method, the published accuracy. Rows are dicts in
    column order: ``tabulate(rows, headers="keys")`` prints them.
    """
    if not records:
        raise SpecError("summarize_heldout: no records")
    methods = {(r["spec"]["method"], r["spec"]["task"], r["spec"]["backbone"]) for r in records}
    if len(methods) != 1:
        raise SpecError(f"summarize_heldout: records mix method/task/backbone combinations {sorted(methods)}")
    method = records[0]["spec"]["method"]
    published = None
    if backbone in PAPER_BACKBONES:
        published = _published_row(task_card.published, method, records[0]["spec"]["method_options"])

    rows: list[dict[str, Any]] = []
    last_accs, best_accs = [], []
    for record in records:
        domain = record["spec"]["task_options"].get("heldout")
        final = record["metrics"]["final"]
        last = (final.get("last") or {}).get("heldout_acc") or {}
        best = (final.get("best_val") or {}).get("heldout_acc") or {}
        if domain not in last:
            raise SpecError(f"record {record.get('spec_hash')} has no held-out accuracy for {domain!r}")
        last_accs.append(last[domain])
        best_accs.append(best.get(domain))
        row = {
            "held-out domain": domain,
            "acc % (last round)": _pct(last[domain]),
            "last round": (final.get("last") or {}).get("round"),
            "acc % (best-val round)": _pct(best.get(domain)),
            "best-val round": final.get("best_val_round"),
        }
        if published is not None:
            row[f"published % ({published[0]})"] = published[1].get(domain)
        rows.append(row)

    mean = {
        "held-out domain": "mean",
        "acc % (last round)": _pct(float(np.mean(last_accs))),
        "last round": None,
        "acc % (best-val round)": _pct(float(np.mean(best_accs))) if None not in best_accs else None,
        "best-val round": None,
    }
    if published is not None:
        mean[f"published % ({published[0]})"] = published[1].get("mean")
    rows.append(mean)
    return rows


def format_heldout_table(rows: list[dict[str, Any]], backbone: str) -> str:
    """``rows`` as a text table, with a line saying when published numbers are left out."""
    from tabulate import tabulate

    text = tabulate(rows, headers="keys", tablefmt="simple", missingval="-")
    if not any(k.startswith("published") for k in rows[0]):
        if backbone in PAPER_BACKBONES:
            text += "\n(the task card publishes no number for this method)"
        else:
            text += (f"\n(published numbers are for {PAPER_BACKBONES[0]}; not shown beside measured "
                     f"ones on {backbone})")
    return text
