"""The `isofs` command: mount, umount, init, exec, status, providers, passwd, fsck, migrate.

Every failure the user can cause ends as one line `isofs: error: ...` and a non-zero exit,
never a traceback. The command line knows no provider: the flags of `init`, `mount` and
`passwd` that belong to providers are built from the options they declare
(`isofs.cli.provider_flags`), for the `--provider`s given to init and for the stack recorded in
the source otherwise. The daemon's command line is rebuilt from the same parser.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from isofs.cli.passphrases import InteractiveSecrets, KeyFileSecrets
from isofs.cli.provider_flags import (
    add_option_flags,
    add_provider_options,
    given_options,
    merge_key_values,
    parsed_options,
)
from isofs.core.sections import NativeFile
from isofs.core.volume import SHARED_TTL, Timeouts
from isofs.daemon import namespaces, runtime
from isofs.daemon.control import format_status, request_status
from isofs.daemon.secretpipe import ForwardedSecrets, receive_secrets, send_secrets
from isofs.daemon.serve import (
    DEFAULT_CACHE_SIZE,
    MountError,
    MountOptions,
    check_mount,
    configure_logging,
    daemon_environment,
    serve,
)
from isofs.provider import (
    Command,
    CommandRequest,
    Provider,
    ProviderError,
    Scope,
    SetupRequest,
    available_providers,
    load_provider,
    parse_size,
)
from isofs.source import init_source, is_initialised, load_stack, meta_dir_of, stack_providers
from isofs.views.config import ConfigError
from isofs.views.execgroups import ExecError, join_view_group
from isofs.views.policy import KNOWN_VIEWS, VIEW_NATIVE


class CommandError(Exception):
    """A one-line reason for a non-zero exit."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, like argparse but shorter
        self.exit(2, f"isofs: error: {message}\n")


class _NotYet(Exception):
    """The first, lenient look at the command line found it incomplete."""


class _LenientParser(_Parser):
    """Parses just enough to learn the command, source and providers (no help, no exit)."""

    def error(self, message: str) -> None:
        raise _NotYet(message)


#: Providers whose options become flags, per command (init: its --provider list; mount and
#: passwd: the source's recorded stack).
ProvidersByCommand = dict[str, list[type[Provider]]]
_PROVIDER_SCOPES: dict[str, Scope] = {"init": "init", "mount": "mount", "passwd": "passwd"}


#: Subcommands providers add (`Provider.commands`): name -> (provider, command).
ProviderCommands = dict[str, tuple[type[Provider], Command]]


