"""The identity provider: the target view shows the native bytes unchanged."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from isofs.provider import Layer, Provider, RandomAccessFile, SetupRequest


class PassthroughLayer(Layer):
    """A layer that changes nothing; every file is in its 'format'."""

    block_size = 1

    def is_formatted(self, lower: RandomAccessFile) -> bool:
        return True

    def open(self, lower: RandomAccessFile) -> RandomAccessFile:
        return lower

    def create(self, lower: RandomAccessFile) -> RandomAccessFile:
        return lower

    def logical_size(self, lower_size: int) -> int | None:
        return lower_size


class PassthroughProvider(Provider):
    """Shows native bytes in every view (a baseline and a test of the plumbing)."""

    name = "passthrough"

    @classmethod
    def load(cls, meta_dir: Path, config: Mapping[str, Any], request: SetupRequest) -> Layer:
        return PassthroughLayer()
