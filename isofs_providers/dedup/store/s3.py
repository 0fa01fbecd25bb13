"""The S3 chunk store: the same packs as objects `PREFIX/packs/<id>` in an S3-compatible bucket.

`S3Store(bucket, prefix, endpoint_url, staging=meta_dir / "dedup")` (docs/FORMAT-dedup.md,
"S3 store"). The index stays local in `staging`; new packs are written there first, sealed,
and uploaded in the background by a bounded pool of threads; a pack's local copy goes only
after its upload is confirmed (the object's MD5 checked by the server, its size by a HEAD),
so a daemon killed before an upload leaves the pack in `staging/packs/`, and the next open
uploads it. Chunks are read with ranged GETs (`Range: bytes=off-end`), from the local copy
while there is one. An unreachable store: reads of remote-only chunks raise MissingChunk
naming chunk, pack and error; writes keep landing locally; uploads retry with exponential
back-off; `statistics()` shows the backlog and the last error.

Credentials come from boto3's standard chain (AWS_* environment variables, ~/.aws files,
instance roles); nothing about them is written to `staging`. `PREFIX/store.json` names the
store that owns the prefix, so two sources never share (and garbage-collect) one prefix; a
fresh index takes over an existing store only when asked (`adopt_existing`, to rebuild a lost
index from the bucket).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from typing import Any

from isofs.provider import CorruptData

from .codec import DEFAULT_LEVEL
from .index import DELETING, SEALED
from .packed import DEFAULT_PACK_SIZE, PackedStore, RemoteUnavailable

log = logging.getLogger(__name__)

STORE_OBJECT = "store.json"
STORE_FORMAT = "isofs-dedup-packs"


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


class S3Store(PackedStore):
    """Packs in a bucket, index and not-yet-uploaded packs in `staging` (thread-safe)."""

    io_bound = True
    seal_on_close = True

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        *,
        staging: str | os.PathLike[str],
        key: bytes | None = None,
        level: int = DEFAULT_LEVEL,
        pack_size: int = DEFAULT_PACK_SIZE,
        region: str | None = None,
        upload_threads: int = 2,
        keep_local: bool = False,
        max_open_age: float = 60.0,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        close_timeout: float = 30.0,
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        create_bucket: bool = True,
        adopt_existing: bool = False,
    ) -> None:
        import boto3
        from botocore.config import Config

        if not bucket:
            raise ValueError("an S3 store needs a bucket")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.keep_local = keep_local
        self.max_open_age = max_open_age
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.close_timeout = close_timeout
        self.create_bucket = create_bucket
        self.adopt_existing = adopt_existing
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(
                max_pool_connections=upload_threads + 8,
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"max_attempts": 2, "mode": "standard"},
                s3={"addressing_style": "path"},
                # S3-compatible engines (Ceph RGW among them) need the classic checksums
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )
        self._state_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._in_flight: set[int] = set()
        self._failures = 0
        self._retry_at = 0.0
        self._last_error: str | None = None
        self._uploaded = 0
        self._remote_checked = False
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, upload_threads), thread_name_prefix="isofs-s3-upload"
        )
        self._uploader: threading.Thread | None = None
        super().__init__(staging, key=key, level=level, pack_size=pack_size)
        try:
            self._ensure_remote(quiet=True)
        except BaseException:
            self._pool.shutdown(wait=False)
            self.index.close()
            raise
        self._uploader = threading.Thread(
            target=self._upload_loop, name="isofs-s3-uploader", daemon=True
        )
        self._uploader.start()

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _key(self, name: str) -> str:
        return f"{self.prefix}/packs/{name}" if self.prefix else f"packs/{name}"

    def _store_key(self) -> str:
        return f"{self.prefix}/{STORE_OBJECT}" if self.prefix else STORE_OBJECT

    def _note_error(self, what: str, exc: BaseException) -> str:
        message = f"{what}: {type(exc).__name__}: {exc}"
        with self._state_lock:
            self._last_error = message
        return message

    # ------------------------------------------------------------------ remote hooks

    def _remote_read(self, name: str, offset: int, length: int) -> bytes:
        if length <= 0:
            return b""
        try:
            response = self._client.get_object(
                Bucket=self.bucket,
                Key=self._key(name),
                Range=f"bytes={offset}-{offset + length - 1}",
            )
            return bytes(response["Body"].read(length))
        except Exception as exc:
            code = _error_code(exc)
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(f"{self.url}: no pack {name}") from None
            if code == "InvalidRange":
                return b""
            raise RemoteUnavailable(
                self._note_error(f"S3 store {self.url} unreachable or refusing reads", exc)
            ) from None

    def _remote_delete(self, name: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(name))
        except Exception as exc:
            raise RemoteUnavailable(self._note_error(f"delete of pack {name}", exc)) from None

    def _remote_inventory(self) -> dict[str, int]:
        found: dict[str, int] = {}
        prefix = self._key("")
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    name = item["Key"][len(prefix) :]
                    if len(name) == 32:
                        found[name] = int(item["Size"])
        except Exception as exc:
            raise RemoteUnavailable(self._note_error("listing packs", exc)) from None
        return found

    def _sealed(self, num: int) -> None:
        self._wake.set()

    def _before_release(self) -> None:
        """Give the backlog a chance to drain, then stop the uploader (what is left goes at
        the next open)."""
        self._wake.set()
        deadline = time.monotonic() + self.close_timeout
        while time.monotonic() < deadline and self._backlog()[0]:
            with self._state_lock:
                if self._failures and not self._in_flight:
                    break  # the store is down: do not hold the unmount
            time.sleep(0.05)
        self._stopping.set()
        self._wake.set()
        if self._uploader is not None:
            self._uploader.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ------------------------------------------------------------------ the bucket

    def _ensure_remote(self, *, quiet: bool = False) -> bool:
        """Bucket there (created if allowed) and `store.json` naming this store; False
        (error noted) when the store cannot be reached."""
        if self._remote_checked:
            return True
        local_id = self.index.get_meta("store_id")
        try:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except Exception as exc:
                if _error_code(exc) in ("404", "NoSuchBucket", "NotFound") and self.create_bucket:
                    self._client.create_bucket(Bucket=self.bucket)
                else:
                    raise
            try:
                body = self._client.get_object(Bucket=self.bucket, Key=self._store_key())
                remote = json.loads(body["Body"].read())
            except Exception as exc:
                if _error_code(exc) not in ("NoSuchKey", "404", "NotFound"):
                    raise
                remote = None
        except Exception as exc:
            message = self._note_error(f"S3 store {self.url} unreachable", exc)
            if not quiet:
                log.warning("%s", message)
            return False
        if remote is None:
            if local_id is None:
                local_id = os.urandom(16).hex()
                with self.index.transaction() as db:
                    self.index.set_meta(db, "store_id", local_id)
            document = {
                "format": STORE_FORMAT,
                "version": 1,
                "store_id": local_id,
                "encrypted": self.codec.encrypted,
            }
            try:
                self._client.put_object(
                    Bucket=self.bucket, Key=self._store_key(), Body=json.dumps(document).encode()
                )
            except Exception as exc:
                self._note_error(f"S3 store {self.url}: writing {STORE_OBJECT}", exc)
                return False
        else:
            if not isinstance(remote, dict) or remote.get("format") != STORE_FORMAT:
                raise CorruptData(f"{self.url}: {STORE_OBJECT} is not an isofs dedup store")
            remote_id = str(remote.get("store_id"))
            if local_id is None and self.adopt_existing and not self.index.packs():
                with self.index.transaction() as db:  # a new index for an existing store
                    self.index.set_meta(db, "store_id", remote_id)
            elif remote_id != local_id:
                raise CorruptData(
                    f"{self.url} holds another source's chunk store (store id {remote_id}); "
                    "to rebuild a lost index for it, open it with adopt_existing"
                )
        self._remote_checked = True
        return True

    # ------------------------------------------------------------------ uploads

    def _backlog(self) -> tuple[int, int]:
        rows = self.index.packs(SEALED)
        return len(rows), sum(row.size for row in rows)

    def _upload_loop(self) -> None:
        while not self._stopping.is_set():
            timeout = 1.0
            try:
                if self.max_open_age > 0:
                    self.seal_open_pack(older_than=self.max_open_age)
                now = time.monotonic()
                with self._state_lock:
                    waiting = self._retry_at - now
                if waiting > 0:
                    timeout = min(timeout, waiting)
                elif self._ensure_remote():
                    self._start_uploads()
                    self._retry_deletes()
                else:
                    self._failed()
            except Exception as exc:  # never let the thread die: note it, back off
                self._note_error("uploader", exc)
                log.exception("S3 uploader")
                self._failed()
            self._wake.wait(timeout)
            self._wake.clear()

    def _failed(self) -> None:
        with self._state_lock:
            self._failures += 1
            delay = min(self.retry_max, self.retry_initial * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay

    def _start_uploads(self) -> None:
        for row in self.index.packs(SEALED):
            with self._state_lock:
                if row.num in self._in_flight or self._retry_at > time.monotonic():
                    continue
                self._in_flight.add(row.num)
            self._pool.submit(self._upload, row.num, row.name, row.size)

    def _retry_deletes(self) -> None:
        for row in self.index.packs(DELETING):
            self._finish_delete(row.num, row.name)

    def _upload(self, num: int, name: str, size: int) -> None:
        try:
            path = self.pack_dir / name
            digest = hashlib.md5(usedforsecurity=False)
            with open(path, "rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
                f.seek(0)
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(name),
                    Body=f,
                    ContentLength=size,
                    ContentMD5=base64.b64encode(digest.digest()).decode(),
                )
            head = self._client.head_object(Bucket=self.bucket, Key=self._key(name))
            if int(head["ContentLength"]) != size:
                raise RemoteUnavailable(
                    f"uploaded pack {name} is {head['ContentLength']} bytes, not {size}"
                )
            self.index.set_pack_state(num, "uploaded")
            if not self.keep_local:
                self._forget_fd(name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            with self._state_lock:
                self._uploaded += 1
                self._failures = 0
                self._retry_at = 0.0
        except FileNotFoundError:
            log.warning("pack %s to upload is gone from %s", name, self.pack_dir)
        except Exception as exc:
            log.warning("%s", self._note_error(f"upload of pack {name}", exc))
            self._failed()
        finally:
            with self._state_lock:
                self._in_flight.discard(num)
            self._wake.set()

    def wait_for_uploads(self, timeout: float = 60.0) -> bool:
        """Block until every sealed pack is uploaded (True) or `timeout` passes (False)."""
        deadline = time.monotonic() + timeout
        self._wake.set()
        while time.monotonic() < deadline:
            if not self._backlog()[0]:
                return True
            time.sleep(0.05)
        return not self._backlog()[0]

    def statistics(self) -> dict[str, Any]:
        stats = super().statistics()
        packs, size = self._backlog()
        with self._state_lock:
            stats.update(
                upload_backlog_packs=packs,
                upload_backlog_bytes=size,
                uploads_in_flight=len(self._in_flight),
                uploads_done=self._uploaded,
                upload_failures=self._failures,
                last_error=self._last_error,
                store=self.url,
                endpoint=self.endpoint_url,
            )
        return stats
