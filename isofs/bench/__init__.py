"""`isofs bench`: the enumeration-overhead benchmark users run.

It answers "is an isolation layer usable on a busy directory?" on the user's own machine: it
builds a tree of N files through each provider's target view (or takes `--source DIR`), then
lists it with `os.scandir`+stat, `ls -l`, `du -s`, `find -type f` and one stat per file,
through the native directory, a minimal pyfuse3 passthrough (the fair baseline,
`isofs.bench.minimal`), the isofs passthrough mount and each provider in a one-view and a
two-view mount, in three states (first listing ever, cold, warm). See bench/README.md.

This module only parses options and keeps the rest lazy: `python -m isofs.bench.helper`,
started once per timed operation, imports it too.
"""

from __future__ import annotations

import argparse

DEFAULT_FILES = 10_000
QUICK_FILES = 300
DEFAULT_REPEAT = 3
SCALE_OPERATIONS = "scandir,ls"
SCALE_STATES = "first,cold"


def _positive(text: str) -> int:
    try:
        value = int(text.replace(",", "_").replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `isofs bench` (the command line asks the benchmark for them)."""
    parser.description = (
        "Measure directory enumeration through isofs views against the native directory, a "
        "minimal pyfuse3 passthrough and the isofs passthrough mount, and print the ratios. "
        "Needs root for dropping the kernel's caches and for two-view target readers."
    )
    what = parser.add_argument_group("what to measure")
    what.add_argument("--files", type=_positive, metavar="N",
                      help=f"files in the generated tree (default {DEFAULT_FILES:,}; "
                      f"--quick: {QUICK_FILES})")  # fmt: skip
    # dest is not "providers": the command line sets args.providers for itself.
    what.add_argument("--providers", dest="bench_providers", type=_list, metavar="LIST",
                      help="comma-separated providers to measure (default: every installed "
                      "built-in one); passthrough is always measured as the base")  # fmt: skip
    what.add_argument("--source", metavar="DIR",
                      help="measure this initialised, unmounted source instead of generated "
                      "trees (its size cache is removed for the first-listing state)")  # fmt: skip
    what.add_argument("--ops", type=_list, metavar="LIST",
                      help="operations: scandir,ls,du,find,stat (default all; --scale: "
                      f"{SCALE_OPERATIONS})")  # fmt: skip
    what.add_argument("--states", type=_list, metavar="LIST",
                      help=f"states: first,cold,warm (default all; --scale: {SCALE_STATES})")
    what.add_argument("--scale", type=lambda t: [_positive(x) for x in _list(t)],
                      metavar="N1,N2,...",
                      help="measure the first listing for each number of files and how the time "
                      "per file grows (e.g. 1000,10000,100000)")  # fmt: skip
    how = parser.add_argument_group("how")
    how.add_argument("--repeat", type=_positive, metavar="N",
                     help=f"repetitions, medians reported (default {DEFAULT_REPEAT}; --quick: 1)")
    how.add_argument("--quick", action="store_true",
                     help=f"{QUICK_FILES} files and one repetition (a smoke test)")
    how.add_argument("--workdir", metavar="DIR", default=".",
                     help="where the scratch directory goes (default: the current directory; "
                     "it is removed at the end)")  # fmt: skip
    how.add_argument("--passfile", metavar="FILE", help="passphrase of --source's providers")
    how.add_argument("--keyfile", metavar="FILE", help="key file of --source's providers")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="save settings, samples and medians")
    out.add_argument("--plot", metavar="FILE.png",
                     help="draw the comparison (needs matplotlib: pip install 'isofs[bench]')")
    out.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar on stderr")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe; the exit status."""
    from isofs.bench.command import run_command

    return run_command(args)
