"""`isofs bench`: the enumeration-overhead benchmark users run (see docs/ARCHITECTURE.md)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `isofs bench` (the command line asks the benchmark for them)."""


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the options describe; the exit status."""
    raise NotImplementedError("isofs bench is being built")
