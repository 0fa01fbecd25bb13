"""Mount an encrypted demo source and show what two processes see through the same mount.

Run by `./dev demo` (as root: `isofs exec` places processes in a cgroup). Everything it
creates lives in a temporary directory that is removed at the end; the mount is always
unmounted, even when a step fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ISOFS = [sys.executable, "-m", "isofs"]


def run(title: str, command: list[str]) -> None:
    shown = " ".join(c if " " not in c else repr(c) for c in command)
    print(f"\n# {title}\n$ {shown.replace(sys.executable + ' -m isofs', 'isofs')}", flush=True)
    subprocess.run(command, check=True)


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="isofs-demo-"))
    source, mnt, passfile = work / "source", work / "mnt", work / "passphrase"
    source.mkdir()
    mnt.mkdir()
    passfile.write_text("demo passphrase\n")
    passfile.chmod(0o600)
    (source / "before-init.txt").write_text("a plain file that existed before init\n")
    mounted = False
    try:
        run("record an encrypting provider stack for the source",
            [*ISOFS, "init", str(source), "--provider", "encrypt", "--passfile", str(passfile)])
        run("mount it; processes get the native view unless a rule or isofs exec says otherwise",
            [*ISOFS, "mount", str(source), str(mnt), "--passfile", str(passfile)])
        mounted = True
        secret = mnt / "diary.txt"
        run("a target-view process writes a file",
            [*ISOFS, "exec", "--view", "target", "--", "sh", "-c",
             f"echo 'Dear diary, the launch code is 0000.' > {secret}"])
        run("the target view: plaintext, logical sizes",
            [*ISOFS, "exec", "--view", "target", "--", "sh", "-c", f"ls -l {mnt}; cat {secret}"])
        run("any other process (a backup tool, say): ciphertext, native sizes, the key store",
            ["sh", "-c", f"ls -la {mnt}; od -A d -c {secret} | head -4"])
        run("live statistics of the mount", [*ISOFS, "status", str(mnt)])
    finally:
        if mounted:
            run("unmount", [*ISOFS, "umount", str(mnt)])
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
