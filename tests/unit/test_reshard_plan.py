"""shardrouter.reshard.plan: the planners (--to, --split, --move), their refusals, the stage
documents (each loads, the final one is the plan's ``after``), the JSON round trip, and a
property: the moves between two random ownerships are disjoint, maximal and lead to the
second one."""

from __future__ import annotations

import copy
import itertools
import json
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardrouter.core.config import config_from_dict
from shardrouter.errors import ReshardPlanError
from shardrouter.reshard.plan import (
    STAGES,
    Move,
    ReshardPlan,
    apply_moves,
    canonical,
    merge_ranges,
    moves_between,
    new_migration_id,
    owners_of,
    plan_move,
    plan_split,
    plan_to,
)

ENV: dict[str, str] = {}  # ${SHARDROUTER_DB_PASSWORD:-} takes its default, whatever the shell has
SECRET = "pl4n-s3cret"


def url(name: str, password: str = "") -> str:
    auth = f"root:{password}" if password else "root"
    return f"mysql+pymysql://{auth}@127.0.0.1:3306/orders_{name}"


def two_shards(orders_raw: dict[str, Any]) -> dict[str, Any]:
    """config/orders.yaml on two shards with plain URLs: s0 [0, 512), s1 [512, 1024)."""
    doc = copy.deepcopy(orders_raw)
    doc["shards"] = {
        "s0": {"primary": url("s0"), "slots": [[0, 512]]},
        "s1": {"primary": url("s1"), "slots": [[512, 1024]]},
    }
    return doc


def four_shards(orders_raw: dict[str, Any]) -> dict[str, Any]:
    doc = two_shards(orders_raw)
    doc["shards"]["s0"]["slots"] = [[0, 256]]
    doc["shards"]["s1"]["slots"] = [[512, 768]]
    doc["shards"]["s2"] = {"primary": url("s2"), "slots": [[256, 512]]}
    doc["shards"]["s3"] = {"primary": url("s3"), "slots": [[768, 1024]]}
    return doc


def problems_of(exc: pytest.ExceptionInfo[ReshardPlanError]) -> str:
    return "\n".join(exc.value.problems)


def assert_stages_valid(plan: ReshardPlan) -> None:
    """Every stage document loads, carries no version, and the final one is ``after``."""
    for stage in STAGES:
        doc = plan.document(stage)
        assert "version" not in doc, stage
        config_from_dict(doc, source=stage, env=ENV)
    assert canonical(plan.document("final")) == canonical(plan.after)
    assert plan.document("final") == plan.after
    assert plan.document("rolled_back") == plan.document("prepare")
    assert apply_moves(owners_of(plan.before), plan.moves) == owners_of(plan.after)


# -- plan_to --------------------------------------------------------------------------------------


def test_plan_to_two_shards_to_four(orders_raw: dict[str, Any]) -> None:
    before, proposed = two_shards(orders_raw), four_shards(orders_raw)
    plan = plan_to(before, {**proposed, "version": 9}, base_version=4, env=ENV)
    assert plan.moves == (Move((256, 512), "s0", "s2"), Move((768, 1024), "s1", "s3"))
    assert plan.new_shards == ("s2", "s3")
    assert plan.base_version == 4
    assert re.fullmatch(r"m4-[0-9a-f]{6}", plan.migration_id)
    assert plan.sharded_tables == (
        "merchant_orders",
        "order_items",
        "orders",
        "user_emails",
        "users",
    )
    assert plan.broadcast_tables == ("countries",)
    assert canonical(plan.after) == canonical(proposed)
    assert_stages_valid(plan)


