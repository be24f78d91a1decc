"""Per-module mutation score of the last ``make mutants`` run (docs/testing.md).

Reads mutmut's result files (``mutants/<path>.meta``) and prints one row a module: mutants,
killed, survived, no test reaching it, timeouts, and the score ``killed / (mutants - skipped)``,
where a timeout counts as killed (the mutant made a test hang) and "no tests" counts against it.

    python devtools/mutation_report.py              # the table
    python devtools/mutation_report.py --survivors zeroseg.losses   # the surviving mutants' names
    python devtools/mutation_report.py --json out.json              # the table as JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

KILLED = {"killed", "timeout"}
NOT_COUNTED = {"skipped", "not checked", "check was interrupted by user", "caught by type check"}


def module_of(mutant: str) -> str:
    """``zeroseg.losses.x_focal__mutmut_3`` -> ``zeroseg.losses``;
    ``zeroseg.models.zegclip.xǁZegCLIPǁloss__mutmut_1`` -> ``zeroseg.models.zegclip``."""
    head = mutant.split("__mutmut_")[0]
    parts = head.split(".")
    while parts and (parts[-1].startswith("x_") or parts[-1].startswith("xǁ")):
        parts.pop()
    return ".".join(parts)


def statuses(root: Path):
    """``(mutant name, status)`` of every mutant in the ``*.meta`` files under ``root``
    (``mutants/``); the status is mutmut's word for its exit code, ``"not checked"`` when unrun.

    Raises:
        SystemExit: no result files (``make mutants`` has not run).
    """
    from mutmut.stats import status_by_exit_code

    metas = sorted(root.rglob("*.py.meta"))
    if not metas:
        raise SystemExit(f"error: no mutmut results under {root}/: run `make mutants` first")
    for meta in metas:
        for name, code in json.loads(meta.read_text()).get("exit_code_by_key", {}).items():
            yield name, "not checked" if code is None else status_by_exit_code[code]


def load(root: Path) -> dict[str, Counter]:
    """Status counts a module (:func:`statuses`)."""
    counts: dict[str, Counter] = {}
    for name, status in statuses(root):
        counts.setdefault(module_of(name), Counter())[status] += 1
    return counts


def survivors(root: Path, module: str) -> list[str]:
    """Names of the surviving (or unreached) mutants of ``module``, for ``mutmut show NAME``."""
    return [n for n, st in statuses(root) if module_of(n) == module and st in {"survived", "no tests"}]


def table(counts: dict[str, Counter]) -> list[dict]:
    """One row a module: counts by kind and ``score`` = killed / counted mutants in percent
    (None when none was counted)."""
    rows = []
    for module in sorted(counts):
        c = counts[module]
        counted = sum(v for k, v in c.items() if k not in NOT_COUNTED)
        killed = sum(c[k] for k in KILLED)
        rows.append(
            {
                "module": module,
                "mutants": counted,
                "killed": killed,
                "survived": c["survived"],
                "no_tests": c["no tests"],
                "other": counted - killed - c["survived"] - c["no tests"],
                "not_run": sum(c[k] for k in NOT_COUNTED),
                "score": round(100.0 * killed / counted, 1) if counted else None,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("mutants"))
    parser.add_argument("--survivors", metavar="MODULE")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.survivors:
        print("\n".join(survivors(args.root, args.survivors)))
        return 0
    rows = table(load(args.root))
    width = max(len(r["module"]) for r in rows)
    print(f"{'module':<{width}}  mutants  killed  survived  no tests  other  not run  score")
    for r in rows:
        score = "-" if r["score"] is None else f"{r['score']:.1f}%"
        print(
            f"{r['module']:<{width}}  {r['mutants']:>7}  {r['killed']:>6}  {r['survived']:>8}  "
            f"{r['no_tests']:>8}  {r['other']:>5}  {r['not_run']:>7}  {score:>6}"
        )
    total = sum(r["mutants"] for r in rows)
    killed = sum(r["killed"] for r in rows)
    if total:
        print(
            f"{'all':<{width}}  {total:>7}  {killed:>6}  {'':>8}  {'':>8}  {'':>5}  {'':>7}  {100 * killed / total:.1f}%"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