def build_parser(
    providers: ProvidersByCommand | None = None,
    *,
    lenient: bool = False,
    provider_commands: ProviderCommands | None = None,
) -> argparse.ArgumentParser:
    parser_class = _LenientParser if lenient else _Parser
    providers = providers or {}
    parser = parser_class(
        prog="isofs", description="Per-process views of one directory tree.", add_help=not lenient
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, add_help=not lenient, **kwargs)
        if name in _PROVIDER_SCOPES:
            add_provider_options(sub, providers.get(name, []), _PROVIDER_SCOPES[name])
        return sub

    mount = command("mount", help="mount SOURCE on MOUNTPOINT")
    mount.add_argument("source")
    mount.add_argument("mountpoint")
    mount.add_argument("-f", "--foreground", action="store_true", help="stay attached")
    mount.add_argument("-d", "--debug", action="store_true", help="log every request")
    mount.add_argument(
        "--allow-other", action="store_true", help="let other users in (permissions apply)"
    )
    mount.add_argument(
        "-r", "--read-only", action="store_true",
        help="refuse every change (EROFS) and write nothing to the source",
    )  # fmt: skip
    mount.add_argument("--log", dest="log_file", help="daemon log file")
    views = mount.add_argument_group("views (first matching rule wins)")
    views.add_argument("--policy", dest="policy_file", metavar="FILE", help="TOML policy file")
    views.add_argument(
        "--target", action="append", default=[], metavar="RULE",
        help="give matching processes the target view, e.g. exe=/usr/bin/vim,uid=1000",
    )  # fmt: skip
    views.add_argument(
        "--ignore", action="append", default=[], metavar="RULE",
        help="give matching processes the native view (checked before --target)",
    )  # fmt: skip
    views.add_argument("--default-view", choices=KNOWN_VIEWS, help="view of unmatched processes")
    views.add_argument(
        "--no-exec", dest="exec_views", action="store_false",
        help="ignore `isofs exec` groups (a one-view policy then skips per-process views)",
    )  # fmt: skip
    caching = mount.add_argument_group(
        "kernel caching (names and files that differ between views are never cached)"
    )
    for flag, what in (("--entry-timeout", "names the same in every view"),
                       ("--attr-timeout", "attributes"),
                       ("--negative-timeout", "names that exist in no view")):  # fmt: skip
        caching.add_argument(
            flag, type=_seconds, default=SHARED_TTL, metavar="SECONDS",
            help=f"how long the kernel may cache {what} (default {SHARED_TTL:g}; a change "
            "made behind the mount's back is seen at most this late)",
        )  # fmt: skip
    mount.add_argument(
        "--cache-size", type=_size, default=DEFAULT_CACHE_SIZE, metavar="BYTES",
        help="page cache budget, e.g. 256M (default 256M)",
    )  # fmt: skip
    mount.add_argument(
        "--max-inodes", type=_count, metavar="N",
        help="the most files the kernel may remember at once; each holds a native handle in "
        "the daemon, and past N the oldest unused are forgotten (default: 7/8 of the "
        "daemon's open-files limit)",
    )  # fmt: skip
    _add_secret_options(mount)
    mount.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--secrets-fd", type=int, help=argparse.SUPPRESS)
    mount.add_argument("--view-daemon", action="store_true", help=argparse.SUPPRESS)
    mount.set_defaults(parser=mount)  # the daemon's command line is rebuilt from it

    init = command(
        "init", help="record a provider stack for SOURCE",
        epilog="Each provider's own options are listed by: isofs init SOURCE --provider NAME "
        "--help",
    )  # fmt: skip
    init.add_argument("source")
    init.add_argument(
        "--provider", action="append", required=True, metavar="NAME",
        help="provider to stack (repeat: first is nearest the disk)",
    )  # fmt: skip
    init.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="a provider option, as its flag would give it",
    )  # fmt: skip
    _add_secret_options(init)

    exec_ = command("exec", help="run a command whose process tree gets a view")
    exec_.add_argument("--view", required=True, choices=KNOWN_VIEWS)
    exec_.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    umount = command("umount", help="flush, unmount and wait for the daemon")
    umount.add_argument("mountpoint")
    umount.add_argument("-z", "--lazy", action="store_true", help="detach even if busy")
    umount.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")

    status = command("status", help="statistics of a live mount")
    status.add_argument("mountpoint")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    command("providers", help="list installed providers")

    for name, (provider, extra) in sorted((provider_commands or {}).items()):
        sub = command(name, help=f"{extra.help} (provider {provider.name})")
        sub.add_argument("source")
        sub.add_argument("--force", action="store_true", help="run even if SOURCE is mounted")
        _add_secret_options(sub)
        add_option_flags(sub, provider, extra.options)
        sub.set_defaults(provider_command=(provider, extra))

    from isofs import bench

    bench.add_arguments(
        command("bench", help="measure directory enumeration through isofs views")
    )

    passwd = command(
        "passwd", help="change the passphrase of SOURCE (no data is re-encrypted)",
        description="Re-wrap the key of every provider of SOURCE's stack that has a passphrase. "
        "The current secret comes from --passfile, --extpass, --keyfile or --masterkey (else "
        "a prompt); the new passphrase from --new-passfile (else a prompt, asked twice).",
    )  # fmt: skip
    passwd.add_argument("source")
    _add_secret_options(passwd)
    passwd.add_argument(
        "--new-passfile", metavar="FILE", help="read the new passphrase from FILE's first line"
    )

    fsck = command(
        "fsck", help="verify every file of an unmounted SOURCE",
        description="Read every formatted file of SOURCE through its provider stack and report "
        "damaged files (what each provider checks: corrupt headers, truncated tails, bad blocks, "
        "...) and stale temporary files. Exit status 0: nothing found, 1: something found. "
        "--repair copies each damaged file to .isofs/lost+found/<path>.<UTC time> first, then "
        "lets the provider repair it in place (e.g. cut a torn tail back, rewrite bad blocks "
        "as zeros); what a provider cannot repair is only reported. A mounted SOURCE is "
        "refused unless --force.",
    )  # fmt: skip
    fsck.add_argument("source")
    fsck.add_argument("--repair", action="store_true", help="repair what can be repaired")
    fsck.add_argument("--json", action="store_true", help="machine-readable output")
    fsck.add_argument("--force", action="store_true", help="run even if SOURCE is mounted")
    _add_secret_options(fsck)

    migrate = command(
        "migrate", help="put the plain files of an unmounted SOURCE in the stack's format",
        description="Rewrite every regular file of SOURCE that is not in the stack's format "
        "in that format, crash-safely (a temporary .isofs-migrate.* file in the same directory, "
        "renamed over the original), keeping owner, mode, times and extended attributes. "
        "Hard-linked files are skipped. A mounted SOURCE is refused unless --force.",
    )  # fmt: skip
    migrate.add_argument("source")
    migrate.add_argument("--force", action="store_true", help="run even if SOURCE is mounted")
    _add_secret_options(migrate)
    return parser


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"seconds out of range (0 to 86400): {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 64:
        raise argparse.ArgumentTypeError(f"at least 64: {text!r}")
    return value


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _add_secret_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("secrets (providers with a passphrase)")
    group.add_argument("--passfile", metavar="FILE", help="read the passphrase from FILE")
    group.add_argument("--extpass", metavar="CMD", help="run CMD and read the passphrase")
    group.add_argument("--keyfile", metavar="FILE", help="use FILE's bytes instead of a passphrase")
    group.add_argument("--masterkey", metavar="HEX", help="unlock with the recovery master key")


