"""The command line: `isofs` (commands.py), `mount.fuse.isofs` for mount(8) and fstab
(fstab.py), provider flags built from the options providers declare (provider_flags.py), and
where passphrases come from (passphrases.py)."""

from isofs.cli.commands import main

__all__ = ["main"]
