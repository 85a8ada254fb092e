"""A1111's hash cache: sha256 of a file, remembered by title (here in memory)."""

import hashlib

cache = {}


def sha256(filename, title, use_addnet_hash=False):
    if title not in cache:
        with open(filename, "rb") as file:
            cache[title] = hashlib.sha256(file.read()).hexdigest()
    return cache[title]
