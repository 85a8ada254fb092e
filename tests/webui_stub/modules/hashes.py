"""A1111's hash cache: sha256 of a file, remembered by title (here in memory, A1111 1.10.1 keeps
it in a diskcache under cache/hashes). As A1111 1.10.1 does, a cached value is taken for any file
of that title that is not newer than the file it was computed for."""

import hashlib
import os

_caches: dict[str, dict] = {}


def cache(subsection):
    return _caches.setdefault(subsection, {})


def sha256(filename, title, use_addnet_hash=False):
    hashes = cache("hashes-addnet" if use_addnet_hash else "hashes")
    mtime = os.path.getmtime(filename)
    cached = hashes.get(title)
    if cached is None or mtime > cached.get("mtime", 0) or cached.get("sha256") is None:
        with open(filename, "rb") as file:
            cached = {"mtime": mtime, "sha256": hashlib.sha256(file.read()).hexdigest()}
        hashes[title] = cached
    return cached["sha256"]