def test_stage_documents_of_a_split(orders_raw: dict[str, Any]) -> None:
    plan = plan_to(
        two_shards(orders_raw), four_shards(orders_raw), base_version=1, migration_id="m1-x"
    )
    prepare = plan.document("prepare")
    expected = copy.deepcopy(plan.before)
    expected["shards"]["s2"] = {"primary": url("s2"), "slots": []}
    expected["shards"]["s3"] = {"primary": url("s3"), "slots": []}
    assert prepare == expected  # new shards with no slots; nothing else changes
    assert "moving" not in prepare

    copy_doc = plan.document("copy")
    assert copy_doc["shards"] == prepare["shards"]
    assert copy_doc["moving"] == [
        {
            "slots": [256, 512],
            "source": "s0",
            "target": "s2",
            "write_mode": "dual_old_primary",
            "migration": "m1-x",
        },
        {
            "slots": [768, 1024],
            "source": "s1",
            "target": "s3",
            "write_mode": "dual_old_primary",
            "migration": "m1-x",
        },
    ]
    frozen = plan.document("frozen", hold_s=3.5)
    assert [m["write_mode"] for m in frozen["moving"]] == ["frozen", "frozen"]
    assert [m["hold_s"] for m in frozen["moving"]] == [3.5, 3.5]
    assert frozen["shards"] == prepare["shards"]

    switched = plan.document("switched")
    assert {n: s["slots"] for n, s in switched["shards"].items()} == {
        "s0": [[0, 256]],
        "s1": [[512, 768]],
        "s2": [[256, 512]],
        "s3": [[768, 1024]],
    }
    assert [m["write_mode"] for m in switched["moving"]] == ["dual_new_primary"] * 2
    back = plan.document("frozen_back", hold_s=1.5)  # a rollback after the switch
    assert back["shards"] == switched["shards"]
    assert [(m["write_mode"], m["hold_s"]) for m in back["moving"]] == [("frozen", 1.5)] * 2
    final = plan.document("final")
    assert "moving" not in final
    assert final["shards"] == switched["shards"]
    assert_stages_valid(plan)


def test_plan_to_on_the_shipped_topology_with_env_placeholders(orders_raw: dict[str, Any]) -> None:
    # ${SHARDROUTER_DB_PASSWORD:-} stays unexpanded in every document (the store keeps
    # placeholders); the documents load in an environment where it expands.
    proposed = copy.deepcopy(orders_raw)
    proposed["shards"]["s3"]["slots"] = [[768, 1000]]
    proposed["shards"]["s0"]["slots"] = [[0, 256], [1000, 1024]]
    plan = plan_to(orders_raw, proposed, base_version=2, env=ENV)
    assert plan.moves == (Move((1000, 1024), "s3", "s0"),)
    assert plan.new_shards == ()
    assert plan.document("prepare") == plan.before  # no new shard: prepare changes nothing
    for stage in STAGES:
        assert "${SHARDROUTER_DB_PASSWORD:-}" in json.dumps(plan.document(stage))
    assert plan.document("switched")["shards"]["s0"]["slots"] == [[0, 256], [1000, 1024]]
    assert_stages_valid(plan)


def test_plan_to_keeps_untouched_slot_lists_as_written(orders_raw: dict[str, Any]) -> None:
    before = two_shards(orders_raw)
    before["shards"]["s1"]["slots"] = [[768, 1024], [512, 768]]  # unsorted, unmerged
    proposed = copy.deepcopy(before)
    proposed["shards"]["s0"]["slots"] = [[0, 100]]
    proposed["shards"]["s4"] = {"primary": url("s4"), "slots": [[200, 512], [100, 200]]}
    plan = plan_to(before, proposed, base_version=1, env=ENV)
    assert plan.moves == (Move((100, 512), "s0", "s4"),)
    switched = plan.document("switched")
    assert switched["shards"]["s1"]["slots"] == [[768, 1024], [512, 768]]  # not rewritten
    assert switched["shards"]["s4"]["slots"] == [[100, 512]]  # merged, sorted
    assert_stages_valid(plan)


# -- plan_split -----------------------------------------------------------------------------------


