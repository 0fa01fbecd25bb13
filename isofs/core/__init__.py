"""The filesystem core: everything between a request and the native files, without FUSE.

`Volume` (volume.py) serves lookups, attributes, handles and I/O per view over an inode table
(inodes.py), sections with their locks and pages (sections.py, locks.py, pagecache.py), the
persistent size cache (sizecache.py), view names (names.py) and native *at() I/O (native.py).
Nothing here imports pyfuse3, the daemon, the CLI or any provider by name.
"""

#: The source's metadata directory at its root: shown to the native view only.
METADATA_DIR_NAME = ".isofs"
