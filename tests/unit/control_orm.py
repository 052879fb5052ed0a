"""Test helpers for the ORM over the control plane's SQLite cluster (control_cluster.py): the
mapped classes the test_control_* modules share, the version that moves slots [0, 10) from
s0 to s1, and plain SQL on one shard's file."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from sqlalchemy import ForeignKey, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"
    user_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    body: Mapped[str | None] = mapped_column()


class Order(Base):
    __tablename__ = "orders"
    order_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column()
    items: Mapped[list[Item]] = relationship(back_populates="order")


class Item(Base):
    __tablename__ = "order_items"
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.order_id"), primary_key=True)
    line: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column()
    order: Mapped[Order] = relationship(back_populates="items")


def moved(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` after a move of slots [0, 10) from s0 to s1."""
    doc = copy.deepcopy(raw)
    doc["shards"]["s0"]["slots"] = [[10, 256]]
    doc["shards"]["s1"]["slots"] = [[0, 10], [256, 512]]
    return doc


def sql(path: Path, statement: str, params: dict[str, Any] | None = None) -> list[Any]:
    """Run ``statement`` on the SQLite file ``path`` (committed); its rows, if any."""
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            result = conn.execute(text(statement), params or {})
            return list(result) if result.returns_rows else []
    finally:
        engine.dispose()