def test_split_keeps_the_first_part(orders_raw: dict[str, Any]) -> None:
    new = {"s4": {"primary": url("s4")}, "s5": {"primary": url("s5"), "slots": [[0, 1]]}}
    plan = plan_split(orders_raw, "s1", ["s4", "s1", "s5"], new, base_version=3, env=ENV)
    # 256 slots in 3 parts: 86, 85, 85; s1 keeps the first, then s4, s5 in --into order.
    assert plan.moves == (Move((342, 427), "s1", "s4"), Move((427, 512), "s1", "s5"))
    assert plan.new_shards == ("s4", "s5")
    slots = {n: s["slots"] for n, s in plan.after["shards"].items()}
    assert slots["s1"] == [[256, 342]]
    assert slots["s4"] == [[342, 427]]
    assert slots["s5"] == [[427, 512]]  # the definition's own slots are ignored
    assert_stages_valid(plan)


def test_split_without_the_shard_itself(orders_raw: dict[str, Any]) -> None:
    new = {"a": {"primary": url("a")}, "b": {"primary": url("b")}, "unused": {"primary": "x"}}
    plan = plan_split(orders_raw, "s0", ["a", "b"], new, base_version=3, env=ENV)
    assert plan.moves == (Move((0, 128), "s0", "a"), Move((128, 256), "s0", "b"))
    assert plan.after["shards"]["s0"]["slots"] == []
    assert plan.new_shards == ("a", "b")
    assert_stages_valid(plan)


def test_split_of_a_shard_owning_several_ranges(orders_raw: dict[str, Any]) -> None:
    doc = copy.deepcopy(orders_raw)
    doc["shards"]["s0"]["slots"] = [[0, 10], [20, 256]]
    doc["shards"]["s1"]["slots"] = [[10, 20], [256, 512]]
    doc["shards"]["s0"]["slots"] = [[20, 256], [0, 10]]
    new = {"x": {"primary": url("x")}, "y": {"primary": url("y")}}
    plan = plan_split(doc, "s0", ["s0", "x", "y"], new, base_version=1, env=ENV)
    # 246 slots in slot order (0..9, 20..255): 82 each; s0 keeps 0..9 and 20..91.
    assert plan.moves == (Move((92, 174), "s0", "x"), Move((174, 256), "s0", "y"))
    assert plan.after["shards"]["s0"]["slots"] == [[0, 10], [20, 92]]
    assert_stages_valid(plan)
    plan = plan_split(doc, "s0", ["x", "y", "s0"], new, base_version=1, env=ENV)
    assert plan.after["shards"]["s0"]["slots"] == [[0, 10], [20, 92]]  # first part, wherever named


def test_split_into_an_existing_shard(orders_raw: dict[str, Any]) -> None:
    plan = plan_split(orders_raw, "s0", ["s0", "s1"], {}, base_version=1, env=ENV)
    assert plan.moves == (Move((128, 256), "s0", "s1"),)
    assert plan.new_shards == ()
    assert plan.after["shards"]["s1"]["slots"] == [[128, 512]]  # adjacent ranges merged
    assert_stages_valid(plan)


# -- plan_move ------------------------------------------------------------------------------------


def test_move_of_a_range_owned_by_one_shard(orders_raw: dict[str, Any]) -> None:
    plan = plan_move(orders_raw, (300, 400), "s3", {}, base_version=5, env=ENV)
    assert plan.moves == (Move((300, 400), "s1", "s3"),)
    assert plan.after["shards"]["s1"]["slots"] == [[256, 300], [400, 512]]
    assert plan.after["shards"]["s3"]["slots"] == [[300, 400], [768, 1024]]
    assert_stages_valid(plan)


def test_move_over_several_owners_is_split_per_owner(orders_raw: dict[str, Any]) -> None:
    plan = plan_move(orders_raw, (200, 800), "s2", {}, base_version=5, env=ENV)
    # [512, 768) is s2's already: it stays; the rest moves from each owner.
    assert plan.moves == (
        Move((200, 256), "s0", "s2"),
        Move((256, 512), "s1", "s2"),
        Move((768, 800), "s3", "s2"),
    )
    assert plan.after["shards"]["s1"]["slots"] == []
    assert plan.after["shards"]["s2"]["slots"] == [[200, 800]]
    assert_stages_valid(plan)


