"""`isofs bench` and its fair baseline, the minimal pyfuse3 passthrough.

The benchmark runs for real (`--quick`, a few hundred files) with every built-in provider and
every contender; the tests assert what it printed and saved (structure, ratios recomputed from
the printed times, its own size checks), never a timing. They also check that it leaves nothing
behind, after a normal run and after SIGINT or SIGTERM in the middle.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    fuse_unavailable,
    mounted_at,
    mounts_under,
    processes_naming,
    run_isofs,
    wait_until,
)

from isofs.bench.runner import OPERATIONS, STATES, builtin_providers
from isofs.daemon import runtime

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
]

BENCH_TIMEOUT = 600.0
ROOT = os.geteuid() == 0


def expected_contenders(providers: list[str]) -> list[str]:
    keys = ["native", "minimal", "passthrough"]
    for provider in providers:
        if provider != "passthrough":
            keys.append(provider)
        if ROOT:
            keys.append(f"{provider}/2v-target")
        keys.append(f"{provider}/2v-native")
    return keys


def assert_nothing_left(workdir: Path) -> None:
    assert mounts_under(workdir) == []
    assert wait_until(lambda: processes_naming(workdir) == [], timeout=10)
    leftovers = [p.name for p in workdir.iterdir() if p.name.startswith("isofs-bench-")]
    assert leftovers == [], "the scratch directory was not removed"


def bench(*args: str | os.PathLike[str], timeout: float = BENCH_TIMEOUT,
          **kwargs: Any) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return run_isofs("bench", "--no-progress", *args, timeout=timeout, **kwargs)


# ------------------------------------------------------------------- the printed table


@dataclass
class Row:
    operation: str
    state: str
    contender: str
    time_ms: float
    ratios: dict[str, float | None]
    requests_per_entry: float | None
    served_by: str


def parse_table(text: str) -> list[Row]:
    """The rows of every `== operation: ... ==` block."""
    names = {label: key for key, (label, _) in OPERATIONS.items()}
    rows: list[Row] = []
    operation = None
    for line in text.splitlines():
        block = re.match(r"^== (.+?): .* ==$", line)
        if block:
            operation = names.get(block.group(1))
            continue
        if operation is None or not line.strip():
            operation = None if not line.strip() else operation
            continue
        fields = line.split()
        if fields[0] == "state":
            continue
        ratio = [None if f == "-" else float(f.rstrip("x")) for f in fields[3:6]]
        rows.append(Row(operation, fields[0], fields[1], float(fields[2]),
                        dict(zip(("native", "minimal", "passthrough"), ratio, strict=True)),
                        None if fields[6] == "-" else float(fields[6]), fields[9]))  # fmt: skip
    return rows


def ratio_bounds(time_a: float, time_b: float) -> tuple[float, float]:
    """What a/b can be, given both were printed rounded to 0.01 ms."""
    half = 0.005
    return (time_a - half) / (time_b + half), (time_a + half) / max(time_b - half, 1e-9)


# -------------------------------------------------------------------- one quick run


@dataclass
class QuickRun:
    workdir: Path
    result: subprocess.CompletedProcess[str]
    document: dict[str, Any]
    plot: Path


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    workdir = tmp_path_factory.mktemp("bench")
    out = tmp_path_factory.mktemp("bench-out")
    result = bench("--quick", "--workdir", workdir, "--json", out / "bench.json",
                   "--plot", out / "bench.png")  # fmt: skip
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    document = json.loads((out / "bench.json").read_text())
    return QuickRun(workdir, result, document, out / "bench.png")


def test_quick_run_prints_every_contender_state_and_operation(quick: QuickRun) -> None:
    rows = parse_table(quick.result.stdout)
    wanted = expected_contenders(builtin_providers())
    seen = {(r.operation, r.state, r.contender) for r in rows}
    for operation in OPERATIONS:
        for state in STATES:
            for contender in wanted:
                assert (operation, state, contender) in seen, (operation, state, contender)
    assert len(rows) == len(seen) == len(OPERATIONS) * len(STATES) * len(wanted)
    for contender in wanted:  # each one is described in the header
        assert re.search(rf"^  {re.escape(contender)} +\S", quick.result.stdout, re.M)
    assert "Traceback" not in quick.result.stderr


def test_quick_run_ratios_are_the_printed_times_divided(quick: QuickRun) -> None:
    rows = parse_table(quick.result.stdout)
    times = {(r.operation, r.state, r.contender): r.time_ms for r in rows}
    checked = 0
    for row in rows:
        for base, ratio in row.ratios.items():
            base_time = times[(row.operation, row.state, base)]
            assert ratio is not None
            low, high = ratio_bounds(row.time_ms, base_time)
            assert low - 0.005 - 1e-9 <= ratio <= high + 0.005 + 1e-9, (row, base, base_time)
            checked += 1
        if row.contender in ("native", "minimal", "passthrough"):
            assert row.ratios[row.contender] == 1.0
    assert checked == 3 * len(rows)


def test_quick_run_reports_requests_and_who_served_them(quick: QuickRun) -> None:
    for row in parse_table(quick.result.stdout):
        if row.contender == "native":
            assert row.requests_per_entry is None and row.served_by == "no-FUSE"
            continue
        assert row.requests_per_entry is not None and row.requests_per_entry >= 0
        expected = ("kernel" if row.requests_per_entry < 0.1 else "partly-kernel"
                    if row.requests_per_entry < 0.9 else "daemon")  # fmt: skip
        # Printed rounded to 0.01: only a value right at a threshold could be ambiguous.
        if round(row.requests_per_entry, 2) not in (0.1, 0.9):
            assert row.served_by == expected, row
        two_view = row.contender.endswith(("/2v-target", "/2v-native"))
        if two_view and row.operation in ("scandir", "stat", "du"):  # a LOOKUP per file stat
            assert row.requests_per_entry >= 0.9, row
    assert "served-by:" in quick.result.stdout


def test_quick_run_checked_sizes_in_every_view(quick: QuickRun) -> None:
    wanted = expected_contenders(builtin_providers())
    tree = quick.document["tree"]
    files = tree["files"] + tree["hard_links"]
    assert tree["hard_links"] > 0 and tree["directories"] > 1
    for contender in wanted:
        check = quick.document["checks"][contender]
        assert check["ok"], (contender, check)
        for state in ("first", "cold"):
            assert check[state]["files"] == files and check[state]["problems"] == 0
        assert re.search(rf"^  {re.escape(contender)} +ok \({files} files\)$",
                         quick.result.stdout, re.M), contender  # fmt: skip


def test_quick_run_json(quick: QuickRun) -> None:
    document = quick.document
    wanted = expected_contenders(builtin_providers())
    assert document["format"] == "isofs-bench/1"
    assert document["settings"]["repeat"] == 1
    assert document["settings"]["operations"] == list(OPERATIONS)
    assert document["settings"]["states"] == list(STATES)
    assert [c["key"] for c in document["contenders"]] == wanted
    assert document["entries"] == (document["tree"]["files"] + document["tree"]["hard_links"]
                                   + document["tree"]["directories"])  # fmt: skip
    cells = {(r["contender"], r["operation"], r["state"]): r for r in document["results"]}
    assert len(cells) == len(wanted) * len(OPERATIONS) * len(STATES)
    for (contender, operation, state), cell in cells.items():
        assert len(cell["samples"]) == 1
        sample = cell["samples"][0]
        assert cell["seconds"] == sample["seconds"] > 0
        assert sample["entries"] == document["entries"] or operation == "stat"
        for base in ("native", "minimal", "passthrough"):
            base_seconds = cells[(base, operation, state)]["seconds"]
            assert cell["ratios"][base] == pytest.approx(cell["seconds"] / base_seconds)
        if contender == "native":
            assert "requests" not in sample and cell["requests_per_entry"] is None
            continue
        kinds = sample["operations"]
        assert sample["requests"] == sum(k["count"] for k in kinds.values())
        assert sample["requests"] > 0 or (operation, state) == ("stat", "warm")
        assert cell["requests_per_entry"] == pytest.approx(sample["requests"] / cell["entries"])
        if operation != "stat":  # a listing opens and reads directories
            assert kinds["opendir"]["count"] >= document["tree"]["directories"]
            assert kinds["readdir"]["count"] >= document["tree"]["directories"]
        if contender != "minimal" and not contender.endswith("/2v-native"):
            hits = cell["size_hit_ratio"]
            assert hits is None or 0.0 <= hits <= 1.0
    assert document["environment"]["cpus"] == os.cpu_count()


def test_quick_run_draws_its_plot(quick: QuickRun) -> None:
    data = quick.plot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # five panels of bars and labels, not an empty canvas


def test_quick_run_leaves_nothing_behind(quick: QuickRun) -> None:
    assert_nothing_left(quick.workdir)


# ------------------------------------------------------------------------ interrupted


def _start(workdir: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "isofs", "bench", "--no-progress", "--workdir",
               str(workdir), *args]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    ("signum", "when"),
    [(signal.SIGINT, "mnt-minimal"), (signal.SIGTERM, "mnt-build")],
    ids=["sigint-while-measuring", "sigterm-while-building"],
)
def test_interrupted_run_unmounts_and_removes_everything(
    tmp_path: Path, signum: int, when: str
) -> None:
    process = _start(tmp_path, "--quick")
    try:
        def reached() -> bool:
            return any(when in m for m in mounts_under(tmp_path)) or process.poll() is not None

        assert wait_until(reached, timeout=240, step=0.005), "the run never got there"
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)  # inside the step, not at its edge
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert stdout == ""
    assert_nothing_left(tmp_path)
    for record in runtime.runtime_dir().glob("*.json"):
        try:  # other mounts come and go meanwhile
            text = record.read_text()
        except FileNotFoundError:
            continue
        assert str(tmp_path) not in text, "a mount record was left behind"


# ------------------------------------------------------------------- other run modes


def test_scale_measures_first_listings_per_size(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    plot = tmp_path / "scale.png"
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = bench("--quick", "--scale", "60,120", "--providers", "passthrough",
                   "--ops", "scandir", "--states", "first", "--workdir", workdir,
                   "--json", out, "--plot", plot)  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    assert [point["files"] for point in document["scale"]] == [60, 120]
    for point in document["scale"]:
        assert point["tree"]["files"] == point["files"]
        assert {r["state"] for r in point["results"]} == {"first"}
        assert {r["contender"] for r in point["results"]} == set(
            expected_contenders(["passthrough"])
        )
    growth = re.findall(r"^scandir\+stat +first +(\S+) +([\d.]+) +([\d.]+) +([\d.]+)x$",
                        result.stdout, re.M)  # fmt: skip
    assert {g[0] for g in growth} == set(expected_contenders(["passthrough"]))
    for _name, small, large, ratio in growth:
        low = (float(large) - 0.005) / (float(small) + 0.005)
        high = (float(large) + 0.005) / (float(small) - 0.005)
        assert low - 0.005 <= float(ratio) <= high + 0.005
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_nothing_left(workdir)


def test_existing_source(tmp_path: Path, mount_factory, isofs_cli) -> None:  # type: ignore[no-untyped-def]
    source = tmp_path / "mine"
    source.mkdir()
    passfile = tmp_path / "pass"
    passfile.write_text("a passphrase\n")
    init = isofs_cli("init", source, "--provider", "encrypt", "--passfile", passfile)
    assert init.returncode == 0, init.stderr
    mount = mount_factory(source, None, "--default-view", "target", "--no-exec",
                          "--passfile", passfile)  # fmt: skip
    (mount.at("sub")).mkdir()
    for index in range(40):
        (mount.at("sub" if index % 2 else "", f"f{index}")).write_bytes(b"x" * (index * 301))
    assert mount.umount().returncode == 0
    before = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()
              and not p.name.startswith("sizecache.db")}  # fmt: skip
    workdir = tmp_path / "work"
    workdir.mkdir()
    out = tmp_path / "source.json"
    result = bench("--quick", "--source", source, "--passfile", passfile, "--ops", "scandir",
                   "--states", "first", "--workdir", workdir, "--json", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    document = json.loads(out.read_text())
    keys = [c["key"] for c in document["contenders"]]
    assert keys == ["native", "minimal", "passthrough", "source",
                    *(["source/2v-target"] if ROOT else []), "source/2v-native"]  # fmt: skip
    assert document["tree"]["files"] == 40
    assert all(check["ok"] and check["first"]["files"] == 40
               for check in document["checks"].values())  # fmt: skip
    assert "isofs, encrypt, one-view target mount" in result.stdout
    after = {p: p.read_bytes() for p in source.rglob("*") if p.is_file()
             and not p.name.startswith("sizecache.db")}  # fmt: skip
    assert after == before, "the benchmark changed the source"
    assert_nothing_left(workdir)

    # A failure (here: a wrong passphrase at the first mount) is one line, and cleaned up.
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    result = bench("--quick", "--source", source, "--passfile", wrong, "--workdir", workdir)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("isofs: error: source: isofs mount failed: ")
    assert_nothing_left(workdir)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ops", "scandir,tar"], "unknown operation 'tar'"),
        (["--states", "hot"], "unknown state 'hot'"),
        (["--providers", "nosuch"], "unknown provider 'nosuch'"),
        (["--source", "/nonexistent/isofs-bench"], "not a directory"),
        (["--source", "."], "not an isofs source"),
        (["--passfile", "/nonexistent/pass"], "no such file"),
        (["--workdir", "/nonexistent/isofs-bench"], "not a directory"),
        (["--json", "/nonexistent/dir/out.json"], "no such directory"),
        (["--files", "0"], "must be positive"),
        (["--files", "many"], "not a number"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    result = bench(*args, cwd=tmp_path, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isofs: error: "), result.stderr
    assert message in lines[0]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------- the minimal passthrough


@dataclass
class MinimalMount:
    source: Path
    mnt: Path
    process: subprocess.Popen[bytes]
    stats: Path

    def counters(self) -> dict[str, dict[str, float]]:
        with contextlib.suppress(FileNotFoundError):
            self.stats.unlink()
        self.process.send_signal(signal.SIGUSR1)
        assert wait_until(self.stats.exists, timeout=10)
        return json.loads(self.stats.read_text())["operations"]


@pytest.fixture
def minimal(tmp_path: Path) -> Iterator[MinimalMount]:
    """The baseline mounted over tmp_path/src; unmounted and stopped whatever happens."""
    source, mnt = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    stats = tmp_path / "stats.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "isofs.bench.minimal", source, mnt, "--stats", stats],
        stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert wait_until(lambda: mounted_at(mnt) or process.poll() is not None, timeout=30)
        assert mounted_at(mnt), process.communicate()[1]
        yield MinimalMount(source, mnt, process, stats)
    finally:
        if mounted_at(mnt):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()  # type: ignore[union-attr]


LIST_SIZES = (
    "import json, os, sys\n"
    "out = {}\n"
    "for top, dirs, files in os.walk(sys.argv[1]):\n"
    "    for name in dirs + files:\n"
    "        path = os.path.join(top, name)\n"
    "        out[os.path.relpath(path, sys.argv[1])] = os.lstat(path).st_size\n"
    "print(json.dumps(out))\n"
)


def test_minimal_lists_a_large_directory_completely(minimal: MinimalMount, run_python) -> None:  # type: ignore[no-untyped-def]
    big = minimal.source / "big"
    big.mkdir()
    for index in range(5000):
        (big / f"entry-{index:05d}-{'x' * (index % 40)}").write_bytes(b"y" * (index % 997))
    os.link(big / "entry-00007-xxxxxxx", minimal.source / "hard-link")
    (minimal.source / "dir").mkdir()
    (minimal.source / "dir" / "inner").write_bytes(b"z" * 123)
    expected = json.loads(run_python(LIST_SIZES, minimal.source).stdout)
    assert len(expected) == 5000 + 4
    listed = json.loads(run_python(LIST_SIZES, minimal.mnt).stdout)
    assert listed == expected
    assert os.stat(minimal.mnt / "hard-link").st_nlink == 2
    counters = minimal.counters()
    assert counters["opendir"]["count"] >= 3 and counters["readdir"]["count"] >= 3
    assert all(c["total_s"] >= 0 for c in counters.values())


SNAPSHOT_READ = (
    "import json, os, sys\n"
    "it = os.scandir(sys.argv[1])\n"
    "seen = [next(it).name for _ in range(100)]\n"
    "print('half', flush=True)\n"
    "sys.stdin.readline()\n"
    "seen += [e.name for e in it]\n"
    "print(json.dumps(seen))\n"
)


def test_minimal_readdir_is_one_snapshot_per_opendir(minimal: MinimalMount) -> None:
    # Entries created or removed while a listing is read neither appear nor vanish in it,
    # and none is listed twice: offsets are positions in the opendir's snapshot.
    names = [f"n{index:04d}" for index in range(3000)]
    for name in names:
        (minimal.source / name).touch()
    reader = subprocess.Popen([sys.executable, "-c", SNAPSHOT_READ, minimal.mnt],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "half"
        for index in range(500):
            (minimal.source / f"new{index:04d}").touch()
        for name in names[-500:]:
            (minimal.source / name).unlink()
        stdout, _ = reader.communicate("go\n", timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    seen = json.loads(stdout.splitlines()[-1])
    assert len(seen) == len(set(seen)) == len(names)
    assert sorted(seen) == names
    after = sorted(os.listdir(minimal.mnt))  # a new opendir sees the directory as it is now
    assert after == sorted(names[:-500] + [f"new{index:04d}" for index in range(500)])


def test_minimal_writes_its_counters_at_exit(minimal: MinimalMount) -> None:
    (minimal.source / "file").write_bytes(b"abc")
    assert (minimal.mnt / "file").read_bytes() == b"abc"
    subprocess.run(["fusermount3", "-u", minimal.mnt], check=True)
    minimal.process.wait(timeout=10)
    counters = json.loads(minimal.stats.read_text())["operations"]
    assert counters["lookup"]["count"] >= 1
    assert counters["open"]["count"] == 1 and counters["read"]["count"] >= 1
