"""A real S3-compatible engine for tests: Ceph's RADOS Gateway on 127.0.0.1.

One monitor, one OSD with the in-memory object store (memstore) and one radosgw, started from
Debian's `ceph-mon`, `ceph-osd` and `radosgw` packages in a scratch directory (a cluster of
its own: ceph.conf and keyring there, every daemon bound to 127.0.0.1 on ports picked free).
Ready in about two seconds. `stop_gateway`/`start_gateway` stop and restart radosgw alone
(the cluster and its objects survive), for tests of a store that goes away under load.

Used by the ``s3_engine`` fixture in ``tests/conftest.py``; `python tests/s3engine.py` starts
one and prints its endpoint, for trying things by hand.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("ceph-mon", "ceph-osd", "radosgw")
HOST = "127.0.0.1"
START_TIMEOUT = 60.0


class EngineError(RuntimeError):
    """The engine could not be started (the message says which step and shows its log)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _run(argv: list[str], timeout: float = 60.0) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise EngineError(
            f"{argv[0]} is not installed (apt-get install {' '.join(PACKAGES)})"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise EngineError(f"{' '.join(argv)} timed out after {timeout:.0f} s") from exc
    if result.returncode != 0:
        raise EngineError(
            f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip()[-2000:]}"
        )
    return result.stdout


