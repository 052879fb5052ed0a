"""Where a statement's values come from: a named parameter or a literal in the SQL text."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlglot import exp

from ..errors import RoutingError


@dataclass(frozen=True, slots=True)
class ValueRef:
    """Where a key value comes from: a named parameter or a literal in the SQL text."""

    param: str | None
    literal: Any = None

    def resolve(self, params: Mapping[str, Any]) -> Any:
        if self.param is None:
            return self.literal
        try:
            return params[self.param]
        except KeyError:
            raise RoutingError(
                f"parameter :{self.param} has no value (pass it in params)"
            ) from None


def value_ref(node: exp.Expression) -> ValueRef | None:
    if isinstance(node, exp.Placeholder) and node.this:
        return ValueRef(param=str(node.this))
    if isinstance(node, exp.Literal):
        if node.is_string:
            return ValueRef(None, node.this)
        text = node.this
        try:
            return ValueRef(None, int(text))
        except ValueError:
            return None
    if isinstance(node, exp.Neg) and isinstance(node.this, exp.Literal):
        inner = value_ref(node.this)
        if inner is not None and isinstance(inner.literal, int):
            return ValueRef(None, -inner.literal)
    return None


__all__ = ["ValueRef", "value_ref"]
