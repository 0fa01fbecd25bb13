#!/usr/bin/env python3
"""Random-write amplification of the `compress` layer alone (no FUSE, no timings).

The `rw-*` rows of bench/compress.py, at the layer: the same 100 MiB file of the source
tree's bytes repeated, the same seeded 4 KiB writes (payloads: other 4 KiB of the corpus, or
random bytes), each followed by a flush (what fsync does through a mount), over an in-memory
native file. It counts what the layer wrote to the native file (`lower_bytes_written`),
its relayouts and in-place rewrites, per slice of the writes, and the native size before and
after (the ratio the headroom costs). Byte counts do not depend on the machine's load, so
this runs anywhere; it takes about a minute.

    python bench/compress_rw.py [--writes N] [--slice N] [--frame-size S] [--payload text|random]
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if importlib.util.find_spec("isofs") is None:
    sys.path.insert(0, str(BENCH_DIR.parent))

from isofs.provider import MemoryFile  # noqa: E402
from isofs_providers.compress import CompressLayer  # noqa: E402

MiB = 1 << 20
PAGE = 4096
#: bench/compress.py's seed: the random writes use SEED + 3 there.
SEED = 20240609
COUNTERS = ("lower_bytes_written", "tail_rewrites", "tail_bytes", "local_relayouts",
            "local_bytes", "in_place_rewrites")




def load_corpus() -> bytes:
    """bench/compress.py's corpus: every file of the source tree, by relative path."""
    spec = importlib.util.spec_from_file_location("isofs_bench_compress", BENCH_DIR / "compress.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench
    spec.loader.exec_module(bench)
    root = bench.default_source_tree()
    files = bench.source_tree_files(bench.FULL, root)
    return b"".join(path.read_bytes() for path, _rel, _size in sorted(files, key=lambda f: f[1]))


def counters(layer: CompressLayer) -> dict[str, int]:
    stats: dict[str, Any] = layer.statistics()
    return {k: int(stats.get(k, 0)) for k in COUNTERS}  # (older versions lack local_*)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file-size", type=int, default=100, help="MiB (default 100)")
    parser.add_argument("--writes", type=int, default=300, help="default 300, as the bench")
    parser.add_argument("--slice", type=int, default=100, help="writes per reported slice")
    parser.add_argument("--frame-size", type=int, default=128, help="KiB (default 128)")
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--payload", choices=("text", "random"), default="text")
    args = parser.parse_args(argv)

    corpus = load_corpus()
    size = args.file_size * MiB
    content = (corpus * (size // len(corpus) + 1))[:size]
    layer = CompressLayer(args.frame_size << 10, args.level)
    native = MemoryFile()
    upper = layer.create(native)
    t0 = time.perf_counter()
    for start in range(0, size, MiB):  # as bench/compress.py writes it: 1 MiB writes
        upper.write(start, content[start : start + MiB])
    upper.flush()
    sequential = native.size()
    elapsed = time.perf_counter() - t0
    print(f"corpus {len(corpus) / 1e6:.1f} MB; file {args.file_size} MiB, frames "
          f"{args.frame_size} KiB, level {args.level}: native {sequential / 1e6:.2f} MB "
          f"(ratio {size / sequential:.3f}x), written in {elapsed:.1f} s")  # fmt: skip

    rng = random.Random(SEED + 3)
    plan = [(rng.randrange(size // PAGE) * PAGE, rng.randrange(len(corpus) - PAGE))
            for _ in range(args.writes)]  # fmt: skip
    noise = random.Random(SEED + 4)
    model = bytearray(content)
    first = counters(layer)
    mark = dict(first)
    print(f"{'writes':>11} {'KiB/write':>10} {'relayouts':>9} {'MB':>6} {'local':>5} {'MB':>5} "
          f"{'in place':>8} {'native MB':>9} {'ratio':>6}")  # fmt: skip
    for i, (offset, source) in enumerate(plan, 1):
        text = args.payload == "text"
        data = corpus[source : source + PAGE] if text else noise.randbytes(PAGE)
        upper.write(offset, data)
        upper.flush()
        model[offset : offset + PAGE] = data
        if i % args.slice == 0 or i == len(plan):
            now = counters(layer)
            done = i - (i - 1) // args.slice * args.slice
            d = {k: now[k] - mark[k] for k in COUNTERS}
            print(f"{i - done + 1:>5}-{i:<5} {d['lower_bytes_written'] / done / 1024:>10.1f} "
                  f"{d['tail_rewrites']:>9} {d['tail_bytes'] / 1e6:>6.1f} "
                  f"{d['local_relayouts']:>5} {d['local_bytes'] / 1e6:>5.1f} "
                  f"{d['in_place_rewrites']:>8} {native.size() / 1e6:>9.2f} "
                  f"{size / native.size():>6.3f}")  # fmt: skip
            mark = now
    total = {k: mark[k] - first[k] for k in COUNTERS}
    print(f"{'all':>11} {total['lower_bytes_written'] / len(plan) / 1024:>10.1f} "
          f"{total['tail_rewrites']:>9} {total['tail_bytes'] / 1e6:>6.1f} "
          f"{total['local_relayouts']:>5} {total['local_bytes'] / 1e6:>5.1f} "
          f"{total['in_place_rewrites']:>8}; native grew "
          f"{(native.size() - sequential) / sequential:+.1%}")  # fmt: skip
    again = CompressLayer(args.frame_size << 10, args.level).open(native)
    same = again.read(0, size) == model
    print("read back equal to the model" if same else "READ BACK DIFFERS FROM THE MODEL")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
