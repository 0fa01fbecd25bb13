"""Offline maintenance of a source directory: `isofs passwd`, `isofs fsck`, `isofs migrate`.

Everything here works on the source directory itself, with the provider stack recorded by
`isofs init`; nothing needs FUSE, and nothing here knows a provider: the checks, repairs,
formatting and passphrases are the providers' (`isofs.provider` capabilities). fsck and
migrate refuse a source that is mounted (in place, or as the source of any isofs mount) unless
forced, and take an exclusive lock on `.isofs/maintenance.lock` so two of them never run on
one source at once. They walk the source the same way (`common.SourceWalk`).

- passphrase.py: `change_passphrase` (isofs passwd)
- checking.py: `fsck` (isofs fsck [--repair])
- migration.py: `migrate` (isofs migrate)
"""

from __future__ import annotations

import os

from isofs.maintenance.checking import FileReport, FsckReport, Problem, fsck
from isofs.maintenance.common import (
    MaintenanceError,
    Warn,
    check_not_mounted,
    exclusive,
    maintained_stack,
    mount_conflicts,
    require_initialised,
)
from isofs.maintenance.migration import MigrateReport, migrate
from isofs.maintenance.passphrase import change_passphrase
from isofs.provider import SetupRequest

__all__ = [
    "FileReport",
    "FsckReport",
    "MaintenanceError",
    "MigrateReport",
    "Problem",
    "change_passphrase",
    "check_not_mounted",
    "exclusive",
    "fsck",
    "fsck_source",
    "migrate",
    "migrate_source",
    "mount_conflicts",
    "require_initialised",
]


def fsck_source(
    source: str | os.PathLike[str],
    request: SetupRequest,
    *,
    repair: bool = False,
    force: bool = False,
    progress: bool = False,
) -> FsckReport:
    """`isofs fsck`: refuse a mounted source, lock, unlock the keys, check."""
    with maintained_stack(source, request, force=force, lock_required=repair) as stack:
        return fsck(source, stack, repair=repair, progress=progress)


def migrate_source(
    source: str | os.PathLike[str],
    request: SetupRequest,
    *,
    force: bool = False,
    progress: bool = False,
    warn: Warn | None = None,
) -> MigrateReport:
    """`isofs migrate`: refuse a mounted source, lock, unlock the keys, format files."""
    with maintained_stack(source, request, force=force, lock_required=True) as stack:
        return migrate(source, stack, progress=progress, warn=warn)
