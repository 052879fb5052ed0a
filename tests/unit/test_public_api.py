"""The public surface: __all__ is sorted and complete, and every name in it imports."""

from __future__ import annotations

import shardrouter
import shardrouter.errors


def test_all_is_sorted_and_importable() -> None:
    assert shardrouter.__all__ == sorted(shardrouter.__all__)
    for name in shardrouter.__all__:
        assert getattr(shardrouter, name) is not None, name


def test_every_error_is_exported_and_rooted() -> None:
    for name in shardrouter.errors.__all__:
        cls = getattr(shardrouter.errors, name)
        assert issubclass(cls, shardrouter.ShardRouterError), name
        assert name in shardrouter.errors.__doc__, f"{name} missing from the tree drawing"
