"""What `isofs bench` runs in a separate process for each timed operation and each check.

A view is chosen per process, so every operation runs in a process of its own, in the view
under test: a plain process, or one that first joins the view's `isofs exec` group
(`--join-view target`: the call `isofs exec --view target` makes, without its start-up).
The process times the operation itself, so its own start-up is not part of the figure; shell
tools (`ls`, `du`, `find`) are timed from their
fork to their exit. It prints one JSON document on stdout.

Only the standard library is imported (and, for --join-view, the small module that joins a
view group): a helper must start fast and touch nothing but the tree it is given.

    python -m isofs.bench.helper OPERATION ROOT [--paths FILE] [--join-view VIEW]
    python -m isofs.bench.helper check ROOT [--expect FILE] [--contents] [--join-view VIEW]
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from typing import Any

#: Kept out of every listing: the metadata directory isofs shows only to the native view.
META_DIR = ".isofs"
SHELL_ENV = {"LC_ALL": "C", "PATH": os.environ.get("PATH", "/usr/bin:/bin")}

#: Operation name -> the command a shell tool runs on ROOT (None: done in Python).
SHELL_COMMANDS: dict[str, list[str]] = {
    "ls": ["ls", "-lR", f"--ignore={META_DIR}"],
    "du": ["du", "-s", f"--exclude={META_DIR}"],
    "find": ["find", "{root}", "-name", META_DIR, "-prune", "-o", "-type", "f", "-print"],
}


def walk(root: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Every entry under `root` (relative path, entry), top-down, metadata directory left out.

    Entries are yielded as the listing reads them, so a caller that stats each one does it
    right after the readdir that returned it, as `ls -l` and a file manager do (a walk that
    lists everything first and stats afterwards stats entries whose kernel cache lifetime, 1 s
    by default, may have run out meanwhile: one more round trip each).
    """
    pending = [""]
    while pending:
        relative = pending.pop()
        with os.scandir(os.path.join(root, relative) if relative else root) as listing:
            for entry in listing:
                if not relative and entry.name == META_DIR:
                    continue
                path = os.path.join(relative, entry.name) if relative else entry.name
                if entry.is_dir(follow_symlinks=False):
                    pending.append(path)
                yield path, entry


def scandir_stat(root: str) -> int:
    """`os.scandir` + `stat` of every entry, the way a file manager or a build tool lists."""
    count = 0
    for _path, entry in walk(root):
        entry.stat(follow_symlinks=False)
        count += 1
    return count


def stat_each(root: str, paths: list[str]) -> int:
    """One `os.stat` per file, by path (a walk of names already known, like `make`)."""
    for path in paths:
        os.stat(os.path.join(root, path), follow_symlinks=False)
    return len(paths)


def run_shell(operation: str, root: str) -> int:
    command = [root if word == "{root}" else word for word in SHELL_COMMANDS[operation]]
    if "{root}" not in SHELL_COMMANDS[operation]:
        command.append(root)
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=SHELL_ENV)  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.decode().strip()[:200]}")
    return -1  # the tool does not say how many entries it saw


def timed(operation: str, root: str, paths_file: str | None) -> dict[str, Any]:
    paths: list[str] = []
    if operation == "stat":
        with open(paths_file or "") as f:
            paths = json.load(f)
    started = time.perf_counter()
    if operation == "scandir":
        entries = scandir_stat(root)
    elif operation == "stat":
        entries = stat_each(root, paths)
    else:
        entries = run_shell(operation, root)
    return {"seconds": time.perf_counter() - started, "entries": entries}


def check(root: str, expect_file: str | None, contents: bool) -> dict[str, Any]:
    """Listed size == stat size == open+fstat size == bytes readable (== the expected size).

    The listing comes first, so its sizes are the ones a listing gets in the state the mount
    is in (measured, from the size cache, or from the kernel's attribute cache).
    """
    expected: dict[str, list[Any]] = {}
    if expect_file:
        with open(expect_file) as f:
            expected = json.load(f)
    listed = {path: entry.stat(follow_symlinks=False) for path, entry in walk(root)}
    problems: list[str] = []
    files = 0
    for path, st in sorted(listed.items()):
        if not stat.S_ISREG(st.st_mode):
            continue
        files += 1
        full = os.path.join(root, path)
        sizes = {"listed": st.st_size, "stat": os.stat(full, follow_symlinks=False).st_size}
        with open(full, "rb") as f:
            sizes["fstat"] = os.fstat(f.fileno()).st_size
            data = f.read()
        sizes["read"] = len(data)
        want = expected.get(path)
        if want is not None:
            sizes["expected"] = want[0]
        if len(set(sizes.values())) != 1:
            problems.append(f"{path}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
        elif contents and want is not None and zlib.crc32(data) != want[1]:
            problems.append(f"{path}: bytes read differ from the bytes written")
    missing = sorted(set(expected) - set(listed))
    problems += [f"{path}: not listed" for path in missing]
    return {"files": files, "problems": len(problems), "examples": problems[:5]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m isofs.bench.helper")
    parser.add_argument("operation", choices=["scandir", "ls", "du", "find", "stat", "check"])
    parser.add_argument("root")
    parser.add_argument("--paths", help="JSON list of relative file paths (stat)")
    parser.add_argument("--expect", help="JSON {path: [size, crc32]} (check)")
    parser.add_argument("--contents", action="store_true", help="check: compare crc32s too")
    parser.add_argument("--join-view", metavar="VIEW",
                        help="first join VIEW's isofs exec group, as `isofs exec --view` does")
    args = parser.parse_args(argv)
    if args.join_view:
        from isofs.views.execgroups import ExecError, join_view_group

        try:
            join_view_group(args.join_view, os.getpid())
        except ExecError as exc:
            json.dump({"error": str(exc)}, sys.stdout)
            return 1
    try:
        if args.operation == "check":
            result = check(args.root, args.expect, args.contents)
        else:
            result = timed(args.operation, args.root, args.paths)
    except (OSError, RuntimeError, ValueError) as exc:
        result = {"error": f"{args.operation} {args.root}: {exc}"}
    json.dump(result, sys.stdout)
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
