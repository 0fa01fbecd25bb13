"""The run of `isofs bench`: sources, contenders, states, repetitions, checks.

For every (operation, contender) a repetition measures the three states in order:

* first listing ever: the persistent size cache removed, a fresh mount, kernel caches dropped;
* cold: a remount (the size cache the first listing left is kept), kernel caches dropped;
* warm: the same operation again at once, on that mount.

Each timed operation runs in a process of its own, in the contender's view; the daemon's
request counters are read just before and after it. Contenders are rotated by one between
repetitions, and medians are reported.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from tqdm import tqdm

from isofs.bench import dataset
from isofs.bench.contenders import (
    ISOFS,
    MINIMAL,
    NATIVE,
    BenchError,
    Contender,
    Counters,
    Live,
    Mounter,
    Scratch,
    drop_caches,
    run_helper,
)
from isofs.provider import ENTRY_POINT_GROUP, ProviderError
from isofs.source import meta_dir_of, read_config

#: Operation key -> how the table names it, what it does.
OPERATIONS: dict[str, tuple[str, str]] = {
    "scandir": ("scandir+stat", "os.scandir of every directory, stat of each entry as listed"),
    "ls": ("ls -l", "LC_ALL=C ls -lR of the tree (statx and two getxattrs per entry)"),
    "du": ("du -s", "du -s of the tree (fstatat of every entry)"),
    "find": ("find -type f", "find -type f of the tree (types from readdir, no stat)"),
    "stat": ("stat each", "one os.stat per file, by path"),
}
STATES: dict[str, str] = {
    "first": "first listing ever: size cache removed, fresh mount, kernel caches dropped",
    "cold": "cold: remounted (persistent size cache kept), kernel caches dropped",
    "warm": "warm: the same operation again at once",
}
ONE_VIEW_TARGET = ["--default-view", "target", "--no-exec"]
ONE_VIEW_NATIVE = ["--default-view", "native", "--no-exec"]
PASSPHRASE = "isofs-bench-not-a-secret\n"
#: Base contenders every ratio column is computed against.
BASES = ("native", "minimal", "passthrough")


def builtin_providers() -> list[str]:
    """Installed providers that ship with isofs (entry points whose module is isofs_providers.*),
    passthrough first."""
    names = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)
             if ep.value.split(":")[0].split(".")[0] == "isofs_providers"}  # fmt: skip
    return sorted(names, key=lambda name: (name != "passthrough", name))


def installed_providers() -> list[str]:
    return sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


@dataclass
class Sample:
    """One timed operation: wall time in the reading process, entries listed, daemon counters."""

    seconds: float
    entries: int
    counters: Counters | None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"seconds": self.seconds, "entries": self.entries}
        if self.counters is not None:
            out["requests"] = self.counters.requests
            out["request_seconds"] = self.counters.seconds
            operations = sorted(self.counters.operations.items())
            out["operations"] = {k: {"count": c, "seconds": s} for k, (c, s) in operations}
            out["size_cache"] = self.counters.size_cache
        return out


@dataclass
class View:
    """What a reader of one source in one view must see: entries, file paths, expectations."""

    entries: int
    paths_file: Path
    expect_file: Path
    contents: bool  # compare the bytes read with crc32s


@dataclass
class Settings:
    files: int
    repeat: int
    operations: list[str]
    states: list[str]
    providers: list[str]
    source: Path | None
    secret_args: list[str]
    progress: bool = True


@dataclass
class Results:
    """Everything a run measured, keyed by (contender, operation, state)."""

    settings: Settings
    contenders: list[Contender]
    entries: int
    samples: dict[tuple[str, str, str], list[Sample]] = field(default_factory=dict)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    tree: dict[str, int] = field(default_factory=dict)


def note(message: str) -> None:
    print(f"isofs bench: {message}", file=sys.stderr, flush=True)


class Bench:
    """One run: owns the scratch directory (the caller cleans it up) and the mounts in it."""

    def __init__(self, settings: Settings, scratch: Scratch) -> None:
        self.settings = settings
        self.scratch = scratch
        self.secret_args = list(settings.secret_args)
        if not self.secret_args:
            passfile = scratch.path / "passphrase"
            passfile.write_text(PASSPHRASE)
            passfile.chmod(0o600)
            self.secret_args = ["--passfile", str(passfile)]
        self.mounter = Mounter(scratch, self.secret_args)
        self.views: dict[tuple[Path, str], View] = {}
        self.can_drop = os.geteuid() == 0
        self.notes: list[str] = []
        self.tree_shape: dict[str, int] = {}

    # ------------------------------------------------------------------ sources

    def _init_source(self, provider: str, count: int) -> Path:
        source = self.scratch.new_dir(f"src-{provider}-{count}")
        command = [sys.executable, "-m", "isofs", "init", str(source), "--provider", provider,
                   *self.secret_args]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()] or ["?"]
            raise BenchError(f"isofs init --provider {provider}: {lines[-1]}")
        return source

    def build_source(self, provider: str, count: int) -> Path:
        """A source in `provider`'s format: init, then every file written through its target
        view (a one-view mount), so the files are what the provider makes of them."""
        source = self._init_source(provider, count)
        builder = Contender(f"build-{provider}", "build", ISOFS, source, provider=provider)
        live = self.mounter.mount_isofs(builder, ONE_VIEW_TARGET)
        with self._bar(count, f"writing {count} files through {provider}") as bar:
            tree = dataset.build(live.root, count, bar)
        live.unmount()
        self.tree_shape = {"files": len(tree.files), "hard_links": len(tree.links),
                           "directories": len(tree.directories)}  # fmt: skip
        self._record_view(source, "target", tree.entries, tree.expected(), contents=True)
        self._record_native_view(source)
        return source

    def adopt_source(self, source: Path) -> None:
        """An existing initialised source (--source): learn what each view must show."""
        builder = Contender("source", "source", ISOFS, source)
        live = self.mounter.mount_isofs(builder, ONE_VIEW_TARGET)
        try:
            paths = dataset.file_paths(live.root)
            entries = dataset.count_entries(live.root)
        finally:
            live.unmount()
        # Sizes in the target view cannot be known without the mount: the check compares the
        # listing with stat, fstat and the bytes read (an empty expectation per path).
        self._record_view(source, "target", entries, {path: None for path in paths},
                          contents=False)  # fmt: skip
        self._record_native_view(source)
        self.tree_shape = {"files": len(paths), "entries": entries}

    def _record_native_view(self, source: Path) -> None:
        expected = dataset.native_expectations(str(source))
        self._record_view(source, "native", dataset.count_entries(str(source)), expected,
                          contents=True)  # fmt: skip

    def _record_view(self, source: Path, view: str, entries: int,
                     expected: dict[str, Any], contents: bool) -> None:  # fmt: skip
        stem = f"{source.name}-{view}"
        paths_file = self.scratch.path / f"{stem}.paths.json"
        expect_file = self.scratch.path / f"{stem}.expect.json"
        paths_file.write_text(json.dumps(sorted(expected)))
        expect_file.write_text(json.dumps({k: v for k, v in expected.items() if v is not None}))
        self.views[(source, view)] = View(entries, paths_file, expect_file, contents)

    def contenders(self, sources: dict[str, Path]) -> list[Contender]:
        """native, minimal, the passthrough base, then each provider one-view and two-view."""
        base = sources.get("passthrough") or next(iter(sources.values()))
        out = [
            Contender("native", "the directory itself, no FUSE", NATIVE, base),
            Contender("minimal", "minimal pyfuse3 passthrough (isofs.bench.minimal)", MINIMAL,
                      base),
        ]  # fmt: skip
        given = self.settings.source is not None
        if given:
            out.append(Contender("passthrough", "isofs, native view of the source, one-view "
                                 "mount", ISOFS, base, "native", ONE_VIEW_NATIVE))  # fmt: skip
        two_view = os.geteuid() == 0
        if not two_view:
            self.notes.append("not root: no two-view target readers (isofs exec needs root)")
        for provider, source in sources.items():
            key = "source" if given else provider
            stack = self.stack_label(provider, source)
            if provider == "passthrough" and not given:
                stack = "passthrough provider"
            out.append(Contender(key, f"isofs, {stack}, one-view target mount", ISOFS, source,
                                 "target", ONE_VIEW_TARGET, provider=provider,
                                 sized=True))  # fmt: skip
            if not given and provider not in self.settings.providers:
                continue  # the passthrough base only, not selected itself
            if two_view:
                out.append(Contender(
                    f"{key}/2v-target", f"isofs, {stack}, two-view mount, target process (in "
                    "the isofs exec --view target group)", ISOFS, source, "target",
                    exec_view=True, provider=provider, sized=True))  # fmt: skip
            out.append(Contender(f"{key}/2v-native", f"isofs, {stack}, two-view mount, native "
                                 "process", ISOFS, source, "native",
                                 provider=provider))  # fmt: skip
        return out

    def stack_label(self, provider: str, source: Path) -> str:
        """The provider, or for --source the stack its metadata records."""
        if self.settings.source is None:
            return provider
        try:
            stack = read_config(meta_dir_of(source))["stack"]
        except ProviderError:
            return "the source's stack"
        return " -> ".join(item["provider"] for item in stack) or "no stack"

    # ------------------------------------------------------------------ measuring

    def _bar(self, total: int, description: str) -> tqdm:  # type: ignore[type-arg]
        if not sys.stderr.isatty() or not self.settings.progress:
            note(description)
        return tqdm(total=total, desc=description, file=sys.stderr, leave=False,
                    disable=not self.settings.progress or None, dynamic_ncols=True)  # fmt: skip

    def cold_caches(self) -> None:
        if not drop_caches() and self.can_drop:
            self.can_drop = False
        if not self.can_drop and "not root" not in " ".join(self.notes):
            self.notes.append("not root: kernel caches not dropped, 'cold' means remounted only")

    @contextlib.contextmanager
    def mounted(self, contender: Contender) -> Iterator[Live]:
        """Mounted for the block; after an exception the scratch clean-up unmounts it."""
        live = self.mounter.mount(contender)
        yield live
        live.unmount()

    def view_of(self, contender: Contender) -> View:
        return self.views[(contender.source, contender.view)]

    def timed(self, live: Live, operation: str) -> Sample:
        view = self.view_of(live.contender)
        arguments = [operation, live.root]
        if operation == "stat":
            arguments += ["--paths", str(view.paths_file)]
        before = live.counters()
        document = run_helper(live.contender, arguments)
        after = live.counters()
        counters = after.since(before) if after is not None and before is not None else None
        entries = document["entries"] if document["entries"] >= 0 else view.entries
        if operation == "scandir" and entries != view.entries:
            raise BenchError(f"{live.contender.key}: listed {entries} entries, expected "
                             f"{view.entries}")  # fmt: skip
        return Sample(document["seconds"], entries, counters)

    def measure(self, contender: Contender, operation: str, states: list[str]) -> dict[str, Sample]:
        """The requested states of one operation on one contender (see the module doc)."""
        out: dict[str, Sample] = {}
        if "first" in states:
            contender.forget_sizes()
            with self.mounted(contender) as live:
                self.cold_caches()
                out["first"] = self.timed(live, operation)
        if "cold" in states or "warm" in states:
            with self.mounted(contender) as live:
                self.cold_caches()
                cold = self.timed(live, operation)
                if "cold" in states:
                    out["cold"] = cold
                if "warm" in states:
                    out["warm"] = self.timed(live, operation)
        return out

    def check(self, contender: Contender) -> dict[str, Any]:
        """Listed sizes == stat == open+fstat == bytes readable (== expected), first and cold."""
        view = self.view_of(contender)
        out: dict[str, Any] = {}
        for state in ("first", "cold"):
            if state == "first":
                contender.forget_sizes()
            with self.mounted(contender) as live:
                self.cold_caches()
                arguments = ["check", live.root, "--expect", str(view.expect_file)]
                document = run_helper(contender, arguments + (["--contents"] * view.contents))
            out[state] = document
        out["ok"] = all(out[state]["problems"] == 0 for state in ("first", "cold"))
        return out

    def run_matrix(self, contenders: list[Contender], results: Results, label: str = "") -> None:
        settings = self.settings
        total = settings.repeat * len(settings.operations) * len(contenders)
        with self._bar(total, f"measuring{label}") as bar:
            for repetition in range(settings.repeat):
                shift = repetition % len(contenders)
                order = contenders[shift:] + contenders[:shift]
                for operation in settings.operations:
                    if bar.disable:  # no bar (stderr is not a terminal): a line per step
                        note(f"repetition {repetition + 1}/{settings.repeat}: "
                             f"{OPERATIONS[operation][0]}{label}")  # fmt: skip
                    for contender in order:
                        bar.set_postfix_str(f"{contender.key} {operation}", refresh=False)
                        for state, sample in self.measure(contender, operation,
                                                          settings.states).items():  # fmt: skip
                            key = (contender.key, operation, state)
                            results.samples.setdefault(key, []).append(sample)
                        bar.update(1)

    def run_checks(self, contenders: list[Contender], results: Results) -> None:
        with self._bar(len(contenders), "checking sizes in every view") as bar:
            for contender in contenders:
                results.checks[contender.key] = self.check(contender)
                bar.update(1)


def sources_for(bench: Bench, count: int) -> dict[str, Path]:
    settings = bench.settings
    if settings.source is not None:
        bench.adopt_source(settings.source)
        return {"source": settings.source}
    wanted = ["passthrough", *[p for p in settings.providers if p != "passthrough"]]
    return {provider: bench.build_source(provider, count) for provider in wanted}


def run_once(settings: Settings, scratch: Scratch) -> Results:
    bench = Bench(settings, scratch)
    sources = sources_for(bench, settings.files)
    contenders = bench.contenders(sources)
    entries = next(iter(bench.views.values())).entries
    results = Results(settings, contenders, entries)
    bench.run_matrix(contenders, results)
    bench.run_checks(contenders, results)
    results.notes = bench.notes
    results.tree = bench.tree_shape
    return results


@dataclass
class ScalePoint:
    files: int
    results: Results


def run_scale(settings: Settings, counts: list[int], scratch: Scratch) -> list[ScalePoint]:
    """The first listing (and, unless --states says otherwise, cold) per file count; the
    sources of one count are removed before the next is built."""
    points = []
    for count in counts:
        bench = Bench(settings, scratch)
        sources = sources_for(bench, count)
        contenders = bench.contenders(sources)
        entries = next(iter(bench.views.values())).entries
        results = Results(settings, contenders, entries)
        bench.run_matrix(contenders, results, f" {count} files")
        results.notes = bench.notes
        results.tree = bench.tree_shape
        points.append(ScalePoint(count, results))
        for source in sources.values():
            if settings.source is None:
                _remove_tree(source)
    return points


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- summaries


@dataclass
class Cell:
    """The medians of one (contender, operation, state)."""

    contender: str
    operation: str
    state: str
    seconds: float
    samples: int
    entries: int
    requests_per_entry: float | None = None
    us_per_request: float | None = None
    size_hit_ratio: float | None = None
    kinds_per_entry: dict[str, float] = field(default_factory=dict)
    ratios: dict[str, float | None] = field(default_factory=dict)

    @property
    def served_by(self) -> str:
        """Kernel caches or round trips to the daemon, from the requests actually counted."""
        if self.requests_per_entry is None:
            return "no-FUSE"
        if self.requests_per_entry < 0.1:
            return "kernel"
        if self.requests_per_entry < 0.9:
            return "partly-kernel"
        return "daemon"


def summarise(results: Results) -> dict[tuple[str, str, str], Cell]:
    cells: dict[tuple[str, str, str], Cell] = {}
    for (contender, operation, state), samples in results.samples.items():
        entries = samples[0].entries
        cell = Cell(contender, operation, state, statistics.median(s.seconds for s in samples),
                    len(samples), entries)  # fmt: skip
        counted = [s.counters for s in samples if s.counters is not None]
        if counted:
            cell.requests_per_entry = statistics.median(c.requests / entries for c in counted)
            per_request = [c.seconds / c.requests * 1e6 for c in counted if c.requests]
            cell.us_per_request = statistics.median(per_request) if per_request else None
            kinds = {name for c in counted for name in c.operations}
            cell.kinds_per_entry = {
                name: statistics.median(c.operations.get(name, (0, 0.0))[0] / entries
                                        for c in counted)
                for name in sorted(kinds)
            }  # fmt: skip
            ratios = []
            for c in counted:
                sizes = c.size_cache or {}
                asked = sizes.get("hits", 0) + sizes.get("misses", 0)
                if asked:
                    ratios.append(sizes.get("hits", 0) / asked)
            cell.size_hit_ratio = statistics.median(ratios) if ratios else None
        cells[(contender, operation, state)] = cell
    for (_contender, operation, state), cell in cells.items():
        for base in BASES:
            other = cells.get((base, operation, state))
            cell.ratios[base] = cell.seconds / other.seconds if other and other.seconds else None
    return cells
