"""The phase table of a resharding migration (pure): which action is legal in which phase,
the phase it leads to, and why every other one is refused (docs/RESHARDING.md, "The phases").

::

    planned -start-> prepared -copy-> (copying) -> copied -verify-> verified -switch-> switched
    switched -finalize-> finalized          switched -rollback-> verified (the switch run back)
    prepared|copying|copied|verified -rollback-> rolled_back
    planned|prepared|copying|copied|verified|rolled_back -cancel-> cancelled (target cleaned)

``copying`` is the phase recorded while a copy runs (:func:`running`): a copy interrupted
there is resumed by ``copy`` again. ``verify`` may run again in ``verified``. ``shadow``
(SHADOW reads for a while: answers from the sources, compared with the targets) runs in
``copied`` and ``verified`` and leaves the phase as it was; so does ``drain`` (the journals
into the mirrors, in ``copied``, ``verified`` and ``switched``). Reads move with the writes at the
switch (no NEW_PERCENT read mode: a target's copy lags its source by the drain, so a read
served from it before the switch could miss the caller's own write). ``advance`` is the
one next action of the forward path; it stops at ``switched`` (finalize deletes the source's
copy, so it is always asked for explicitly). ``finalized`` and ``cancelled`` are terminal.
"""

from __future__ import annotations

from typing import Literal, get_args

from ..errors import ReshardStateError

Phase = Literal[
    "planned",
    "prepared",
    "copying",
    "copied",
    "verified",
    "switched",
    "finalized",
    "cancelled",
    "rolled_back",
]
Action = Literal[
    "start",
    "copy",
    "verify",
    "switch",
    "rollback",
    "cancel",
    "finalize",
    "shadow",
    "drain",
    "advance",
]
PHASES: tuple[str, ...] = get_args(Phase)
ACTIONS: tuple[str, ...] = get_args(Action)
TERMINAL: frozenset[str] = frozenset({"finalized", "cancelled"})
"""Phases that accept no action: the migration is over."""
ACTIVE: frozenset[str] = frozenset(PHASES) - TERMINAL
"""Phases of a migration that still holds its slots (no other migration may move them)."""

# (phase, action) -> the phase once the action completed. "advance" is derived from _FORWARD.
_TABLE: dict[tuple[str, str], str] = {
    ("planned", "start"): "prepared",
    ("planned", "cancel"): "cancelled",
    ("prepared", "copy"): "copied",
    ("prepared", "rollback"): "rolled_back",
    ("prepared", "cancel"): "cancelled",
    ("copying", "copy"): "copied",
    ("copying", "rollback"): "rolled_back",
    ("copying", "cancel"): "cancelled",
    ("copied", "verify"): "verified",
    ("copied", "shadow"): "copied",
    ("copied", "drain"): "copied",
    ("verified", "shadow"): "verified",
    ("verified", "drain"): "verified",
    ("switched", "drain"): "switched",
    ("copied", "rollback"): "rolled_back",
    ("copied", "cancel"): "cancelled",
    ("verified", "verify"): "verified",
    ("verified", "switch"): "switched",
    ("verified", "rollback"): "rolled_back",
    ("verified", "cancel"): "cancelled",
    ("switched", "rollback"): "verified",
    ("switched", "finalize"): "finalized",
    ("rolled_back", "cancel"): "cancelled",
}

# The forward path's next action in each phase (advance); absent: advance refuses.
_FORWARD: dict[str, str] = {
    "planned": "start",
    "prepared": "copy",
    "copying": "copy",
    "copied": "verify",
    "verified": "switch",
}

# The phase recorded while an action runs, when it has one (a resumable long action).
_RUNNING: dict[str, str] = {"copy": "copying"}

_ORDER = {phase: i for i, phase in enumerate(PHASES)}


def legal(phase: str) -> tuple[str, ...]:
    """The actions accepted in ``phase``, in the table's order (``advance`` last when it is
    one of them); empty for a terminal phase."""
    _known_phase(phase)
    actions = tuple(a for a in ACTIONS if (phase, a) in _TABLE)
    return actions + (("advance",) if phase in _FORWARD else ())


def next_action(phase: str) -> str | None:
    """The action ``advance`` performs in ``phase`` (None where advance refuses)."""
    _known_phase(phase)
    return _FORWARD.get(phase)


def check(phase: str, action: str) -> str:
    """The phase ``action`` leads to from ``phase``; ReshardStateError naming the phase, the
    refused action, why it is refused and (``.legal``) the actions allowed now."""
    _known_phase(phase)
    if action not in ACTIONS:
        raise ReshardStateError(
            f"unknown action {action!r} (known: {', '.join(ACTIONS)})", legal=legal(phase)
        )
    resolved = _FORWARD.get(phase) if action == "advance" else action
    target = None if resolved is None else _TABLE.get((phase, resolved))
    if target is None:
        raise ReshardStateError(
            f"migration is {phase}: {action} refused: {_why(phase, action)}", legal=legal(phase)
        )
    return target


