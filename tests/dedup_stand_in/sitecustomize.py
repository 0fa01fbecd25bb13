"""Until the embedded chunk store is merged, let `isofs_providers.dedup.store.embedded` be the
stand-in next to this file (a real, persistent ChunkStore over SQLite, for the mounted tests).

Put on PYTHONPATH by tests/test_dedup_mounted.py only when the real module is missing; the
finder is last on sys.meta_path, so a real module always wins. Delete this folder once the
store is merged.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_NAME = "isofs_providers.dedup.store.embedded"


class _StandInFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != _NAME:
            return None
        return importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("embedded_stand_in.py")
        )


sys.meta_path.append(_StandInFinder())