def test_move_to_a_new_shard(orders_raw: dict[str, Any]) -> None:
    new = {"s9": {"primary": url("s9", SECRET), "replicas": [url("s9r", SECRET)]}}
    plan = plan_move(orders_raw, (0, 1), "s9", new, base_version=5, env=ENV)
    assert plan.moves == (Move((0, 1), "s0", "s9"),)
    assert plan.document("prepare")["shards"]["s9"] == {
        "primary": url("s9", SECRET),
        "replicas": [url("s9r", SECRET)],
        "slots": [],
    }
    text = "\n".join(plan.describe())
    assert "new shard s9" in text and "slots [0, 1) (1) s0 -> s9" in text
    assert SECRET not in text
    assert "s0: [0, 256) -> [1, 256)" in text
    assert_stages_valid(plan)


# -- round trip, ids, documents -------------------------------------------------------------------


def test_round_trip_through_json(orders_raw: dict[str, Any]) -> None:
    plan = plan_to(two_shards(orders_raw), four_shards(orders_raw), base_version=7, env=ENV)
    text = json.dumps(plan.as_dict())
    back = ReshardPlan.from_dict(json.loads(text))
    assert back == plan
    assert back.document("switched") == plan.document("switched")
    assert ReshardPlan.from_dict(json.loads(plan.to_json())) == plan


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda d: d.pop("moves"), "KeyError"),
        (lambda d: d.update(format=99), "format 99"),
        (lambda d: d["moves"][0].update(slots=["a", 3]), "not an integer"),
        (lambda d: d.update(before=[]), "before and after"),
    ],
)
def test_from_dict_refuses_a_malformed_plan(
    orders_raw: dict[str, Any], mutate: Any, needle: str
) -> None:
    data = plan_move(orders_raw, (0, 8), "s1", {}, base_version=1, env=ENV).as_dict()
    mutate(data)
    with pytest.raises(ReshardPlanError) as exc:
        ReshardPlan.from_dict(data)
    assert needle in str(exc.value)


def test_migration_ids_are_short_readable_and_unique() -> None:
    ids = {new_migration_id(12) for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"m12-[0-9a-f]{6}", i) for i in ids)


def test_document_refuses_unknown_stage_and_bad_hold(orders_raw: dict[str, Any]) -> None:
    plan = plan_move(orders_raw, (0, 8), "s1", {}, base_version=1, env=ENV)
    with pytest.raises(ReshardPlanError, match="unknown stage 'copying'"):
        plan.document("copying")  # type: ignore[arg-type]
    with pytest.raises(ReshardPlanError, match="hold_s 0 is outside"):
        plan.document("frozen", hold_s=0)
    with pytest.raises(ReshardPlanError, match="hold_s 61 is outside"):
        plan.document("frozen", hold_s=61)


def test_document_on_a_later_base_keeps_another_migrations_range(
    orders_raw: dict[str, Any],
) -> None:
    plan = plan_move(orders_raw, (0, 8), "s1", {}, base_version=1, env=ENV)
    other = plan_move(orders_raw, (900, 950), "s2", {}, base_version=1, env=ENV)
    later = other.document("copy")  # the other migration pushed its copy version since
    for stage in STAGES:
        doc = plan.document(stage, base=later)
        config_from_dict(doc, env=ENV)
        others = [m for m in doc.get("moving", []) if m["migration"] == other.migration_id]
        assert others == later["moving"], stage
        mine = [m for m in doc.get("moving", []) if m["migration"] == plan.migration_id]
        assert len(mine) == (1 if stage in ("copy", "frozen", "switched", "frozen_back") else 0), (
            stage
        )
    # applying a stage twice, or going back from switched to copy, is idempotent
    switched = plan.document("switched", base=later)
    assert plan.document("switched", base=switched) == switched
    assert plan.document("copy", base=switched) == plan.document("copy", base=later)


