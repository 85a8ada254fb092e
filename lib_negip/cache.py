"""Small bounded caches: loaded models, image features and image tokens."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from PIL import Image

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A least-recently-used mapping holding at most ``limit`` entries (0 keeps nothing)."""

    def __init__(self, limit: int, on_evict: Callable[[K, V], None] | None = None) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._limit = max(int(limit), 0)
        self._on_evict = on_evict

    @property
    def limit(self) -> int:
        return self._limit

    def set_limit(self, limit: int) -> None:
        self._limit = max(int(limit), 0)
        self._shrink()

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        self._shrink()

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def evict(self, key: K) -> None:
        """Drop ``key``, as the limit would (``on_evict`` runs); nothing when it is absent."""
        if key in self._items:
            value = self._items.pop(key)
            if self._on_evict is not None:
                self._on_evict(key, value)

    def clear(self) -> None:
        while self._items:
            key, value = self._items.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(key, value)

    def keys(self) -> list[K]:
        return list(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def _shrink(self) -> None:
        while len(self._items) > self._limit:
            key, value = self._items.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(key, value)


def image_digest(image: Image.Image) -> str:
    """A content key for an image: equal pixels give equal keys, whatever object holds them."""
    digest = hashlib.sha256()
    digest.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
