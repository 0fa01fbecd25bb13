"""How secrets reach a daemon: an inherited pipe holding what the foreground command used.

Secrets never touch the disk, the command line or the environment: `isofs mount` (and a shared
mount's daemon starting its target-view daemon) writes them into a pipe the child inherits.
"""

from __future__ import annotations

import base64
import json
import os

from isofs.provider import ProviderError


class ForwardedSecrets:
    """The daemon's SecretSource: exactly what the foreground command used."""

    def __init__(self, given: dict[str, bytes]) -> None:
        self.given = given

    def passphrase(self, prompt: str, *, confirm: bool = False) -> bytes:
        try:
            return self.given["passphrase"]
        except KeyError:
            raise ProviderError("the daemon was not given a passphrase") from None

    def master_key(self) -> bytes | None:
        return self.given.get("master_key")


def send_secrets(given: dict[str, bytes]) -> int:
    """A pipe read end holding `given`, for the daemon to inherit (small: fits the buffer)."""
    read_end, write_end = os.pipe()
    payload = json.dumps({k: base64.b64encode(v).decode() for k, v in given.items()}).encode()
    os.write(write_end, payload)
    os.close(write_end)
    return read_end


def receive_secrets(fd: int) -> dict[str, bytes]:
    with os.fdopen(fd, "rb") as stream:
        payload = stream.read()
    return {k: base64.b64decode(v) for k, v in json.loads(payload or b"{}").items()}
