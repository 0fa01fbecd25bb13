"""What `isofs bench` prints, saves (--json) and draws (--plot)."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from dataclasses import asdict
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from isofs.bench.runner import (
    BASES,
    OPERATIONS,
    STATES,
    Cell,
    Results,
    ScalePoint,
    summarise,
)

#: Request kinds shown per entry in the table, in this order, with short names.
KIND_NAMES = {"lookup": "lookup", "getattr": "getattr", "readdir": "readdir",
              "getxattr": "getxattr", "opendir": "opendir", "releasedir": "releasedir",
              "open": "open", "read": "read", "release": "release"}  # fmt: skip
SERVED_BY = (
    "served-by: kernel = under 0.1 FUSE requests per entry (the kernel's dentry and attribute "
    "caches answer); daemon = at least ~1 round trip to the daemon per entry; partly-kernel = "
    "in between; no-FUSE = the native directory"
)


def environment(scratch: Path, load_before: tuple[float, float, float]) -> dict[str, Any]:
    """What the figures depend on, for the header and the JSON file."""

    def package(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    commit = "?"
    here = Path(__file__).resolve().parent
    result = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True)  # fmt: skip
    if result.returncode == 0:
        commit = result.stdout.strip()
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyfuse3": package("pyfuse3"),
        "isofs": package("isofs"),
        "commit": commit,
        "root": os.geteuid() == 0,
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
        "scratch": str(scratch),
        "scratch_fs": _filesystem_of(scratch),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _filesystem_of(path: Path) -> str:
    from isofs.mountinfo import mount_table

    best, fstype = "", "?"
    text = str(path)
    for entry in mount_table():
        point = entry.mountpoint.rstrip("/") + "/"
        if (text + "/").startswith(point) and len(point) > len(best):
            best, fstype = point, entry.fstype
    return fstype


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def header(results: Results, env: dict[str, Any]) -> list[str]:
    settings = results.settings
    shape = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in results.tree.items())
    busy = max(env["load_before"][0], env["load_after"][0]) > (env["cpus"] or 1) * 0.5
    lines = [
        f"isofs bench: enumeration overhead over {results.entries:,} entries ({shape}); "
        f"{settings.repeat} repetition(s), medians",
        f"machine: Linux {env['kernel']}, {env['cpus']} CPUs, Python {env['python']}, pyfuse3 "
        f"{env['pyfuse3']}, isofs {env['isofs']} ({env['commit']}); load average "
        f"{env['load_before'][0]:.1f} -> {env['load_after'][0]:.1f}"
        + (" (the machine was busy: figures are indicative)" if busy else ""),
        f"scratch: {env['scratch']} ({env['scratch_fs']})",
        *(f"note: {n}" for n in results.notes),
        "",
        "contenders:",
        *(f"  {c.key:22} {c.label}" for c in results.contenders),
        "states:",
        *(f"  {k:6} {v}" for k, v in STATES.items() if k in settings.states),
    ]
    return lines


def table(results: Results, cells: dict[tuple[str, str, str], Cell],
          legend: bool = True) -> list[str]:  # fmt: skip
    """One block per operation; one row per (state, contender)."""
    lines: list[str] = []
    columns = ("state", "contender", "time_ms", "x_native", "x_minimal", "x_passthrough",
               "req/entry", "us/req", "size_hits", "served_by")  # fmt: skip
    widths = (6, 22, 10, 9, 10, 14, 10, 7, 10, 14)
    for operation in results.settings.operations:
        name, what = OPERATIONS[operation]
        lines += ["", f"== {name}: {what} =="]
        lines.append(" ".join(f"{c:>{w}}" if i > 1 else f"{c:{w}}"
                              for i, (c, w) in enumerate(zip(columns, widths, strict=True)))
                     + "  requests/entry by kind")  # fmt: skip
        for state in results.settings.states:
            for contender in results.contenders:
                cell = cells.get((contender.key, operation, state))
                if cell is None:
                    continue
                values = (state, contender.key, _ms(cell.seconds),
                          *(_ratio(cell.ratios.get(base)) for base in BASES),
                          _num(cell.requests_per_entry), _num(cell.us_per_request, 1),
                          _percent(cell.size_hit_ratio), cell.served_by)  # fmt: skip
                kinds = " ".join(f"{KIND_NAMES.get(k, k)} {v:.2f}"
                                 for k, v in cell.kinds_per_entry.items()
                                 if v >= 0.005)  # fmt: skip
                lines.append(" ".join(f"{v:>{w}}" if i > 1 else f"{v:{w}}"
                                      for i, (v, w) in enumerate(zip(values, widths, strict=True)))
                             + (f"  {kinds}" if kinds else ""))  # fmt: skip
    if not legend:
        return lines
    lines += ["", SERVED_BY,
              "x_BASE = this time / BASE's time in the same operation and state (1.00x: the "
              "same, 2.00x: twice as long); passthrough = the isofs passthrough mount",
              "us/req = time inside the daemon's handlers per request (the round trip adds the "
              "kernel's and the reader's share)"]  # fmt: skip
    return lines


def at_a_glance(results: Results, cells: dict[tuple[str, str, str], Cell]) -> list[str]:
    states = results.settings.states
    lines = ["", f"at a glance: time / passthrough mount ({', '.join(states)})"]
    width = max(6 * len(states), 14)
    lines.append(f"{'contender':22}" + "".join(f"{OPERATIONS[o][0]:>{width + 2}}"
                                              for o in results.settings.operations))  # fmt: skip
    for contender in results.contenders:
        row = f"{contender.key:22}"
        for operation in results.settings.operations:
            parts = []
            for state in states:
                cell = cells.get((contender.key, operation, state))
                ratio = cell.ratios.get("passthrough") if cell else None
                parts.append("-" if ratio is None else f"{ratio:.2f}")
            row += f"{' '.join(parts):>{width + 2}}"
        lines.append(row)
    return lines


def checks(results: Results) -> list[str]:
    lines = ["", "size check, per contender, after a first listing and after a remount: listed "
             "size = stat = open+fstat = bytes read = size written (and the bytes themselves "
             "where known)"]  # fmt: skip
    for contender in results.contenders:
        check = results.checks.get(contender.key)
        if check is None:
            continue
        files = check["first"]["files"]
        if check["ok"]:
            lines.append(f"  {contender.key:22} ok ({files} files)")
            continue
        problems = [*check["first"]["examples"], *check["cold"]["examples"]][:3]
        count = check["first"]["problems"] + check["cold"]["problems"]
        lines.append(f"  {contender.key:22} FAILED ({count} problems): " + "; ".join(problems))
    return lines


def render(results: Results, env: dict[str, Any]) -> str:
    cells = summarise(results)
    return "\n".join([*header(results, env), *table(results, cells),
                      *at_a_glance(results, cells), *checks(results)])  # fmt: skip


def scale_table(points: list[ScalePoint]) -> list[str]:
    """Time per listed entry by file count, and how it grows from the smallest count."""
    first = points[0].results
    counts = [p.files for p in points]
    summaries = [summarise(p.results) for p in points]
    listed = ", ".join(map(str, counts))
    lines = ["", f"== scale: time per entry in us, by number of files ({listed}) =="]
    lines.append(f"{'operation':14}{'state':7}{'contender':22}"
                 + "".join(f"{f'N={n}':>12}" for n in counts) + f"{'growth':>9}")  # fmt: skip
    for operation in first.settings.operations:
        for state in first.settings.states:
            for contender in first.contenders:
                per_entry = []
                for summary in summaries:
                    cell = summary.get((contender.key, operation, state))
                    per_entry.append(cell.seconds / cell.entries * 1e6 if cell else None)
                if all(v is None for v in per_entry):
                    continue
                growth = (per_entry[-1] / per_entry[0]
                          if per_entry[0] and per_entry[-1] is not None else None)  # fmt: skip
                lines.append(f"{OPERATIONS[operation][0]:14}{state:7}{contender.key:22}"
                             + "".join(f"{_num(v):>12}" for v in per_entry)
                             + f"{_ratio(growth):>9}")  # fmt: skip
    lines.append("growth = time per entry at the largest N / at the smallest N (1.00x: linear)")
    return lines


def render_scale(points: list[ScalePoint], env: dict[str, Any]) -> str:
    lines = header(points[-1].results, env)
    for point in points:
        cells = summarise(point.results)
        lines += ["", f"-- {point.files} files --", *table(point.results, cells, legend=False)]
    return "\n".join(lines + scale_table(points) + ["", SERVED_BY])


# ----------------------------------------------------------------------------- JSON


def as_json(results: Results, env: dict[str, Any]) -> dict[str, Any]:
    cells = summarise(results)
    settings = results.settings
    contenders = [
        {"key": c.key, "label": c.label, "kind": c.kind, "view": c.view, "provider": c.provider,
         "two_view": c.kind == "isofs" and not c.mount_args}
        for c in results.contenders
    ]  # fmt: skip
    rows = [
        {**asdict(cell), "served_by": cell.served_by,
         "samples": [s.as_json() for s in results.samples[key]]}
        for key, cell in cells.items()
    ]  # fmt: skip
    return {
        "format": "isofs-bench/1",
        "environment": env,
        "settings": {
            "files": settings.files,
            "repeat": settings.repeat,
            "operations": settings.operations,
            "states": settings.states,
            "providers": settings.providers,
            "source": str(settings.source) if settings.source else None,
        },
        "tree": results.tree,
        "entries": results.entries,
        "notes": results.notes,
        "contenders": contenders,
        "results": rows,
        "checks": results.checks,
    }


def scale_json(points: list[ScalePoint], env: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "isofs-bench/1",
        "environment": env,
        "scale": [{"files": p.files, **{k: v for k, v in as_json(p.results, env).items()
                                        if k not in ("format", "environment")}}
                  for p in points],
    }  # fmt: skip


# ----------------------------------------------------------------------------- plots


def plot(results: Results, path: str) -> None:
    """Grouped bars: one panel per operation, a group per state, a bar per contender; each
    bar says its ratio to the passthrough mount, so the picture reads without the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = summarise(results)
    operations, states = results.settings.operations, results.settings.states
    contenders = [c.key for c in results.contenders]
    width_inches = max(10, 0.3 * len(contenders) * len(states) + 3)
    figure, axes = plt.subplots(len(operations), 1, figsize=(width_inches, 3.2 * len(operations)),
                                squeeze=False)  # fmt: skip
    width = 0.8 / len(contenders)
    palette = plt.get_cmap("tab10" if len(contenders) <= 10 else "tab20")
    colours = [palette(i % palette.N) for i in range(len(contenders))]
    for row, operation in enumerate(operations):
        axis = axes[row][0]
        for index, contender in enumerate(contenders):
            xs, heights, labels = [], [], []
            for group, state in enumerate(states):
                cell = cells.get((contender, operation, state))
                if cell is None:
                    continue
                xs.append(group + (index - (len(contenders) - 1) / 2) * width)
                heights.append(cell.seconds * 1000)
                ratio = cell.ratios.get("passthrough")
                labels.append("" if ratio is None else f"{ratio:.2f}x")
            bars = axis.bar(xs, heights, width, label=contender, color=colours[index])
            axis.bar_label(bars, labels=labels, fontsize=7, rotation=90, padding=2)
        name = OPERATIONS[operation][0]
        axis.set_title(f"{name} ({results.entries:,} entries): bar labels = time / passthrough "
                       "mount", fontsize=10)  # fmt: skip
        axis.set_xticks(range(len(states)), [STATES[s].split(":")[0] for s in states])
        axis.set_ylabel("ms (median)")
        axis.margins(y=0.25)
    axes[0][0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_scale(points: list[ScalePoint], path: str) -> None:
    """Time per entry against N (log x): a flat line is linear growth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = points[0].results
    operations, states = first.settings.operations, first.settings.states
    figure, axes = plt.subplots(1, len(operations), figsize=(6.5 * len(operations), 4.5),
                                squeeze=False)  # fmt: skip
    summaries = [summarise(p.results) for p in points]
    counts = [p.files for p in points]
    for column, operation in enumerate(operations):
        axis = axes[0][column]
        for contender in first.contenders:
            for state in states:
                values = []
                for summary in summaries:
                    cell = summary.get((contender.key, operation, state))
                    values.append(cell.seconds / cell.entries * 1e6 if cell else float("nan"))
                axis.plot(counts, values, marker="o", linestyle="-" if state == "first" else ":",
                          label=f"{contender.key} ({state})")  # fmt: skip
        axis.set_xscale("log")
        axis.set_xlabel("files")
        axis.set_ylabel("us per entry (median)")
        axis.set_title(f"{OPERATIONS[operation][0]}: time per entry against N (flat = linear)",
                       fontsize=10)  # fmt: skip
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