def test_a_plan_over_a_range_moving_already_is_refused(orders_raw: dict[str, Any]) -> None:
    other = plan_move(orders_raw, (100, 200), "s2", {}, base_version=1, migration_id="m1-aaa")
    current = other.document("copy")
    with pytest.raises(ReshardPlanError) as exc:
        plan_move(current, (150, 300), "s3", {}, base_version=2, env=ENV)
    assert "moving already (migration m1-aaa, s0 -> s2)" in problems_of(exc)
    assert "finish or cancel that migration first" in problems_of(exc)
    # disjoint slots plan fine, and their final document keeps the other range moving
    plan = plan_move(current, (300, 310), "s3", {}, base_version=2, env=ENV)
    assert plan.after["moving"] == current["moving"]
    assert_stages_valid(plan)


# -- refusals -------------------------------------------------------------------------------------


def _proposed(orders_raw: dict[str, Any], change: Any) -> dict[str, Any]:
    doc = four_shards(orders_raw)
    change(doc)
    return doc


@pytest.mark.parametrize(
    ("change", "needles"),
    [
        (
            lambda d: d["tables"]["orders"].update(split=8),
            ["tables.orders.split differs", "current table rules"],
        ),
        (
            lambda d: d["tables"].pop("countries"),
            ["tables.countries differs"],
        ),
        (lambda d: d["ids"].update(worker_id=3), ["ids.worker_id differs"]),
        (lambda d: d.update(name="other"), ["name differs"]),
        (
            lambda d: d["shards"]["s1"].update(primary=url("elsewhere")),
            ["shards.s1.primary differs", "does not re-point a shard"],
        ),
        (
            lambda d: d["shards"]["s0"].update(replicas=[url("s0r")]),
            ["shards.s0.replicas differs"],
        ),
        (
            lambda d: d["shards"]["s0"].update(pool={"size": 9}),
            ["shards.s0.pool differs", "topology push"],
        ),
        (
            lambda d: (d["shards"].pop("s1"), d["shards"]["s3"].update(slots=[[512, 1024]])),
            ["shards.s1 removed, but it owns slots [512, 1024)", "slots: []"],
        ),
        (
            lambda d: d.update(slots=2048),
            ["slots: 1024 -> 2048", "fixed for the life of a cluster"],
        ),
        (
            lambda d: d["shards"]["s3"].update(slots=[[768, 1000]]),
            ["proposed topology", "[1000, 1024) are owned by no shard"],
        ),
        (
            lambda d: d["shards"]["s3"].update(slots=[[700, 1024]]),
            ["proposed topology", "overlaps"],
        ),
        (
            lambda d: d.update(moving=[{"slots": [0, 1], "source": "s0", "target": "s2"}]),
            ["moving: the proposed topology lists moving ranges"],
        ),
        (
            lambda d: d["shards"]["s3"].update(primary=url("s1")),
            ["also shard s1's primary database"],
        ),
        (
            lambda d: d["shards"]["s3"].update(primary="postgresql://x@h/db"),
            ["shards.s3.primary", "not supported"],
        ),
    ],
)
def test_plan_to_refuses_anything_but_placement(
    orders_raw: dict[str, Any], change: Any, needles: list[str]
) -> None:
    with pytest.raises(ReshardPlanError) as exc:
        plan_to(two_shards(orders_raw), _proposed(orders_raw, change), base_version=1, env=ENV)
    text = problems_of(exc)
    for needle in needles:
        assert needle in text, (needle, text)


def test_plan_to_lists_every_problem_at_once(orders_raw: dict[str, Any]) -> None:
    def change(d: dict[str, Any]) -> None:
        d["tables"]["orders"]["split"] = 2
        d["shards"]["s0"]["primary"] = url("moved")
        d["ids"]["max_backward_ms"] = 5

    with pytest.raises(ReshardPlanError) as exc:
        plan_to(
            two_shards(orders_raw),
            _proposed(orders_raw, change),
            base_version=1,
            migration_id="bad id!",
            env=ENV,
        )
    text = problems_of(exc)
    assert len(exc.value.problems) == 4, text
    for needle in ("tables.orders.split", "shards.s0.primary", "ids.max_backward_ms", "bad id!"):
        assert needle in text


