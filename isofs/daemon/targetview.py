"""The target-view daemon of a mount: a one-view mount of its own for `isofs exec --view target`.

pyfuse3 serves one FUSE session per process, so the second session is a second daemon: the
shared mount's daemon starts it on the first `isofs exec --view target` (a request on its
control socket), with the same command line plus `--view-daemon` and the secrets it was given
(through a pipe, as at mount time). The child makes a private mount namespace, detaches the
shared mount there and mounts a one-view target mount of the same source at the same path;
`isofs exec` enters that namespace (setns). Both daemons reach the same native files: a change
through either is seen through the other at the next open (the validators that catch changes
behind a mount's back), as two NFS clients see each other. The child ends with the shared
mount (SIGTERM from its parent, or its parent's death).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Callable
from typing import Any

import trio

from isofs.daemon.secretpipe import send_secrets

log = logging.getLogger(__name__)

#: How long a target-view daemon may take to unlock its keys and mount.
START_TIMEOUT = 60.0


class TargetView:
    """Starts (once) and stops the target-view daemon of one shared mount."""

    def __init__(
        self,
        argv: Callable[[int, int], list[str]],
        secrets: dict[str, bytes],
        log_file: str | None,
        env: dict[str, str],
    ) -> None:
        self._argv = argv
        self._secrets = secrets
        self._log_file = log_file
        self._env = env
        self.process: subprocess.Popen[bytes] | None = None
        self._lock = trio.Lock()

    @property
    def pid(self) -> int | None:
        if self.process is not None and self.process.poll() is None:
            return self.process.pid
        return None

    async def ensure(self) -> dict[str, Any]:
        """{"pid": N} of a running target-view daemon (started now if needed), or {"error"}."""
        async with self._lock:
            if self.pid is None:
                try:
                    self.process = await trio.to_thread.run_sync(self._start)
                except OSError as exc:
                    return {"error": f"cannot start the target-view daemon: {exc}"}
                except RuntimeError as exc:
                    return {"error": str(exc)}
            return {"pid": self.pid}

    def _start(self) -> subprocess.Popen[bytes]:
        read_end, write_end = os.pipe()
        secrets_fd = send_secrets(self._secrets)
        try:
            out = open(self._log_file, "ab") if self._log_file else subprocess.DEVNULL  # noqa: SIM115
            try:
                process = subprocess.Popen(
                    self._argv(write_end, secrets_fd),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    pass_fds=(write_end, secrets_fd),
                    cwd="/",
                    env=self._env,
                )
            finally:
                if out is not subprocess.DEVNULL:
                    out.close()  # type: ignore[union-attr]
        finally:
            os.close(write_end)
            os.close(secrets_fd)
        with os.fdopen(read_end, "rb") as ready:
            message = ready.read().decode(errors="replace").strip()
        if message != "mounted":
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            raise RuntimeError(f"target-view daemon: {message or 'exited before mounting'}")
        log.info("target-view daemon started (pid %d)", process.pid)
        return process

    def stop(self) -> None:
        """End the target-view daemon (it unmounts its namespace's mount and exits)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            log.warning("target-view daemon %d did not exit; killing it", process.pid)
            process.kill()
            process.wait(timeout=5)
