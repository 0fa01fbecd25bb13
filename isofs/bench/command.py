"""`isofs bench`'s command: options checked, the run guarded, the results put out.

Whatever happens (a failure, Ctrl-C, SIGTERM, SIGHUP), everything the run mounted is unmounted
(lazily), daemons still alive are killed by PID and the scratch directory is removed before
the command returns. Bad input and failures end as one line `isofs: error: ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from isofs.bench import (
    DEFAULT_FILES,
    DEFAULT_REPEAT,
    QUICK_FILES,
    SCALE_OPERATIONS,
    SCALE_STATES,
    _list,
)
from isofs.bench.contenders import BenchError, Scratch
from isofs.bench.runner import (
    OPERATIONS,
    STATES,
    Settings,
    builtin_providers,
    installed_providers,
    run_once,
    run_scale,
)
from isofs.daemon.runtime import is_mounted
from isofs.source import is_initialised


class Interrupted(Exception):
    """SIGTERM or SIGHUP: end the run as Ctrl-C does, through the clean-up."""


def _error(message: str) -> int:
    print(f"isofs: error: {message}", file=sys.stderr)
    return 1


def settings_from(args: argparse.Namespace) -> Settings:
    """The run the options ask for (BenchError: a one-line reason they are wrong)."""
    scale = args.scale
    operations = args.ops or _list(SCALE_OPERATIONS if scale else ",".join(OPERATIONS))
    states = args.states or _list(SCALE_STATES if scale else ",".join(STATES))
    for kind, given, known in (("operation", operations, OPERATIONS), ("state", states, STATES)):
        unknown = [name for name in given if name not in known]
        if unknown:
            raise BenchError(f"unknown {kind} {unknown[0]!r} (known: {', '.join(known)})")
    states = [state for state in STATES if state in states]  # their natural order
    operations = list(dict.fromkeys(operations))
    source = None
    providers: list[str]
    if args.source is not None:
        if args.bench_providers:
            raise BenchError("--source measures that source's own stack: drop --providers")
        source = Path(args.source).resolve()
        if not source.is_dir():
            raise BenchError(f"not a directory: {args.source}")
        if not is_initialised(source):
            raise BenchError(f"not an isofs source (run isofs init first): {args.source}")
        if is_mounted(str(source)):
            raise BenchError(f"source is mounted: {args.source}")
        providers = ["source"]
    else:
        installed = installed_providers()
        providers = args.bench_providers or builtin_providers()
        for name in providers:
            if name not in installed:
                raise BenchError(f"unknown provider {name!r} (installed: {', '.join(installed)})")
        providers = list(dict.fromkeys(providers))
    secret_args: list[str] = []
    for flag, value in (("--passfile", args.passfile), ("--keyfile", args.keyfile)):
        if value is not None:
            if not os.path.isfile(value):
                raise BenchError(f"{flag}: no such file: {value}")
            secret_args += [flag, os.path.abspath(value)]
    if secret_args and source is None:
        raise BenchError("--passfile and --keyfile are for --source (generated trees have their "
                         "own passphrase)")  # fmt: skip
    if not os.path.isdir(args.workdir):
        raise BenchError(f"--workdir: not a directory: {args.workdir}")
    return Settings(
        files=args.files or (QUICK_FILES if args.quick else DEFAULT_FILES),
        repeat=args.repeat or (1 if args.quick else DEFAULT_REPEAT),
        operations=operations,
        states=states,
        providers=providers,
        source=source,
        secret_args=secret_args,
        progress=args.progress,
    )


def _preflight(args: argparse.Namespace) -> None:
    """Fail before building anything on what cannot work at the end."""
    for tool in ("fusermount3", "ls", "du", "find"):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise BenchError("/dev/fuse is missing or not usable")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise BenchError("--plot needs matplotlib: pip install 'isofs[bench]'") from None
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path is not None:
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise BenchError(f"{flag}: no such directory: {parent}")


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP interrupt the run like Ctrl-C; the clean-up then runs undisturbed."""

    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(signal.Signals(signum).name)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def _no_interruptions() -> Iterator[None]:
    watched = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in watched}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_command(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
        _preflight(args)
    except BenchError as exc:
        return _error(str(exc))
    from isofs.bench import report

    load_before = os.getloadavg()
    scratch: Scratch | None = None
    interrupted = False
    failure: str | None = None
    try:
        with _signals_interrupt():
            scratch = Scratch(args.workdir)
            if args.scale:
                points = run_scale(settings, args.scale, scratch)
                env = report.environment(scratch.path, load_before)
                text = report.render_scale(points, env)
                document = report.scale_json(points, env)
            else:
                results = run_once(settings, scratch)
                env = report.environment(scratch.path, load_before)
                text = report.render(results, env)
                document = report.as_json(results, env)
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
    except BenchError as exc:
        failure = str(exc)
    except OSError as exc:
        failure = f"{exc.filename or 'bench'}: {exc.strerror or exc}"
    finally:
        problems: list[str] = []
        if scratch is not None:
            with _no_interruptions():
                problems = scratch.cleanup()
    for problem in problems:
        print(f"isofs: warning: clean-up: {problem}", file=sys.stderr)
    if interrupted:
        print("isofs: interrupted; everything the benchmark mounted is unmounted and its "
              "scratch directory removed", file=sys.stderr)  # fmt: skip
        return 130
    if failure is not None:
        return _error(failure)
    print(text)
    try:
        if args.json:
            Path(args.json).write_text(json.dumps(document, indent=2, default=str) + "\n")
        if args.plot:
            if args.scale:
                report.plot_scale(points, args.plot)
            else:
                report.plot(results, args.plot)
    except OSError as exc:
        return _error(f"cannot write {exc.filename}: {exc.strerror}")
    failed = [] if args.scale else [k for k, c in results.checks.items() if not c["ok"]]
    if failed:
        return _error(f"size check failed for {', '.join(failed)} (see above)")
    return 0