def _secrets(args: argparse.Namespace) -> InteractiveSecrets:
    return InteractiveSecrets(args.passfile, args.extpass, args.masterkey)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        providers = _providers_named(argv)
        extra = _provider_commands() if argv and argv[0] not in _COMMANDS else {}
        args = build_parser(providers, provider_commands=extra).parse_args(argv)
        args.providers = providers.get(args.command, [])
        if args.command not in _COMMANDS:
            return cmd_provider_command(args)
        return _COMMANDS[args.command](args)
    except (CommandError, ProviderError, ConfigError, ExecError, MountError) as exc:
        print(f"isofs: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _providers_named(argv: list[str]) -> ProvidersByCommand:
    """The providers whose options the command line takes (first, lenient look at it).

    An unknown `--provider` fails here, with its one line; a source whose stack cannot be
    read gets no provider flags (the command itself then says what is wrong).
    """
    try:
        args, _ = build_parser(lenient=True).parse_known_args(argv)
    except _NotYet:
        return {}
    if args.command == "init":
        return {"init": [load_provider(name) for name in args.provider]}
    if args.command in ("mount", "passwd") and is_initialised(args.source):
        try:
            return {args.command: stack_providers(meta_dir_of(args.source))}
        except ProviderError:
            return {}
    return {}


def _provider_commands() -> ProviderCommands:
    """The subcommands installed providers add (a provider that fails to load adds none)."""
    found: ProviderCommands = {}
    for _name, loader in sorted(available_providers().items()):
        try:
            provider = loader()
        except Exception:
            continue
        for extra in getattr(provider, "commands", ()):
            if extra.name not in _COMMANDS:
                found.setdefault(extra.name, (provider, extra))
    return found


def cmd_provider_command(args: argparse.Namespace) -> int:
    """Run a provider's subcommand on an initialised source whose stack has that provider."""
    from isofs import maintenance
    from isofs.maintenance.common import SourceWalk

    provider, extra = args.provider_command
    meta_dir = maintenance.require_initialised(args.source)
    mounted = bool(maintenance.mount_conflicts(args.source))
    if extra.offline_only and mounted and not args.force:
        maintenance.check_not_mounted(args.source)
    names = [p.name for p in stack_providers(meta_dir)]
    if provider.name not in names:
        raise CommandError(f"{args.source} has no {provider.name} provider ({' -> '.join(names)})")
    given = given_options(args, [provider]).get(provider.name, {})
    declared = {option.name: option for option in extra.options}
    options = {key: declared[key].parse(value, provider.name) for key, value in given.items()}
    for option in extra.options:
        options.setdefault(option.name, option.default)
    request = SetupRequest(
        options={"keyfile": args.keyfile} if args.keyfile else {}, secrets=_secrets(args)
    )
    stack = load_stack(meta_dir, request)
    try:
        layer = stack.layers[names.index(provider.name)]
        root = os.path.abspath(args.source)

        def files() -> Any:
            walk = SourceWalk(Path(root), stack.name_transform)
            for item in walk.files():
                if item.kind == "file":
                    yield item.rel, functools.partial(_open_native, os.path.join(root, item.rel))

        return int(extra.run(CommandRequest(
            source=Path(root), meta_dir=meta_dir, stack=stack, layer=layer, options=options,
            files=files, progress=sys.stderr.isatty(), mounted=mounted,
        )))  # fmt: skip
    except OSError as exc:
        raise CommandError(f"{exc.filename or args.source}: {exc.strerror or exc}") from None
    finally:
        stack.close()


def _open_native(path: str, writable: bool) -> NativeFile:
    """A native file of the source for a provider's command (closed with the process)."""
    flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
    return NativeFile(os.open(path, flags))


def _provider_options(args: argparse.Namespace, scope: Scope) -> dict[str, dict[str, Any]]:
    """Each provider's options from its flags (and `--option KEY=VALUE` for init), checked."""
    given = given_options(args, args.providers)
    given = merge_key_values(given, getattr(args, "option", []), args.providers, scope)
    return parsed_options(given, args.providers, scope)


def _mount_options(args: argparse.Namespace) -> MountOptions:
    return MountOptions(
        source=args.source,
        mountpoint=args.mountpoint,
        foreground=args.foreground,
        debug=args.debug,
        allow_other=args.allow_other,
        read_only=args.read_only,
        log_file=args.log_file,
        policy_file=args.policy_file,
        targets=args.target,
        ignores=args.ignore,
        default_view=args.default_view,
        exec_views=args.exec_views,
        cache_size=args.cache_size,
        max_inodes=args.max_inodes,
        keyfile=args.keyfile,
        provider_options=_provider_options(args, "mount"),
        timeouts=Timeouts(args.entry_timeout, args.attr_timeout, args.negative_timeout),
        view_daemon=args.view_daemon,
        target_view_argv=functools.partial(_target_view_argv, args),
    )


def cmd_mount(args: argparse.Namespace) -> int:
    options = _mount_options(args)
    if args.secrets_fd is not None:
        options.secrets = ForwardedSecrets(receive_secrets(args.secrets_fd))
    else:
        options.secrets = _secrets(args)
    if args.foreground:
        configure_logging(options.log_file, options.debug)
        return serve(options, _reporter(args.ready_fd))
    # Fail here, before a daemon exists, on a bad policy or a wrong passphrase.
    check_mount(options)
    options.policy()
    if is_initialised(options.source):
        load_stack(
            meta_dir_of(options.source), options.setup_request(), options.provider_options
        ).close()
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


#: Mount flags the daemon must not get on its command line: secrets travel through a pipe.
_NOT_FOR_THE_DAEMON = frozenset({"passfile", "extpass", "masterkey"})
_PATHS = ("source", "mountpoint", "policy_file", "keyfile", "log_file")


def _spawn_daemon(args: argparse.Namespace, options: MountOptions) -> int:
    """Start the daemon in its own session and wait until it mounted or failed."""
    mountpoint = os.path.realpath(options.mountpoint)
    _, default_log, _ = runtime.MountRecord.paths_for(mountpoint)
    log_file = os.path.abspath(options.log_file) if options.log_file else str(default_log)
    read_end, write_end = os.pipe()
    given = options.secrets.given if isinstance(options.secrets, InteractiveSecrets) else {}
    secrets_fd = send_secrets(given)
    daemon_args = argparse.Namespace(**vars(args))
    for name in _PATHS:
        value = getattr(daemon_args, name)
        if value is not None:
            setattr(daemon_args, name, os.path.abspath(value))
    daemon_args.mountpoint = mountpoint
    daemon_args.log_file = log_file
    daemon_args.foreground = True
    daemon_args.ready_fd = write_end
    daemon_args.secrets_fd = secrets_fd
    command = [sys.executable, "-m", "isofs", "mount", *_argv_of(args.parser, daemon_args)]
    try:
        log_stream = open(log_file, "ab")  # noqa: SIM115 - closed right after the spawn
    except OSError as exc:
        raise CommandError(f"cannot open log file {log_file}: {exc.strerror}") from None
    with log_stream:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_stream,
            stderr=log_stream,
            pass_fds=(write_end, secrets_fd),
            start_new_session=True,
            cwd="/",
            env=daemon_environment(),
        )
    os.close(write_end)
    os.close(secrets_fd)
    with os.fdopen(read_end, "rb") as ready:
        message = ready.read().decode(errors="replace").strip()
    if message == "mounted":
        return 0
    process.wait()
    if not message:
        message = f"daemon exited with status {process.returncode}; see {log_file}"
    raise CommandError(message)


