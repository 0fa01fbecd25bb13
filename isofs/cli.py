"""The `isofs` command: mount, umount, providers.

Every failure the user can cause ends as one line `isofs: error: ...` and a non-zero exit,
never a traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from isofs import runtime
from isofs.daemon import MountOptions, configure_logging, serve
from isofs.provider import ProviderError, available_providers


class CommandError(Exception):
    """A one-line reason for a non-zero exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like argparse but shorter
        self.exit(2, f"isofs: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="isofs", description="Per-process views of one directory tree.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    mount = commands.add_parser("mount", help="mount SOURCE on MOUNTPOINT")
    mount.add_argument("source")
    mount.add_argument("mountpoint")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay attached")
    mount.add_argument("-d", "--debug", action="store_true", help="log every request")
    mount.add_argument(
        "--allow-other", action="store_true", help="let other users in (permissions apply)"
    )
    mount.add_argument("--log", dest="log_file", help="daemon log file")
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)

    umount = commands.add_parser("umount", help="flush, unmount and wait for the daemon")
    umount.add_argument("mountpoint")
    umount.add_argument("-z", "--lazy", action="store_true", help="detach even if busy")
    umount.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")

    commands.add_parser("providers", help="list installed providers")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (CommandError, ProviderError) as exc:
        print(f"isofs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _mount_options(args: argparse.Namespace) -> MountOptions:
    return MountOptions(
        source=args.source,
        mountpoint=args.mountpoint,
        foreground=args.foreground,
        debug=args.debug,
        allow_other=args.allow_other,
        log_file=args.log_file,
    )


def cmd_mount(args: argparse.Namespace) -> int:
    options = _mount_options(args)
    if args.foreground:
        configure_logging(options.log_file, options.debug)
        return serve(options, _reporter(args.ready_fd))
    return _spawn_daemon(args, options)


def _reporter(ready_fd: int | None):  # type: ignore[no-untyped-def]
    """Where the daemon says "mounted" or why not: the parent's pipe, or stderr."""

    def report(message: str) -> None:
        if ready_fd is None:
            if message != "mounted":
                print(f"isofs: error: {message}", file=sys.stderr)
            return
        os.write(ready_fd, message.encode() + b"\n")
        os.close(ready_fd)

    return report


def _spawn_daemon(args: argparse.Namespace, options: MountOptions) -> int:
    """Start the daemon in its own session and wait until it mounted or failed."""
    mountpoint = os.path.realpath(options.mountpoint)
    _, default_log, _ = runtime.MountRecord.paths_for(mountpoint)
    log_file = os.path.abspath(options.log_file) if options.log_file else str(default_log)
    read_end, write_end = os.pipe()
    command = [
        sys.executable, "-m", "isofs", "mount", "--foreground",
        "--ready-fd", str(write_end), "--log", log_file,
        os.path.abspath(options.source), mountpoint,
    ]  # fmt: skip
    if options.debug:
        command.append("--debug")
    if options.allow_other:
        command.append("--allow-other")
    with open(log_file, "ab") as log_stream:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=log_stream,
            pass_fds=(write_end,),
            start_new_session=True,
            cwd="/",
        )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        message = ready.read().decode(errors="replace").strip()
    if message == "mounted":
        return 0
    process.wait()
    if not message:
        message = f"daemon exited with status {process.returncode}; see {log_file}"
    raise CommandError(message)


def cmd_umount(args: argparse.Namespace) -> int:
    mountpoint = os.path.realpath(args.mountpoint)
    record = runtime.MountRecord.load(mountpoint)
    if not runtime.is_mounted(mountpoint):
        if record is not None and not runtime.pid_alive(record.pid):
            record.remove()
        raise CommandError(f"not mounted: {args.mountpoint}")
    command = ["fusermount3", "-u", *(["-z"] if args.lazy else []), mountpoint]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
        if "busy" in reason.lower():
            raise CommandError(f"mount point is busy: {args.mountpoint} (use --lazy to detach)")
        raise CommandError(f"cannot unmount {args.mountpoint}: {reason or 'fusermount3 failed'}")
    if record is not None:
        _wait_for_exit(record.pid, args.timeout)
    return 0


def _wait_for_exit(pid: int, timeout: float) -> None:
    """The daemon flushes and exits once the kernel ends the session."""
    deadline = time.monotonic() + timeout
    while runtime.pid_alive(pid):
        if _is_zombie(pid):
            return
        if time.monotonic() > deadline:
            raise CommandError(f"unmounted, but daemon {pid} did not exit in {timeout:g} s")
        time.sleep(0.02)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def cmd_providers(args: argparse.Namespace) -> int:
    for name, loader in sorted(available_providers().items()):
        try:
            provider = loader()
            doc = (provider.__doc__ or "").strip().splitlines()[0:1]
        except Exception as exc:  # a broken plugin must not hide the others
            doc = [f"(cannot load: {exc})"]
        print(f"{name:12} {doc[0] if doc else ''}")
    return 0


_COMMANDS = {"mount": cmd_mount, "umount": cmd_umount, "providers": cmd_providers}
