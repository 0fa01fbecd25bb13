"""Mount an encrypted demo source and show what two processes see through the same mount.

Run by `./dev demo` (as root: `isofs exec` places processes in a cgroup). Everything it
creates lives in a temporary directory that is removed at the end. The mount is always
unmounted and its daemon always ends, however the demo ends: a failed step, SIGINT, SIGTERM,
SIGHUP, or a standard output closed early (`./dev demo | head`). Only this script writes to
standard output (the steps' output is captured and passed on), so a closed pipe is seen here,
and the clean-up prints nothing once it is.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from isofs.daemon import runtime

ISOFS = [sys.executable, "-m", "isofs"]
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StdoutClosed(Exception):
    """Nobody reads the demo's output any more: stop showing, clean up."""


class Interrupted(Exception):
    """A stop signal arrived: clean up and exit 128 + signum."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    cleaning = False
    stdout_closed = False


def _on_stop_signal(signum: int, _frame: object) -> None:
    if not _State.cleaning:  # during the clean-up a signal must not cut it short
        raise Interrupted(signum)


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so later writes (and the exit-time flush) cannot fail."""
    _State.stdout_closed = True
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has closed it (poll reports POLLERR)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def say(text: str) -> None:
    if _State.stdout_closed:
        raise StdoutClosed
    try:
        if _reader_gone():
            raise BrokenPipeError
        sys.stdout.write(text)
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # ValueError: stdout itself was closed
        _silence_stdout()
        raise StdoutClosed from None


def _unblock_stop_signals() -> None:
    """In the child: the mask blocked around Popen() would otherwise be inherited."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def run(title: str, command: list[str]) -> None:
    shown = " ".join(c if " " not in c else repr(c) for c in command)
    say(f"\n# {title}\n$ {shown.replace(sys.executable + ' -m isofs', 'isofs')}\n")
    # A stop signal arriving while Popen() waits for the child's exec would escape before the
    # child is ours to kill, and it would go on alone; so it waits until the child is known.
    process: subprocess.Popen[bytes] | None = None
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, preexec_fn=_unblock_stop_signals
        )
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        output, _ = process.communicate()
    except BaseException:
        if process is not None:
            process.kill()
            process.wait()
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    say(output.decode(errors="replace"))
    if process.returncode != 0:
        raise subprocess.CalledProcessError(process.returncode, shown)


def show(work: Path) -> None:
    source, mnt, passfile = work / "source", work / "mnt", work / "passphrase"
    source.mkdir()
    mnt.mkdir()
    passfile.write_text("demo passphrase\n")
    passfile.chmod(0o600)
    (source / "before-init.txt").write_text("a plain file that existed before init\n")
    run("record an encrypting provider stack for the source",
        [*ISOFS, "init", str(source), "--provider", "encrypt", "--passfile", str(passfile)])
    run("mount it; processes get the native view unless a rule or isofs exec says otherwise",
        [*ISOFS, "mount", str(source), str(mnt), "--passfile", str(passfile)])
    secret = mnt / "diary.txt"
    run("a target-view process writes a file",
        [*ISOFS, "exec", "--view", "target", "--", "sh", "-c",
         f"echo 'Dear diary, the launch code is 0000.' > {secret}"])
    run("the target view: plaintext, logical sizes",
        [*ISOFS, "exec", "--view", "target", "--", "sh", "-c", f"ls -l {mnt}; cat {secret}"])
    run("any other process (a backup tool, say): ciphertext, native sizes, the key store",
        ["sh", "-c", f"ls -la {mnt}; od -A d -c {secret} | head -4"])
    run("live statistics of the mount", [*ISOFS, "status", str(mnt)])
    with contextlib.suppress(StdoutClosed):
        say(f"\n# unmount\n$ isofs umount {mnt}\n")


def _daemons_of(mountpoint: str) -> list[int]:
    """Live isofs daemons whose command line names this (unique, temporary) mount point."""
    wanted = os.fsencode(mountpoint)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_bytes().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"--foreground" in argv and wanted in argv and state not in (b"Z", b"X"):
            found.append(int(entry))
    return found


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _warn(message: str) -> None:
    with contextlib.suppress(OSError, ValueError):
        print(f"demo: {message}", file=sys.stderr, flush=True)


def clean_up(work: Path) -> None:
    """Unmount, end the daemon, remove the directory; never writes to stdout."""
    mnt = os.path.realpath(work / "mnt")
    daemons = _daemons_of(mnt)
    # A daemon started just before an interrupt may still be on its way to mounting.
    _wait(lambda: runtime.is_mounted(mnt) or not _daemons_of(mnt), timeout=10 if daemons else 0)
    for command in ([*ISOFS, "umount", mnt], [*ISOFS, "umount", "--lazy", mnt],
                    ["fusermount3", "-u", "-z", mnt]):  # fmt: skip
        if not runtime.is_mounted(mnt):
            break
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=60)  # fmt: skip
    for pid in set(daemons) | set(_daemons_of(mnt)):
        if not _wait(lambda pid=pid: pid not in _daemons_of(mnt), timeout=10):
            _warn(f"daemon {pid} did not exit after the unmount: killed")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if runtime.is_mounted(mnt):
        _warn(f"{mnt} is still mounted; {work} is left in place")
        return
    shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # a closed stdout raises BrokenPipeError
    for signum in STOP_SIGNALS:
        signal.signal(signum, _on_stop_signal)
    work: Path | None = None
    status = 0
    try:
        work = Path(tempfile.mkdtemp(prefix="isofs-demo-"))
        show(work)
    except StdoutClosed:
        status = EXIT_STDOUT_CLOSED
    except Interrupted as stop:
        status = 128 + stop.signum
    except subprocess.CalledProcessError as failed:
        _warn(f"step failed (exit {failed.returncode}): {failed.cmd}")
        status = 1
    finally:
        while work is not None:
            try:
                _State.cleaning = True
                clean_up(work)
                break
            except Interrupted:  # raised before `cleaning` was set: just go again
                continue
    return status


if __name__ == "__main__":
    raise SystemExit(main())