def test_plan_to_refuses_an_empty_shard_removed_and_no_move(orders_raw: dict[str, Any]) -> None:
    current = four_shards(orders_raw)
    current["shards"]["s9"] = {"primary": url("s9"), "slots": []}
    with pytest.raises(ReshardPlanError) as exc:
        plan_to(current, four_shards(orders_raw), base_version=1, env=ENV)
    assert "shards.s9 removed: it owns no slots" in problems_of(exc)
    with pytest.raises(ReshardPlanError, match="nothing moves"):
        plan_to(current, current, base_version=1, env=ENV)


def test_plan_to_refuses_an_invalid_current_topology(orders_raw: dict[str, Any]) -> None:
    current = two_shards(orders_raw)
    current["shards"]["s1"]["slots"] = [[512, 1000]]
    with pytest.raises(ReshardPlanError) as exc:
        plan_to(current, four_shards(orders_raw), base_version=1, env=ENV)
    assert "current topology: slots: [1000, 1024) are owned by no shard" in problems_of(exc)


def test_plan_to_refuses_a_variable_not_set(orders_raw: dict[str, Any]) -> None:
    proposed = four_shards(orders_raw)
    proposed["shards"]["s3"]["primary"] = "mysql+pymysql://root:${S3_PW}@h/orders_s3"
    with pytest.raises(ReshardPlanError) as exc:
        plan_to(two_shards(orders_raw), proposed, base_version=1, env=ENV)
    assert "environment variable S3_PW is not set" in problems_of(exc)
    plan = plan_to(two_shards(orders_raw), proposed, base_version=1, env={"S3_PW": "x"})
    assert plan.after["shards"]["s3"]["primary"].endswith("${S3_PW}@h/orders_s3")


@pytest.mark.parametrize(
    ("shard", "into", "new", "needles"),
    [
        ("s7", ["s7", "n"], {"n": {"primary": url("n")}}, ["--split s7: no such shard"]),
        ("s0", ["s0", "s0"], {}, ["s0 named twice", "names no shard besides s0"]),
        ("s0", ["s0"], {}, ["names no shard besides s0"]),
        ("s0", ["s0", "n"], {}, ["--into n: a new shard, but no definition", "--config"]),
        ("s0", ["s0", "n"], {"n": "mysql://x"}, ["--into n: its definition is not a mapping"]),
        (
            "s0",
            ["s0", "s1"],
            {"s1": {"primary": url("elsewhere")}},
            ["--into s1: it exists already, with another primary"],
        ),
        (
            "s0",
            ["s0", "n"],
            {"n": {"primary": "mysql+pymysql://other:pw@localhost:3403/orders_s2"}},
            ["also shard s2's primary database"],
        ),
        ("s0", ["s0", "n"], {"n": {"primary": url("n"), "colour": 1}}, ["shards.n.colour"]),
    ],
)
def test_plan_split_refusals(
    orders_raw: dict[str, Any], shard: str, into: list[str], new: Any, needles: list[str]
) -> None:
    with pytest.raises(ReshardPlanError) as exc:
        plan_split(orders_raw, shard, into, new, base_version=1, env=ENV)
    text = problems_of(exc)
    for needle in needles:
        assert needle in text, (needle, text)


def test_plan_split_refuses_an_empty_shard_and_too_many_parts(orders_raw: dict[str, Any]) -> None:
    doc = copy.deepcopy(orders_raw)
    doc["shards"]["s0"]["slots"] = [[0, 2]]
    doc["shards"]["s1"]["slots"] = [[2, 512]]
    doc["shards"]["e"] = {"primary": url("e"), "slots": []}
    new = {n: {"primary": url(n)} for n in ("a", "b")}
    with pytest.raises(ReshardPlanError, match="--split e: it owns no slots"):
        plan_split(doc, "e", ["e", "a"], new, base_version=1, env=ENV)
    with pytest.raises(ReshardPlanError, match=r"s0 owns 2 slot\(s\), too few for 3 parts"):
        plan_split(doc, "s0", ["s0", "a", "b"], new, base_version=1, env=ENV)