@dataclass
class S3Engine:
    """A running single-node Ceph cluster with a gateway; `endpoint_url` and keys for boto3."""

    directory: Path
    endpoint_url: str = ""
    access_key: str = ""
    secret_key: str = ""
    region: str = "us-east-1"
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    _rgw_port: int = 0

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    def start(cls, directory: Path | None = None) -> S3Engine:
        """Make and start a cluster; on any failure stop what was started and raise."""
        scratch = Path(directory or tempfile.mkdtemp(prefix="isofs-s3engine-"))
        engine = cls(scratch)
        try:
            engine._make_cluster()
            engine._start_daemon("mon", ["ceph-mon", "-f", "-i", "a"])
            engine._wait_for_monitor()
            engine._create_osd()
            engine._start_daemon("osd", ["ceph-osd", "-f", "-i", "0"])
            engine._wait_for_osd()
            engine.start_gateway()
            engine._create_user()
        except BaseException:
            engine.stop()
            raise
        return engine

    def stop(self) -> None:
        """Stop radosgw, the OSD and the monitor (by PID, in that order); remove the data."""
        for name in ("rgw", "osd", "mon"):
            self._stop_daemon(name)
        shutil.rmtree(self.directory, ignore_errors=True)

    def stop_gateway(self) -> None:
        """Stop radosgw alone: the endpoint refuses connections until `start_gateway`."""
        self._stop_daemon("rgw")

    def start_gateway(self) -> None:
        """Start radosgw (again, on the same port) and wait until it answers HTTP."""
        if not self._rgw_port:
            self._rgw_port = free_port()
            self.endpoint_url = f"http://{HOST}:{self._rgw_port}"
        self._start_daemon("rgw", ["radosgw", "-f", "-n", "client.rgw.a"])
        deadline = time.monotonic() + START_TIMEOUT
        while not self.gateway_answers():
            self._check_alive("rgw")
            if time.monotonic() > deadline:
                raise EngineError(
                    f"radosgw did not answer in {START_TIMEOUT:.0f} s" + self._log("rgw")
                )
            time.sleep(0.05)

    def gateway_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url, timeout=2.0):
                return True
        except urllib.error.HTTPError:
            return True  # an S3 error document is an answer
        except OSError:
            return False

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self._procs.items() if proc.poll() is None}

    def client(self):  # type: ignore[no-untyped-def]  # boto3 is optional at import time
        """A boto3 S3 client for this engine (tests use it to look at objects)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(retries={"max_attempts": 2}, s3={"addressing_style": "path"}),
        )

    def environment(self) -> dict[str, str]:
        """AWS_* variables that give boto3's standard credential chain this engine's user."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    # ------------------------------------------------------------------ steps

    @property
    def conf(self) -> Path:
        return self.directory / "ceph.conf"

    def _ceph(self, *args: str, timeout: float = 60.0) -> str:
        return _run(["ceph", "-c", str(self.conf), "--connect-timeout", "30", *args], timeout)

    def _make_cluster(self) -> None:
        d = self.directory
        for sub in ("mon", "osd", "run", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        fsid = str(uuid.uuid4())
        mon_v2, mon_v1 = free_port(), free_port()
        mon_addr = f"[v2:{HOST}:{mon_v2},v1:{HOST}:{mon_v1}]"
        keyring = d / "keyring"
        self.conf.write_text(
            f"""[global]
fsid = {fsid}
mon initial members = a
mon host = {mon_addr}
public network = {HOST}/32
cluster network = {HOST}/32
ms bind ipv4 = true
ms bind ipv6 = false
ms bind port min = 20000
ms bind port max = 29999
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
keyring = {keyring}
run dir = {d}/run
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
log to stderr = false
err to stderr = true
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = 2147483648
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
paxos propose interval = 0.1
osd fast shutdown notify mon = false
mgr initial modules =

[mon.a]
public addrv = {mon_addr}

[osd]
public addr = {HOST}
cluster addr = {HOST}

[client.rgw.a]
rgw frontends = beast endpoint={HOST}:{{rgw_port}} tcp_nodelay=1
rgw init timeout = 60
rgw dns name = {HOST}
rgw enable usage log = false
"""
        )
        # the gateway's port is chosen now so a restart binds the same one
        self._rgw_port = free_port()
        self.endpoint_url = f"http://{HOST}:{self._rgw_port}"
        self.conf.write_text(self.conf.read_text().replace("{rgw_port}", str(self._rgw_port)))
        tool = ["ceph-authtool", str(keyring)]
        _run([*tool, "--create-keyring", "--gen-key", "-n", "mon.", "--cap", "mon", "allow *"])
        _run([*tool, "--gen-key", "-n", "client.admin", "--cap", "mon", "allow *",
              "--cap", "osd", "allow *", "--cap", "mgr", "allow *"])  # fmt: skip
        _run([*tool, "--gen-key", "-n", "osd.0", "--cap", "mon", "allow profile osd",
              "--cap", "osd", "allow *", "--cap", "mgr", "allow profile osd"])  # fmt: skip
        _run([*tool, "--gen-key", "-n", "client.rgw.a", "--cap", "mon", "allow rw",
              "--cap", "osd", "allow rwx"])  # fmt: skip
        monmap = d / "monmap"
        _run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", mon_addr, str(monmap)])
        _run(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", str(monmap),
              "--keyring", str(keyring)])  # fmt: skip

    def _start_daemon(self, name: str, argv: list[str]) -> None:
        if name in self._procs and self._procs[name].poll() is None:
            return
        log = open(self.directory / "log" / f"{name}.stderr", "ab")  # noqa: SIM115
        try:
            self._procs[name] = subprocess.Popen(
                [argv[0], "-c", str(self.conf), *argv[1:]],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C of the test run reaches the finalizer only
            )
        except FileNotFoundError as exc:
            raise EngineError(
                f"{argv[0]} is not installed (apt-get install {' '.join(PACKAGES)})"
            ) from exc
        finally:
            log.close()

    def _stop_daemon(self, name: str, timeout: float = 15.0) -> None:
        proc = self._procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)

    def _check_alive(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise EngineError(f"{name} exited {proc.returncode} while starting" + self._log(name))

    def _log(self, name: str) -> str:
        texts = []
        for path in sorted((self.directory / "log").glob("*")):
            if name in path.name or path.name.endswith(".stderr"):
                with contextlib.suppress(OSError):
                    texts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-3000:]}")
        return ("\n" + "\n".join(texts)) if texts else ""

    def _wait_for(self, name: str, what: str, probe) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + START_TIMEOUT
        last = ""
        while True:
            self._check_alive(name)
            try:
                if probe():
                    return
            except EngineError as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise EngineError(f"{what} not ready in {START_TIMEOUT:.0f} s: {last}"
                                  + self._log(name))  # fmt: skip
            time.sleep(0.1)

    def _wait_for_monitor(self) -> None:
        self._wait_for("mon", "monitor", lambda: bool(self._ceph("mon", "stat", timeout=20)))

    def _create_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self._ceph("osd", "new", osd_uuid, "0").strip()
        if osd_id != "0":
            raise EngineError(f"ceph osd new gave id {osd_id!r}, expected 0")
        (self.directory / "osd" / "ceph-0").mkdir(parents=True, exist_ok=True)
        _run(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid", osd_uuid])

    def _wait_for_osd(self) -> None:
        def up() -> bool:
            status = json.loads(self._ceph("osd", "stat", "--format", "json", timeout=20))
            return int(status.get("num_up_osds", 0)) >= 1 and int(status.get("num_in_osds", 0)) >= 1

        self._wait_for("osd", "OSD", up)

    def _create_user(self) -> None:
        out = _run(["radosgw-admin", "-c", str(self.conf), "-n", "client.admin", "user", "create",
                    "--uid=isofs-test", "--display-name=isofs tests"])  # fmt: skip
        keys = json.loads(out)["keys"][0]
        self.access_key = keys["access_key"]
        self.secret_key = keys["secret_key"]


if __name__ == "__main__":
    started = time.monotonic()
    engine = S3Engine.start()
    print(f"ready in {time.monotonic() - started:.1f} s: {engine.endpoint_url}")
    print(f"AWS_ACCESS_KEY_ID={engine.access_key} AWS_SECRET_ACCESS_KEY={engine.secret_key}")
    print(f"pids: {engine.pids()}; Ctrl-C stops it")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        engine.stop()
