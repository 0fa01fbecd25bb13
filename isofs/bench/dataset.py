"""The tree `isofs bench` lists: N files written through a provider's target view.

The shape is what makes enumeration cost what it costs on a real busy directory: most files in
one large directory, the rest in a few small and nested ones, log-normal sizes (a median of
4 KiB and a long tail, capped at 4 MiB), a few empty files (no provider read can tell their
size) and some hard links (one inode, two names). The bytes are text-like with a share of
random data, so a compressing provider sees something between the best and the worst case.
Everything comes from a fixed seed: the same tree on every run and every machine.
"""

from __future__ import annotations

import math
import os
import random
import zlib
from dataclasses import dataclass, field

SEED = 20261201
MEDIAN_SIZE = 4096
SIGMA = 1.2
MAX_SIZE = 4 << 20
EMPTY_SHARE = 0.01
RANDOM_SHARE = 0.2
LINK_SHARE = 0.02
#: Directories besides the large one, and the share of the files they hold.
SMALL_DIRS = ("docs", "src", "src/lib", "src/lib/deep", "logs")
SMALL_SHARE = 0.25
LARGE_DIR = "data"
#: The large directory's entries at most: past it, its files go to data/part-NN. One
#: directory's listing holds a native handle per entry in the daemon (README, limits), and
#: where the open-files limit cannot be raised (a container's) 100,000 files in one
#: directory would exhaust it; a tree of 10,000-entry directories is the shape measured.
LARGE_DIR_MAX = 10_000
LINK_DIR = "links"
EXTENSIONS = (".txt", ".log", ".json", ".dat", ".csv")
META_DIR = ".isofs"


@dataclass
class Tree:
    """What was written: path -> (logical size, crc32 of the bytes), and the directories."""

    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # link path -> file it names
    directories: list[str] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """Names a full listing shows: files, hard links and directories."""
        return len(self.files) + len(self.links) + len(self.directories)

    def expected(self) -> dict[str, tuple[int, int]]:
        """Every file name (links included) -> what reading it must give."""
        out = dict(self.files)
        for link, target in self.links.items():
            out[link] = self.files[target]
        return out


def _text_pool(rng: random.Random, size: int = 1 << 20) -> bytes:
    """Bytes that read like log lines: words from a small vocabulary, numbers, newlines."""
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(1500)]  # fmt: skip
    parts: list[str] = []
    length = 0
    while length < size:
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 14)))
        line = f"{rng.randint(0, 10**6):07d} {line}\n"
        parts.append(line)
        length += len(line)
    return "".join(parts).encode()[:size]


def _slice(source: bytes, start: int, size: int) -> bytes:
    """`size` bytes of `source` from `start`, wrapping around (no copy of the whole pool)."""
    if start + size <= len(source):
        return source[start : start + size]
    parts = [source[start:]]
    missing = size - len(parts[0])
    while missing > 0:
        parts.append(source[:missing])
        missing -= len(parts[-1])
    return b"".join(parts)


def file_sizes(count: int, rng: random.Random) -> list[int]:
    sizes = []
    for _ in range(count):
        if rng.random() < EMPTY_SHARE:
            sizes.append(0)
        else:
            sizes.append(min(MAX_SIZE, max(1, int(rng.lognormvariate(math.log(MEDIAN_SIZE),
                                                                       SIGMA)))))
    return sizes


def plan(count: int) -> list[tuple[str, int, bool]]:
    """(relative path, size, random bytes?) for `count` files, the same for a given count."""
    rng = random.Random(SEED + count)
    sizes = file_sizes(count, rng)
    out = []
    parts = math.ceil(count * (1 - SMALL_SHARE) * 1.05 / LARGE_DIR_MAX)  # 5%: the draw's spread
    for index, size in enumerate(sizes):
        small = rng.random() < SMALL_SHARE
        directory = SMALL_DIRS[index % len(SMALL_DIRS)] if small else LARGE_DIR
        if not small and parts > 1:
            directory = f"{LARGE_DIR}/part-{index % parts:02d}"
        name = f"file-{index:07d}{EXTENSIONS[index % len(EXTENSIONS)]}"
        out.append((f"{directory}/{name}", size, rng.random() < RANDOM_SHARE))
    return out


def build(root: str, count: int, progress: object = None) -> Tree:
    """Write the tree, hard links included, under `root` (a mounted target view);
    `progress.update(1)` per file."""
    rng = random.Random(SEED)
    pool = _text_pool(rng)
    noise = rng.randbytes(1 << 20)
    tree = Tree()
    for directory in (LARGE_DIR, *SMALL_DIRS, LINK_DIR):
        os.makedirs(os.path.join(root, directory), exist_ok=True)
        tree.directories.append(directory)
    planned = plan(count)
    for directory in sorted({os.path.dirname(path) for path, _, _ in planned}):
        if directory not in tree.directories:
            os.makedirs(os.path.join(root, directory), exist_ok=True)
            tree.directories.append(directory)
    for path, size, random_bytes in planned:
        source = noise if random_bytes else pool
        data = _slice(source, rng.randrange(len(source)), size)
        with open(os.path.join(root, path), "wb") as f:
            f.write(data)
        tree.files[path] = (size, zlib.crc32(data))
        if progress is not None:
            progress.update(1)  # type: ignore[attr-defined]
    linked = rng.sample(range(len(planned)), k=int(len(planned) * LINK_SHARE))
    for index in linked:
        tree.links[f"{LINK_DIR}/link-{index:07d}"] = planned[index][0]
    make_links(tree, root)
    return tree


def make_links(tree: Tree, root: str) -> None:
    for link, target in tree.links.items():
        os.link(os.path.join(root, target), os.path.join(root, link))


def native_expectations(root: str) -> dict[str, tuple[int, int]]:
    """path -> (size, crc32) of every regular file as stored on disk (the native view)."""
    out: dict[str, tuple[int, int]] = {}
    for path in file_paths(root):
        with open(os.path.join(root, path), "rb") as f:
            data = f.read()
        out[path] = (len(data), zlib.crc32(data))
    return out


def file_paths(root: str) -> list[str]:
    """Relative paths of the regular files under `root`, metadata directory left out."""
    from isofs.bench.helper import walk

    return sorted(path for path, entry in walk(root) if entry.is_file(follow_symlinks=False))


def count_entries(root: str) -> int:
    """Names a full listing of `root` shows (metadata directory left out)."""
    count = 0
    pending = [root]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as listing:
            for entry in listing:
                if directory == root and entry.name == META_DIR:
                    continue
                count += 1
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return count