def running(phase: str, action: str) -> str:
    """The phase to record while ``action`` runs from ``phase`` (``copying`` for a copy; the
    phase itself for an action without an in-progress phase). Refused like :func:`check`."""
    check(phase, action)
    resolved = _FORWARD[phase] if action == "advance" else action
    return _RUNNING.get(resolved, phase)


def forward_path(phase: str, through: Literal["switched", "finalized"] = "switched") -> list[str]:
    """The actions ``run`` performs from ``phase`` to reach ``through``: the forward path's
    actions (``finalize`` only when asked for). Empty when ``phase`` is there already, or past
    it; ReshardStateError when the forward path cannot reach it (rolled back, cancelled)."""
    _known_phase(phase)
    if through not in ("switched", "finalized"):
        raise ReshardStateError(
            f"run through {through!r}: runs stop at switched or finalized", legal=legal(phase)
        )
    if phase in ("cancelled", "rolled_back"):
        raise ReshardStateError(
            f"migration is {phase}: it cannot run forward to {through}: {_why(phase, 'advance')}",
            legal=legal(phase),
        )
    actions: list[str] = []
    current = phase
    while current in _FORWARD:
        action = _FORWARD[current]
        actions.append(action)
        current = _TABLE[(current, action)]
    if through == "finalized" and current == "switched":
        actions.append("finalize")
    return actions


def _known_phase(phase: str) -> None:
    if phase not in _ORDER:
        raise ReshardStateError(
            f"unknown phase {phase!r} (known: {', '.join(PHASES)}); the migration record was"
            " changed outside shardctl or by a newer release"
        )


def _before(phase: str, other: str) -> bool:
    """``phase`` comes before ``other`` on the forward path (planned ... finalized)."""
    return _ORDER[phase] < _ORDER[other]


def _why(phase: str, action: str) -> str:
    """Why ``action`` is refused in ``phase``: the danger it would cause, or what to do."""
    if phase == "finalized":
        return (
            "the migration is over (the slots live on their targets, the sources were"
            " cleaned); plan a new migration to move slots again"
        )
    if phase == "cancelled":
        return (
            "the migration is over (nothing moved, the targets were cleaned); plan a new"
            " migration to try again"
        )
    if phase == "rolled_back":
        return (
            "the migration was rolled back (its moving ranges are gone, the sources own every"
            " slot and no journal keeps the copy current): only cancel is left, which deletes"
            " the targets' copy; plan again to retry"
        )
    return _WHY[action](phase)


def _why_start(phase: str) -> str:
    return f"the migration started already ({phase}); resume it with advance or run"


def _why_copy(phase: str) -> str:
    if phase == "planned":
        return (
            "copy before start would copy to targets with no schema and no journal triggers:"
            " writes during the copy would be lost; start first"
        )
    if phase == "switched":
        return (
            "after the switch the targets are the authority: copying from the sources would"
            " overwrite newer rows"
        )
    then = "verify it" if phase == "copied" else "switch (or verify again)"
    return f"the copy is complete and the journal keeps it current; {then}"


def _why_verify(phase: str) -> str:
    if _before(phase, "copied"):
        return (
            "verify before the copy finished would compare an incomplete copy (every row not"
            " copied yet would differ); copy first"
        )
    return (
        "after the switch the targets take the writes and the sources are the mirror; roll"
        " back to verify again"
    )


def _why_switch(phase: str) -> str:
    if _before(phase, "verified"):
        return (
            "switch writes before the copy was verified would route writes to an incomplete"
            " copy; copy and verify first"
        )
    return "the writes are switched already; finalize, or roll back"


def _why_rollback(phase: str) -> str:
    return "nothing was applied yet: cancel the plan instead"


def _why_cancel(phase: str) -> str:
    return (
        "cancel after the switch would drop the authority's rows; roll back first (the"
        " targets own the slots now: the rollback gives them back to the sources), then cancel"
    )


def _why_finalize(phase: str) -> str:
    return (
        "finalize before the switch would delete the only copy (the sources still own the"
        " slots and finalize deletes the moved rows from them); switch first"
    )


def _why_shadow(phase: str) -> str:
    if _before(phase, "copied"):
        return (
            "shadow reads before the copy finished would count every row not copied yet as a"
            " difference; copy first"
        )
    return (
        "shadow reads compare the targets with the sources before the switch; after it the"
        " targets answer every read (roll back to compare again)"
    )


def _why_drain(phase: str) -> str:
    if _before(phase, "copied"):
        return "the copy drains the journals as it goes; run copy (or resume) instead"
    return "no journal is kept in this phase"


def _why_advance(phase: str) -> str:
    return (
        "the switch is done; finalize is never automatic since it deletes the sources' copy"
        " (finalize explicitly, or roll back)"
    )


_WHY = {
    "start": _why_start,
    "copy": _why_copy,
    "verify": _why_verify,
    "switch": _why_switch,
    "rollback": _why_rollback,
    "cancel": _why_cancel,
    "finalize": _why_finalize,
    "shadow": _why_shadow,
    "drain": _why_drain,
    "advance": _why_advance,
}


__all__ = [
    "ACTIONS",
    "ACTIVE",
    "PHASES",
    "TERMINAL",
    "Action",
    "Phase",
    "check",
    "forward_path",
    "legal",
    "next_action",
    "running",
]