def _target_view_argv(args: argparse.Namespace, ready_fd: int, secrets_fd: int) -> list[str]:
    """The command line of this mount's target-view daemon: the daemon's own, plus
    --view-daemon (daemon/targetview.py)."""
    child = argparse.Namespace(**vars(args))
    child.view_daemon, child.foreground = True, True
    child.ready_fd, child.secrets_fd = ready_fd, secrets_fd
    for name in _PATHS:
        value = getattr(child, name)
        if value is not None:
            setattr(child, name, os.path.abspath(value))
    return [sys.executable, "-m", "isofs", "mount", *_argv_of(args.parser, child)]


def _argv_of(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The command line that makes `parser` parse back to `args` (defaults left out).

    Built from the parser's own actions, so a flag added to `isofs mount` (or declared by a
    provider) reaches the daemon without a second list of flags beside the parser.
    """
    positionals: list[str] = []
    optionals: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.dest in _NOT_FOR_THE_DAEMON:
            continue
        value = getattr(args, action.dest, action.default)
        if not action.option_strings:
            positionals.append(str(value))
            continue
        if value == action.default or value is None:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith("--") else (
            action.option_strings[0])  # fmt: skip
        if isinstance(action, argparse.BooleanOptionalAction):
            optionals.append(flag if value else "--no-" + flag[2:])
        elif isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction):
            optionals.append(flag)
        elif isinstance(action, argparse._AppendAction):
            optionals += [_with_value(flag, item) for item in value]
        else:
            optionals.append(_with_value(flag, value))
    return [*optionals, "--", *positionals]


def _with_value(flag: str, value: object) -> str:
    """`--flag=value` as one word: the daemon's first, lenient look at its command line
    (which providers' flags to add) would take the value of a flag it does not know yet
    (a provider's `--level 9`) for the source."""
    return f"{flag}={value}" if flag.startswith("--") else f"{flag}{value}"


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
    if record is None:
        return 0
    if not runtime.pid_alive(record.pid) or _is_zombie(record.pid):
        record.remove()  # a killed daemon could not clean up after itself
        return 0
    if args.lazy:  # a busy mount's daemon serves its last users, then exits by itself
        print(f"detached {args.mountpoint}; the daemon exits when its last user is gone")
        return 0
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


def cmd_init(args: argparse.Namespace) -> int:
    own = _provider_options(args, "init")
    shared = {"keyfile": args.keyfile} if args.keyfile else {}
    request = SetupRequest(options=shared, secrets=_secrets(args))
    init_source(args.source, args.provider, request, own)
    print(f"initialised {args.source} with provider stack: {' -> '.join(args.provider)}")
    for label, value in request.report.items():  # shown once, never stored (a recovery key)
        print(
            f"Your {label.replace('_', ' ')} is printed once, here, and stored nowhere. Keep it"
            f" offline (see `isofs mount --help` for its use):\n\n    {value}\n"
        )
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not command:
        raise CommandError("exec needs a command: isofs exec --view VIEW -- CMD [ARGS...]")
    join_view_group(args.view, os.getpid())
    try:
        if args.view == VIEW_NATIVE:  # the source itself at every mount point: no FUSE at all
            namespaces.enter_native_view()
        else:  # the mount's target-view daemon: a one-view mount, cacheable names
            namespaces.enter_target_view()
    except namespaces.NamespaceError as exc:
        raise CommandError(str(exc)) from None
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        raise CommandError(f"cannot run {command[0]}: {exc.strerror}") from None


def cmd_status(args: argparse.Namespace) -> int:
    mountpoint = os.path.realpath(args.mountpoint)
    record = runtime.MountRecord.load(mountpoint)
    if record is None or not runtime.is_mounted(mountpoint):
        raise CommandError(f"not an isofs mount: {args.mountpoint}")
    try:
        status = request_status(record.control)
    except (OSError, ValueError) as exc:
        raise CommandError(f"daemon {record.pid} does not answer: {exc}") from None
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(format_status(status))
    return 0


def cmd_providers(args: argparse.Namespace) -> int:
    for name, loader in sorted(available_providers().items()):
        try:
            provider = loader()
            doc = (provider.__doc__ or "").strip().splitlines()[0:1]
        except Exception as exc:  # a broken plugin must not hide the others
            doc = [f"(cannot load: {exc})"]
        print(f"{name:12} {doc[0] if doc else ''}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    from isofs import maintenance

    old = KeyFileSecrets(args.keyfile) if args.keyfile else _secrets(args)
    if args.new_passfile is None and not sys.stdin.isatty():
        raise CommandError("a new passphrase is needed: use --new-passfile or a terminal")
    new = InteractiveSecrets(passfile=args.new_passfile)
    options = {k: v for own in _provider_options(args, "passwd").values() for k, v in own.items()}
    try:
        changed = maintenance.change_passphrase(args.source, old, new, options=options)
    except maintenance.MaintenanceError as exc:
        raise CommandError(str(exc)) from None
    print(f"changed the passphrase of {args.source} ({', '.join(changed)}); no data re-encrypted")
    return 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from isofs import maintenance

    report = _maintain(
        args, maintenance.fsck_source, repair=args.repair, force=args.force, progress=True
    )
    if args.json:
        print(json.dumps(report.as_json(), indent=2))
    else:
        print("\n".join(report.lines()))
    return int(report.exit_code)


def cmd_migrate(args: argparse.Namespace) -> int:
    from isofs import maintenance

    report = _maintain(args, maintenance.migrate_source, force=args.force, progress=True)
    print(report.summary())
    if report.failed:
        raise CommandError(f"{len(report.failed)} files could not be migrated (see above)")
    return 0


def _maintain(args: argparse.Namespace, run: Any, **kwargs: Any) -> Any:
    """Run fsck or migrate with the command line's secrets; errors become one line."""
    from isofs import maintenance

    options = {"keyfile": args.keyfile} if args.keyfile else {}
    request = SetupRequest(options=options, secrets=_secrets(args))
    try:
        return run(args.source, request, **kwargs)
    except maintenance.MaintenanceError as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:
        raise CommandError(f"{exc.filename or args.source}: {exc.strerror or exc}") from None


def cmd_bench(args: argparse.Namespace) -> int:
    from isofs import bench

    return bench.run(args)


_COMMANDS = {
    "mount": cmd_mount,
    "umount": cmd_umount,
    "init": cmd_init,
    "exec": cmd_exec,
    "status": cmd_status,
    "providers": cmd_providers,
    "passwd": cmd_passwd,
    "fsck": cmd_fsck,
    "migrate": cmd_migrate,
    "bench": cmd_bench,
}
