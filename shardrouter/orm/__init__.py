"""The SQLAlchemy ORM session on top of the engine layer: every flush and query is routed by
the same planner and write path as the Router (no second copy of its logic)."""

from .session import Placement, RoutedSession, routed_sessionmaker

__all__ = ["Placement", "RoutedSession", "routed_sessionmaker"]
