"""Where passphrases and keys come from: prompt, --passfile, --extpass, --masterkey.

The foreground `isofs mount` gathers the secrets (so a wrong passphrase fails before anything
is mounted) and forwards what was used to the daemon through an inherited pipe: secrets never
touch the disk, the command line or the environment.
"""

from __future__ import annotations

import getpass
import subprocess
import sys

from isofs.provider import KeyFileSecrets, ProviderError

__all__ = ["InteractiveSecrets", "KeyFileSecrets"]


class InteractiveSecrets:
    """A SecretSource for the command line; remembers what it handed out for forwarding."""

    def __init__(
        self,
        passfile: str | None = None,
        extpass: str | None = None,
        masterkey: str | None = None,
    ) -> None:
        self.passfile = passfile
        self.extpass = extpass
        self.masterkey = masterkey
        self.given: dict[str, bytes] = {}

    def passphrase(self, prompt: str, *, confirm: bool = False) -> bytes:
        if "passphrase" in self.given:
            return self.given["passphrase"]
        if self.passfile is not None:
            secret = self._from_passfile(self.passfile)
        elif self.extpass is not None:
            secret = self._from_command(self.extpass)
        else:
            secret = self._from_prompt(prompt, confirm)
        if not secret:
            raise ProviderError("the passphrase is empty")
        self.given["passphrase"] = secret
        return secret

    def master_key(self) -> bytes | None:
        if self.masterkey is None:
            return None
        self.given["master_key"] = self.masterkey.encode()
        return self.given["master_key"]

    @staticmethod
    def _from_passfile(path: str) -> bytes:
        try:
            with open(path, "rb") as f:
                first_line = f.readline()
        except OSError as exc:
            raise ProviderError(f"cannot read passfile {path}: {exc.strerror}") from None
        return first_line.rstrip(b"\r\n")

    @staticmethod
    def _from_command(command: str) -> bytes:
        result = subprocess.run(command, shell=True, capture_output=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ProviderError(f"--extpass command failed with status {result.returncode}")
        return result.stdout.rstrip(b"\r\n")

    @staticmethod
    def _from_prompt(prompt: str, confirm: bool) -> bytes:
        if not sys.stdin.isatty():
            raise ProviderError("a passphrase is needed: use --passfile, --extpass or a terminal")
        first = getpass.getpass(prompt).encode()
        if confirm and getpass.getpass("Repeat passphrase: ").encode() != first:
            raise ProviderError("the passphrases do not match")
        return first
