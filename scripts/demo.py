"""Mount a demo source directory and show what processes see through the mount.

Run by `./dev demo`. Everything it creates lives in a temporary directory that is removed
at the end; the mount is always unmounted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def isofs(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "isofs", *args], check=True)


def show(title: str, command: list[str]) -> None:
    print(f"\n$ {' '.join(command)}    # {title}")
    subprocess.run(command, check=False)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="isofs-demo-"))
    source, mountpoint = work / "source", work / "mnt"
    source.mkdir()
    mountpoint.mkdir()
    (source / "hello.txt").write_text("Hello from the native directory.\n")
    (source / "notes").mkdir()
    (source / "notes" / "todo.md").write_text("- try isofs\n")
    mounted = False
    try:
        isofs("mount", str(source), str(mountpoint))
        mounted = True
        print(f"mounted {source} on {mountpoint}")
        show("listing through the mount", ["ls", "-lR", str(mountpoint)])
        show("a process reading through the mount", ["cat", str(mountpoint / "hello.txt")])
        (mountpoint / "written-through-mount.txt").write_text("written via isofs\n")
        show("the write landed in the source", ["cat", str(source / "written-through-mount.txt")])
    finally:
        if mounted:
            isofs("umount", str(mountpoint))
            print(f"\nunmounted {mountpoint}")
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