@pytest.mark.parametrize(
    ("slots", "to", "new", "needles"),
    [
        ((5, 5), "s1", {}, ["[5, 5) is not a slot range"]),
        ((1000, 1025), "s1", {}, ["[1000, 1025) is not a slot range in [0, 1024)"]),
        ((0, 8), "zz", {}, ["--to zz: a new shard, but no definition"]),
        ((300, 400), "s1", {}, ["s1 owns [300, 400) already; nothing moves"]),
    ],
)
def test_plan_move_refusals(
    orders_raw: dict[str, Any], slots: tuple[int, int], to: str, new: Any, needles: list[str]
) -> None:
    with pytest.raises(ReshardPlanError) as exc:
        plan_move(orders_raw, slots, to, new, base_version=1, env=ENV)
    text = problems_of(exc)
    for needle in needles:
        assert needle in text, (needle, text)


def test_apply_moves_refuses_a_move_not_owned_by_its_source() -> None:
    with pytest.raises(ReshardPlanError, match="owned by b, not by a"):
        apply_moves(["a", "a", "b"], [Move((1, 3), "a", "c")])
    with pytest.raises(ReshardPlanError, match="slot counts differ"):
        moves_between(["a"], ["a", "b"])


# -- property -------------------------------------------------------------------------------------

NAMES = ("s0", "s1", "s2", "s3")


def _document(owners: list[str], shards: set[str]) -> dict[str, Any]:
    gene_bits = len(owners).bit_length() - 1
    return {
        "slots": len(owners),
        # 63 bits: timestamp + gene + 8 worker bits + 4 sequence bits
        "ids": {"gene_bits": gene_bits, "timestamp_bits": 51 - gene_bits},
        "shards": {
            n: {
                "primary": url(n),
                "slots": [
                    [s, e]
                    for s, e in merge_ranges((i, i + 1) for i, o in enumerate(owners) if o == n)
                ],
            }
            for n in sorted(shards)
        },
        "tables": {"t": {"column": "k", "strategy": "hash"}, "r": {"broadcast": True}},
    }


ownerships = st.sampled_from([8, 16, 64]).flatmap(
    lambda n: st.tuples(
        st.lists(st.sampled_from(NAMES), min_size=n, max_size=n),
        st.lists(st.sampled_from(NAMES), min_size=n, max_size=n),
    )
)


@settings(max_examples=300, deadline=None)
@given(ownerships)
def test_moves_are_disjoint_maximal_and_lead_to_after(pair: tuple[list[str], list[str]]) -> None:
    before, after = pair
    moves = moves_between(before, after)
    assert apply_moves(before, moves) == after
    covered = [False] * len(before)
    for a, b in itertools.pairwise(moves):
        assert a.slots[1] <= b.slots[0]  # sorted, disjoint
        if a.slots[1] == b.slots[0]:  # adjacent moves differ in (source, target): maximal
            assert (a.source, a.target) != (b.source, b.target)
    for move in moves:
        assert move.source != move.target and move.size > 0
        for slot in range(*move.slots):
            covered[slot] = True
            assert (before[slot], after[slot]) == (move.source, move.target)
    assert all(covered[s] == (before[s] != after[s]) for s in range(len(before)))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ownerships)
def test_plan_to_of_random_ownerships_gives_valid_documents(
    pair: tuple[list[str], list[str]],
) -> None:
    before, after = pair
    old_names = set(before)
    current = _document(before, old_names)
    proposed = _document(after, old_names | set(after))  # old shards kept, owning [] maybe
    if before == after:
        with pytest.raises(ReshardPlanError, match="nothing moves"):
            plan_to(current, proposed, base_version=1, env=ENV)
        return
    plan = plan_to(current, proposed, base_version=1, env=ENV)
    assert plan.new_shards == tuple(sorted(set(after) - old_names))
    assert canonical(plan.after) == canonical(proposed)
    assert owners_of(plan.document("switched")) == after
    assert owners_of(plan.document("frozen")) == before
    assert_stages_valid(plan)
