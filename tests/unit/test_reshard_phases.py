"""shardrouter.reshard.phases: the phase table, checked exhaustively against a copy written out
here (every phase x action either leads to the expected phase or is refused with the reason
and the legal actions), plus advance, the in-progress phase and the forward path."""

from __future__ import annotations

import pytest

from shardrouter.errors import ReshardStateError
from shardrouter.reshard import phases

# Written out independently of the module: (phase, action) -> next phase.
EXPECTED: dict[tuple[str, str], str] = {
    ("planned", "start"): "prepared",
    ("planned", "cancel"): "cancelled",
    ("planned", "advance"): "prepared",
    ("prepared", "copy"): "copied",
    ("prepared", "rollback"): "rolled_back",
    ("prepared", "cancel"): "cancelled",
    ("prepared", "advance"): "copied",
    ("copying", "copy"): "copied",
    ("copying", "rollback"): "rolled_back",
    ("copying", "cancel"): "cancelled",
    ("copying", "advance"): "copied",
    ("copied", "verify"): "verified",
    ("copied", "shadow"): "copied",
    ("copied", "drain"): "copied",
    ("copied", "rollback"): "rolled_back",
    ("copied", "cancel"): "cancelled",
    ("copied", "advance"): "verified",
    ("verified", "verify"): "verified",
    ("verified", "shadow"): "verified",
    ("verified", "drain"): "verified",
    ("verified", "switch"): "switched",
    ("verified", "rollback"): "rolled_back",
    ("verified", "cancel"): "cancelled",
    ("verified", "advance"): "switched",
    ("switched", "rollback"): "verified",
    ("switched", "drain"): "switched",
    ("switched", "finalize"): "finalized",
    ("rolled_back", "cancel"): "cancelled",
}
PHASES = (
    "planned",
    "prepared",
    "copying",
    "copied",
    "verified",
    "switched",
    "finalized",
    "cancelled",
    "rolled_back",
)
ACTIONS = (
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
)


def test_the_module_knows_the_same_phases_and_actions() -> None:
    assert set(phases.PHASES) == set(PHASES)
    assert set(phases.ACTIONS) == set(ACTIONS)
    assert {"finalized", "cancelled"} == phases.TERMINAL
    assert set(PHASES) - {"finalized", "cancelled"} == phases.ACTIVE


@pytest.mark.parametrize("phase", PHASES)
@pytest.mark.parametrize("action", ACTIONS)
def test_every_phase_and_action(phase: str, action: str) -> None:
    expected = EXPECTED.get((phase, action))
    if expected is not None:
        assert phases.check(phase, action) == expected
        assert action in phases.legal(phase)
        return
    assert action not in phases.legal(phase)
    with pytest.raises(ReshardStateError) as exc:
        phases.check(phase, action)
    message = str(exc.value)
    assert f"migration is {phase}: {action} refused: " in message
    reason = message.split(" refused: ", 1)[1]
    assert len(reason) > 30  # a reason, not just the refusal
    assert exc.value.legal == phases.legal(phase)
    if phase in ("finalized", "cancelled"):
        assert exc.value.legal == ()
        assert "the migration is over" in message
    else:
        assert exc.value.legal, (phase, action)
        assert f"allowed now: {', '.join(exc.value.legal)}" in message


@pytest.mark.parametrize("phase", PHASES)
def test_legal_lists_exactly_the_accepted_actions(phase: str) -> None:
    accepted = {a for (p, a) in EXPECTED if p == phase}
    assert set(phases.legal(phase)) == accepted
    assert len(phases.legal(phase)) == len(accepted)


@pytest.mark.parametrize(
    ("phase", "action", "needle"),
    [
        (
            "copied",
            "switch",
            "switch writes before the copy was verified would route writes to an incomplete copy",
        ),
        ("prepared", "switch", "would route writes to an incomplete copy"),
        (
            "switched",
            "cancel",
            "cancel after the switch would drop the authority's rows; roll back first",
        ),
        ("verified", "finalize", "finalize before the switch would delete the only copy"),
        ("planned", "finalize", "would delete the only copy"),
        ("planned", "copy", "copy before start"),
        ("copying", "verify", "verify before the copy finished would compare an incomplete copy"),
        ("switched", "copy", "overwrite newer rows"),
        ("switched", "advance", "finalize is never automatic"),
        ("planned", "rollback", "nothing was applied yet: cancel the plan instead"),
        ("rolled_back", "advance", "only cancel is left"),
        ("verified", "start", "started already (verified)"),
    ],
)
def test_refusals_say_why(phase: str, action: str, needle: str) -> None:
    with pytest.raises(ReshardStateError) as exc:
        phases.check(phase, action)
    assert needle in str(exc.value)


def test_unknown_phase_and_action() -> None:
    with pytest.raises(ReshardStateError, match="unknown phase 'copyin'") as exc:
        phases.check("copyin", "copy")
    assert exc.value.legal == ()
    with pytest.raises(ReshardStateError, match="unknown action 'frobnicate'") as exc:
        phases.check("copied", "frobnicate")
    assert exc.value.legal == phases.legal("copied")
    with pytest.raises(ReshardStateError, match="unknown phase"):
        phases.legal("nope")


def test_advance_is_the_next_forward_action() -> None:
    assert {p: phases.next_action(p) for p in PHASES} == {
        "planned": "start",
        "prepared": "copy",
        "copying": "copy",
        "copied": "verify",
        "verified": "switch",
        "switched": None,
        "finalized": None,
        "cancelled": None,
        "rolled_back": None,
    }
    for phase in PHASES:
        action = phases.next_action(phase)
        if action is not None:
            assert phases.check(phase, "advance") == phases.check(phase, action)


def test_the_phase_recorded_while_an_action_runs() -> None:
    assert phases.running("prepared", "copy") == "copying"
    assert phases.running("copying", "copy") == "copying"
    assert phases.running("prepared", "advance") == "copying"
    assert phases.running("copied", "verify") == "copied"
    assert phases.running("verified", "switch") == "verified"
    with pytest.raises(ReshardStateError, match="copy before start"):
        phases.running("planned", "copy")


@pytest.mark.parametrize(
    ("phase", "through", "path"),
    [
        ("planned", "switched", ["start", "copy", "verify", "switch"]),
        ("planned", "finalized", ["start", "copy", "verify", "switch", "finalize"]),
        ("prepared", "switched", ["copy", "verify", "switch"]),
        ("copying", "switched", ["copy", "verify", "switch"]),
        ("copied", "finalized", ["verify", "switch", "finalize"]),
        ("verified", "switched", ["switch"]),
        ("switched", "switched", []),
        ("switched", "finalized", ["finalize"]),
        ("finalized", "finalized", []),
        ("finalized", "switched", []),
    ],
)
def test_forward_path(phase: str, through: str, path: list[str]) -> None:
    assert phases.forward_path(phase, through) == path  # type: ignore[arg-type]
    current = phase
    for action in path:  # the path is legal step by step and ends where asked
        current = phases.check(current, action)
    if phase != "finalized":
        assert current == through


@pytest.mark.parametrize("phase", ["rolled_back", "cancelled"])
def test_forward_path_refuses_phases_off_the_path(phase: str) -> None:
    with pytest.raises(ReshardStateError, match=f"migration is {phase}: it cannot run forward"):
        phases.forward_path(phase, "switched")
    with pytest.raises(ReshardStateError, match="runs stop at switched or finalized"):
        phases.forward_path("planned", "verified")  # type: ignore[arg-type]
