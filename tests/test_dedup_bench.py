"""`bench/dedup.py`, the dedup benchmark against borg, run for real with `--quick`.

One quick run (every contender: borg, dedup with the embedded and the S3 store on the local
Ceph engine, the passthrough mount) is checked for the structure of what it printed and saved,
for ratios that are what the saved byte counts give, and for the data it read back through
each isofs mount being the input, file by file; never for a timing. An interrupted run must
leave no mount, daemon, engine or scratch file behind.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import fuse_unavailable, mounts_under, processes_naming, wait_until

from isofs.daemon import runtime

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(fuse_unavailable() is not None, reason=fuse_unavailable() or ""),
]

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "dedup.py"
TREE = Path("/usr/lib/python3.11")  # the script's default tree: the system Python's stdlib
CONTENDERS = ["borg", "borg-default", "dedup", "dedup-s3", "passthrough"]
ISOFS = ["dedup", "dedup-s3", "passthrough"]
ROWS = ["ratio", "ingest-blobs", "ingest-tree", "unmount", "rand-read-4k-warm",
        "rand-read-4k-dropped", "rand-read-4k-cold", "seq-read-cold-blobs",
        "seq-read-cold-tree"]  # fmt: skip
TIMEOUT = 900.0


def start(workdir: Path, *args: str | os.PathLike[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), "--workdir", str(workdir), *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )  # fmt: skip


def assert_nothing_left(workdir: Path) -> None:
    assert mounts_under(workdir) == []
    assert wait_until(lambda: processes_naming(workdir) == [], timeout=10), (
        processes_naming(workdir)
    )
    assert [p.name for p in workdir.iterdir()] == [], "the scratch directory was not removed"
    for record in runtime.runtime_dir().glob("*.json"):
        try:  # other mounts come and go meanwhile
            text = record.read_text()
        except FileNotFoundError:
            continue
        assert str(workdir) not in text, "a mount record was left behind"


@dataclass
class QuickRun:
    workdir: Path
    stdout: str
    stderr: str
    doc: dict[str, Any]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> QuickRun:
    workdir = tmp_path_factory.mktemp("dedup-bench")
    out = tmp_path_factory.mktemp("dedup-bench-out") / "run.json"
    process = start(workdir, "--quick", "--json", out)
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, f"stdout:\n{stdout}\nstderr:\n{stderr}"
    return QuickRun(workdir, stdout, stderr, json.loads(out.read_text()))


def table(stdout: str) -> dict[str, list[str]]:
    """The printed table: row name -> its cells (the header under the key 'row')."""
    lines = stdout.splitlines()
    start_at = next(i for i, line in enumerate(lines) if line.startswith("row "))
    rows = {}
    for line in lines[start_at:]:
        if not line.strip():
            break
        if set(line) == {"-"}:
            continue
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def measured(row: str, contender: str) -> bool:
    """Which contender has which row: borg ingests only, the passthrough stores nothing."""
    if row == "ratio":
        return contender != "passthrough"
    return row.startswith("ingest-") or contender in ISOFS


def test_every_contender_ran_and_leaves_nothing_behind(quick: QuickRun) -> None:
    assert quick.doc["contenders"] == CONTENDERS
    assert quick.doc["errors"] == {}
    assert "Traceback" not in quick.stderr
    assert_nothing_left(quick.workdir)


def test_the_table_has_every_row_and_contender(quick: QuickRun) -> None:
    rows = table(quick.stdout)
    header = rows.pop("row")
    assert header[: 1 + len(CONTENDERS)] == ["unit", *CONTENDERS]
    assert header[1 + len(CONTENDERS):] == ["|", "base", "dedup/base", "dedup-s3/base",
                                            "target", "dedup", "dedup-s3"]  # fmt: skip
    assert list(rows) == ROWS
    for name, cells in rows.items():
        values = dict(zip(CONTENDERS, cells[1 : 1 + len(CONTENDERS)], strict=True))
        for contender, value in values.items():
            assert (value != "-") == measured(name, contender), (name, contender, value)
        verdicts = cells[-2:]
        target = cells[-3]
        if name in ("ratio", "ingest-blobs", "rand-read-4k-warm"):
            assert target.startswith(">="), (name, target)
            assert all(v in ("met", "MISSED") for v in verdicts), (name, verdicts)
        else:
            assert target == "-" and verdicts == ["-", "-"], (name, cells)
    assert "load after the run:" in quick.stdout


def test_medians_ratios_and_verdicts_are_consistent(quick: QuickRun) -> None:
    doc = quick.doc
    samples, medians = doc["samples"], doc["medians"]
    rows = {row["name"]: row for row in doc["rows"]}
    assert list(rows) == ROWS
    for contender in CONTENDERS:
        wanted = [row for row in ROWS if measured(row, contender)]
        assert sorted(samples[contender]) == sorted(wanted), contender
        for row, values in samples[contender].items():
            assert len(values) == doc["repeat"] == 1
            assert values[0] > 0 and medians[contender][row] == values[0]
    assert len(doc["verdicts"]) == 2 * len(ROWS)
    for verdict in doc["verdicts"]:
        row = rows[verdict["row"]]
        mine = medians[verdict["contender"]][row["name"]]
        base = medians[row["base"]][row["name"]]
        expected = mine / base if row["higher_is_better"] else base / mine
        assert verdict["ratio"] == pytest.approx(expected)
        if row["target"] is None:
            assert verdict["met"] is None
        else:
            assert verdict["met"] == (expected >= row["target"])


def test_stored_logical_ratios_are_the_counted_bytes(quick: QuickRun) -> None:
    doc = quick.doc
    logical = doc["dataset"]["logical_bytes"]
    assert logical == sum(doc["dataset"]["part_bytes"].values())
    for borg in ("borg", "borg-default"):
        (rep,) = doc["details"][borg]["repetitions"]
        assert rep["total_size"] == logical  # borg read the same bytes
        assert doc["samples"][borg]["ratio"] == [pytest.approx(logical / rep["unique_csize"])]
    for dedup in ("dedup", "dedup-s3"):
        (rep,) = doc["details"][dedup]["repetitions"]
        stats = rep["dedup_stats"]
        assert stats["logical_bytes"] == logical
        assert stats["manifests"] == sum(doc["dataset"]["part_files"].values())
        assert rep["counted_bytes"] == stats["stored_bytes"] + rep["native_file_bytes"]
        assert doc["samples"][dedup]["ratio"] == [pytest.approx(logical / rep["counted_bytes"])]
        # Shared content is stored once: far less than the data set, in either store.
        assert stats["stored_bytes"] < logical / 2
    s3 = doc["details"]["dedup-s3"]["repetitions"][0]
    assert s3["upload_backlog_packs"] == 0
    assert s3["local_packs_before_cold_reads"] == 0  # the cold reads were ranged GETs


def test_the_data_set_is_what_it_claims(quick: QuickRun) -> None:
    data = quick.doc["dataset"]
    digests, scale = data["digests"], quick.doc["scale"]
    versions = [f"v{n}" for n in range(1, scale["versions"] + 1)]
    per_version = {v: {p.split("/", 2)[2]: d for p, d in digests.items()
                       if p.startswith(f"tree/{v}/")} for v in versions}  # fmt: skip
    files = per_version["v1"]
    assert len(files) == scale["tree_files"]
    for rel, digest in files.items():  # v1 is the tree itself
        assert hashlib.sha256((TREE / rel).read_bytes()).hexdigest() == digest, rel
    for previous, version in itertools.pairwise(versions):
        edited = set(data["edited"][version])
        assert len(edited) == max(1, round(scale["edit_share"] * len(files)))
        changed = {rel for rel in files if per_version[version][rel] != per_version[previous][rel]}
        assert changed == edited, version
    assert set(per_version[versions[-1]]) == set(files)
    assert {p for p in digests if p.startswith("blobs/")} == {"blobs/blob.bin",
                                                              "blobs/blob-shifted.bin"}
    assert data["part_bytes"]["blobs"] == 2 * scale["blob_bytes"] + scale["shift"]
    assert len(data["links"]) == data["symlinks"] > 0


def test_data_read_back_through_isofs_equals_the_input(quick: QuickRun) -> None:
    expected = quick.doc["dataset"]["digests"]
    for contender in ISOFS:
        assert quick.doc["readback"][contender] == expected, contender
        (rep,) = quick.doc["details"][contender]["repetitions"]
        check = rep["verify"]
        assert check["ok"] and check["files"] == len(expected)
        assert check["symlinks"] == len(quick.doc["dataset"]["links"])
        assert check["bytes"] == quick.doc["dataset"]["logical_bytes"]
        assert re.search(rf"^  {re.escape(contender)} .*read back {len(expected)} files and "
                         r"\d+ symlinks: all equal to the input$", quick.stdout, re.M)  # fmt: skip


def test_interrupted_run_stops_mounts_daemons_and_the_engine(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    process = start(workdir, "--quick", "--contenders", "dedup-s3")

    def mounted() -> bool:
        return any("mnt-dedup-s3" in m for m in mounts_under(workdir)) or (
            process.poll() is not None
        )

    try:
        assert wait_until(mounted, timeout=300, step=0.01), "the run never mounted"
        assert process.poll() is None, process.communicate()
        assert any("ceph.conf" in str(Path(f"/proc/{pid}/cmdline").read_bytes())
                   for pid in processes_naming(workdir)), "the engine is not running"  # fmt: skip
        time.sleep(0.5)  # into the ingest
        process.send_signal(signal.SIGINT)
        _stdout, stderr = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert_nothing_left(workdir)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--contenders", "dedup,rsync"], "unknown contender(s) rsync"),
        (["--repeat", "0"], "--repeat must be >= 1"),
        (["--tree", "/nonexistent/tree"], "not a directory"),
    ],
)
def test_bad_input_is_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    process = start(tmp_path, *args)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 2
    assert stderr.count("\n") == 1 and stderr.startswith("isofs: error: ") and message in stderr
    assert stdout == "" and list(tmp_path.iterdir()) == []
