"""The S3 chunk store against a real S3 engine (Ceph's RADOS Gateway, started by the
``s3_engine`` fixture on 127.0.0.1; no mock): the shared store behaviour, background uploads,
a pack that survives a kill before its upload, and the engine stopped and restarted under
load."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import dedup_store_checks as checks
import pytest

from isofs.provider import CorruptData
from isofs_providers.dedup.store import MissingChunk, PackedStore
from isofs_providers.dedup.store.s3 import S3Store

BUCKET = "isofs-tests"


@pytest.fixture
def prefix() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def open_store(s3: Any, tmp_path: Path, prefix: str):  # type: ignore[no-untyped-def]
    opened: list[PackedStore] = []

    def open_(name: str = "a", **options: Any) -> S3Store:
        options.setdefault("close_timeout", 20.0)
        store = S3Store(
            BUCKET, f"{prefix}/{name}", s3.endpoint_url, staging=tmp_path / name / "dedup",
            **options,
        )  # fmt: skip
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def remote_objects(s3: Any, prefix: str) -> dict[str, int]:
    client = s3.client()
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for item in page.get("Contents", []):
            found[item["Key"]] = int(item["Size"])
    return found


def stored_bytes(s3: Any, tmp_path: Path, prefix: str, name: str) -> int:
    """Pack bytes in the bucket plus those still only in the staging directory."""
    remote = remote_objects(s3, f"{prefix}/{name}/packs/")
    local = 0
    packs = tmp_path / name / "dedup" / "packs"
    for path in packs.iterdir() if packs.exists() else []:
        if f"{prefix}/{name}/packs/{path.name}" not in remote:
            local += path.stat().st_size
    return sum(remote.values()) + local


# ------------------------------------------------------------------ shared behaviour


def test_round_trip(open_store) -> None:
    checks.check_round_trip(open_store)


def test_uncommitted_chunks_are_readable(open_store) -> None:
    checks.check_uncommitted_reads(open_store)


def test_identical_chunks_are_stored_once(open_store, s3, tmp_path: Path, prefix: str) -> None:
    checks.check_stored_once(open_store, lambda name: stored_bytes(s3, tmp_path, prefix, name))


def test_gc_frees_unreferenced_and_repacks(open_store, s3, tmp_path: Path, prefix: str) -> None:
    checks.check_gc_frees_and_keeps(
        open_store, lambda name: stored_bytes(s3, tmp_path, prefix, name)
    )


def test_gc_keeps_chunks_referenced_while_it_runs(open_store) -> None:
    checks.check_gc_protects_concurrent_references(open_store)


def test_gc_races_a_writer(open_store) -> None:
    checks.check_gc_race(open_store, rounds=25, seconds=15.0)


def test_statistics_keys(open_store) -> None:
    checks.stats_keys(open_store().statistics())


# ------------------------------------------------------------------ S3 specifics


def test_packs_are_uploaded_in_the_background_and_read_by_range(
    open_store, s3, tmp_path: Path, prefix: str
) -> None:
    store = open_store(pack_size=256 * 1024)
    blobs = [checks.content(i, 50_000 + i) for i in range(20)]
    ids = checks.put_committed(store, blobs)
    assert store.wait_for_uploads(60), store.statistics()
    objects = remote_objects(s3, f"{prefix}/a/")
    packs = {k: v for k, v in objects.items() if "/packs/" in k}
    assert len(packs) >= 3 and f"{prefix}/a/store.json" in objects
    local = {p.name for p in (tmp_path / "a" / "dedup" / "packs").iterdir()}
    assert not local & {k.rsplit("/", 1)[1] for k in packs}  # uploaded copies went
    for chunk_id, blob in zip(ids, blobs, strict=True):
        assert store.get(chunk_id) == blob  # ranged GETs
    stats = store.statistics()
    assert stats["upload_backlog_packs"] == 0 and stats["uploads_done"] >= 3
    assert stats["last_error"] is None
    # nothing about credentials lands in the staging directory
    for path in (tmp_path / "a").rglob("*"):
        if path.is_file():
            assert s3.secret_key.encode() not in path.read_bytes()


def test_encrypted_s3_store_and_a_tampered_object(open_store, s3, prefix: str) -> None:
    key = bytes(range(32))
    store = open_store(key=key, pack_size=64 * 1024)
    blobs = [checks.content(i, 20_000) for i in range(6)]
    ids = checks.put_committed(store, blobs)
    store.seal_open_pack()
    assert store.wait_for_uploads(60)
    client = s3.client()
    row = store.index.locate(ids[0])
    assert row is not None
    object_key = f"{prefix}/a/packs/{row.pack_name}"
    data = bytearray(client.get_object(Bucket=BUCKET, Key=object_key)["Body"].read())
    data[row.offset + row.length - 5] ^= 0x01
    client.put_object(Bucket=BUCKET, Key=object_key, Body=bytes(data))
    with pytest.raises(CorruptData, match=ids[0][:6].hex()):
        store.get(ids[0])
    for chunk_id, blob in zip(ids[1:], blobs[1:], strict=True):
        if store.index.locate(chunk_id).pack_name == row.pack_name:  # type: ignore[union-attr]
            assert store.get(chunk_id) == blob


def test_a_prefix_belongs_to_one_store(open_store, s3, tmp_path: Path, prefix: str) -> None:
    store = open_store()
    checks.put_committed(store, [checks.content(1)])
    store.close()
    with pytest.raises(CorruptData, match="another source"):
        S3Store(BUCKET, f"{prefix}/a", s3.endpoint_url, staging=tmp_path / "intruder")


def test_index_rebuilt_from_the_bucket(open_store, s3, tmp_path: Path, prefix: str) -> None:
    """A new machine with only the bucket: a fresh index adopts the store and rebuilds."""
    store = open_store(pack_size=128 * 1024)
    blobs = [checks.content(i, 30_000) for i in range(12)]
    ids = checks.put_committed(store, blobs)
    store.close()
    fresh = S3Store(
        BUCKET, f"{prefix}/a", s3.endpoint_url, staging=tmp_path / "elsewhere", adopt_existing=True
    )
    try:
        summary = fresh.rebuild_index()
        assert summary["chunks"] == len(ids) and summary["unreadable"] == []
        for chunk_id, blob in zip(ids, blobs, strict=True):
            assert fresh.get(chunk_id) == blob
    finally:
        fresh.close()


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[4])
    import dedup_store_checks as checks
    from isofs_providers.dedup.store.s3 import S3Store

    store = S3Store(sys.argv[1], sys.argv[2], sys.argv[3], staging=sys.argv[5],
                    pack_size=128 * 1024, max_open_age=0)
    blobs = [checks.content(i, 40_000) for i in range(10)]
    checks.put_committed(store, blobs)
    store.seal_open_pack()
    print(store.statistics()["upload_backlog_packs"], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_pack_not_uploaded_survives_a_kill(s3, tmp_path: Path, prefix: str) -> None:
    """The engine is down while a child writes and is killed; the next open (engine up)
    uploads its packs, and their chunks read back from the bucket."""
    staging = tmp_path / "dedup"
    s3.stop_gateway()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, BUCKET, prefix, s3.endpoint_url,
             str(Path(__file__).parent), str(staging)],
            capture_output=True, text=True, timeout=120, env={**os.environ, **s3.environment()},
        )  # fmt: skip
    finally:
        s3.start_gateway()
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert int(proc.stdout.split()[0]) >= 3  # sealed packs waiting for the store
    assert not remote_objects(s3, f"{prefix}/packs/")
    store = S3Store(BUCKET, prefix, s3.endpoint_url, staging=staging)
    try:
        assert store.wait_for_uploads(60), store.statistics()
        assert len(remote_objects(s3, f"{prefix}/packs/")) >= 3
        assert not [p for p in (staging / "packs").iterdir() if len(p.name) == 32]
        for i in range(10):
            blob = checks.content(i, 40_000)
            assert store.get(store.chunk_id(blob)) == blob
    finally:
        store.close()


def test_engine_stopped_and_restarted_under_load(open_store, s3) -> None:
    """Writes keep landing (locally) while the gateway is down and are uploaded once it is
    back; reads of remote-only chunks fail cleanly while it is down and work after."""
    store = open_store(pack_size=128 * 1024, retry_initial=0.2, retry_max=1.0)
    early = [checks.content(i, 30_000) for i in range(12)]
    early_ids = checks.put_committed(store, early)
    store.seal_open_pack()
    assert store.wait_for_uploads(60)
    written: list[tuple[bytes, bytes]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def writer() -> None:
        n = 1000
        try:
            while not stop.is_set() and len(written) < 600:
                blobs = [checks.content(n + k, 20_000) for k in range(4)]
                ids = checks.put_committed(store, blobs)
                written.extend(zip(ids, blobs, strict=True))
                n += 4
                time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.5)
        s3.stop_gateway()
        down_at = len(written)
        started = time.monotonic()
        with pytest.raises(MissingChunk, match="unreachable") as caught:
            store.get(early_ids[0])
        assert early_ids[0][:6].hex() in str(caught.value)
        assert time.monotonic() - started < 15
        time.sleep(2.0)
        stats = store.statistics()
        assert len(written) > down_at  # writes kept landing
        assert stats["upload_backlog_packs"] >= 1 and stats["last_error"], stats
        s3.start_gateway()
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join()
        if not s3.gateway_answers():
            s3.start_gateway()
    assert not errors, errors
    store.seal_open_pack()
    assert store.wait_for_uploads(60), store.statistics()
    assert store.statistics()["upload_backlog_packs"] == 0
    for chunk_id, blob in [*zip(early_ids, early, strict=True), *written]:
        assert store.get(chunk_id) == blob
