"""A1111's hash cache: sha256 of a file, remembered by title (here in memory, A1111 keeps it in
cache.json). As A1111 1.10.1 does, a cached value is taken for any file of that title that is
not newer than the file it was computed for."""

import hashlib
import os

cache = {}


def sha256(filename, title, use_addnet_hash=False):
    mtime = os.path.getmtime(filename)
    cached = cache.get(title)
    if cached is None or mtime > cached["mtime"]:
        with open(filename, "rb") as file:
            cached = {"mtime": mtime, "sha256": hashlib.sha256(file.read()).hexdigest()}
        cache[title] = cached
    return cached["sha256"]
