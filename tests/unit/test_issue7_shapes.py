"""Issue 7, section 2 and defects 6-9, 13, 21 in the planner alone: the allow-list (shapes.py),
join co-location, INSERT subqueries, executable comments, inherited gene keys, lock rendering,
and docs/SQL.md checked against the allow-list's own tables."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardrouter.core.topology import Topology
from shardrouter.errors import UnsupportedQueryError
from shardrouter.sql import shapes
from shardrouter.sql.planner import Planner, Target

DOC = Path(__file__).resolve().parents[2] / "docs" / "SQL.md"


@pytest.fixture
def planner(orders_topology: Topology) -> Planner:
    return Planner(orders_topology)


def refused(planner: Planner, sql: str, *words: str) -> str:
    with pytest.raises(UnsupportedQueryError) as info:
        planner.plan(sql)
    message = str(info.value)
    for word in words:
        assert word.lower() in message.lower(), message
    return message


# -- defect 9: executable comments and hints ------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT order_id FROM orders WHERE user_id = :u /*! AND status = 'x' */",
        "SELECT /*!50100 SQL_NO_CACHE */ order_id FROM orders WHERE user_id = :u",
        "SELECT order_id FROM orders WHERE user_id = :u /*M! AND status = 'x' */",
        "DELETE FROM orders WHERE user_id = :u /*!99999 AND 0 */",
        "SELECT /*+ MAX_EXECUTION_TIME(1) */ order_id FROM orders WHERE user_id = :u",
    ],
)
def test_executable_comments_and_hints_are_refused(planner: Planner, sql: str) -> None:
    refused(planner, sql, "/*")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT order_id FROM orders WHERE user_id = :u AND status = '/*! x */'",
        'SELECT order_id FROM orders WHERE user_id = :u AND status = "it\\"s /*!"',
        "SELECT order_id FROM orders WHERE user_id = :u /* plain comment */",
        "SELECT order_id FROM orders WHERE user_id = :u -- /*! trailing\n",
        "SELECT order_id FROM orders WHERE user_id = :u AND status = 'a''/*!'",
    ],
)
def test_comment_markers_inside_strings_and_plain_comments_are_data(
    planner: Planner, sql: str
) -> None:
    assert planner.plan(sql).routing_condition is not None


# -- defect 8: join co-location ---------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        # under OR / NOT: rows that meet through the other branch are on other shards
        "SELECT o.order_id FROM orders o JOIN order_items i"
        " ON o.order_id = i.order_id OR i.sku = o.status",
        "SELECT o.order_id FROM orders o JOIN order_items i ON NOT (o.order_id <> i.order_id)",
        "SELECT o.order_id FROM orders o JOIN order_items i"
        " ON NOT (o.user_id = i.user_id AND i.sku = 'x')",
        # one reference equated with itself, or with a constant
        "SELECT o.order_id FROM orders o JOIN order_items i ON o.user_id = o.user_id",
        "SELECT o.order_id FROM orders o JOIN order_items i ON i.user_id = i.user_id",
        "SELECT o.order_id FROM orders o JOIN order_items i ON i.user_id = 5",
        # different sharding columns, or a lookup column
        "SELECT o.order_id FROM orders o JOIN order_items i ON o.user_id = i.order_id",
        "SELECT a.order_id FROM orders a JOIN orders b ON a.merchant_id = b.merchant_id",
        # comma and CROSS joins of sharded tables: no ON at all
        "SELECT o.order_id FROM orders o CROSS JOIN order_items i",
        # the third table is equated only with itself
        "SELECT o.order_id FROM orders o JOIN order_items i ON o.order_id = i.order_id"
        " JOIN orders p ON p.user_id = p.user_id",
        # USING between sharded tables: refused with the way out
        "SELECT order_id FROM orders JOIN order_items USING (order_id)",
    ],
)
def test_joins_that_do_not_colocate_are_refused(planner: Planner, sql: str) -> None:
    refused(planner, sql, "join")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT o.order_id, i.sku FROM orders o JOIN order_items i ON o.order_id = i.order_id",
        "SELECT o.order_id FROM orders o JOIN order_items i"
        " ON i.user_id = o.user_id AND i.sku = o.status",
        "SELECT o.order_id FROM orders o JOIN order_items i ON (o.order_id = i.order_id)"
        " AND (i.line > 0 OR i.sku = 'x')",
        "SELECT a.order_id FROM orders a JOIN orders b ON a.user_id = b.user_id",
        "SELECT o.order_id FROM orders o JOIN order_items i ON o.order_id = i.order_id"
        " JOIN orders p ON p.user_id = i.user_id",
        "SELECT o.order_id, c.name FROM orders o JOIN countries c ON c.code = o.status",
        "SELECT o.order_id, c.name FROM orders o, countries c WHERE c.code = o.status",
        # a comma join is an inner join whose condition is the WHERE (issue 11 item 1)
        "SELECT o.order_id FROM orders o, order_items i WHERE o.order_id = i.order_id",
        "UPDATE orders o, order_items i SET o.amount_cents = 1 WHERE o.order_id = i.order_id",
    ],
)
def test_colocated_joins_are_planned(planner: Planner, sql: str) -> None:
    assert planner.plan(sql).sharded is not None


# -- defect 7: UPDATE / DELETE with joins ---------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE orders o JOIN order_items i ON o.status = i.sku SET o.amount_cents = 1"
        " WHERE o.user_id = :u",
        "UPDATE order_items i JOIN orders o ON o.user_id = i.user_id OR o.status = i.sku"
        " SET i.sku = 'x' WHERE i.user_id = :u",
        "DELETE i FROM order_items i JOIN orders o ON o.status = i.sku WHERE i.user_id = :u",
    ],
)
def test_write_joins_are_checked_for_colocation(planner: Planner, sql: str) -> None:
    refused(planner, sql, "join")


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE countries c JOIN orders o ON o.status = c.code SET c.name = 'x'"
        " WHERE o.user_id = :u",
        "UPDATE orders o JOIN countries c ON o.status = c.code SET name = 'x' WHERE o.user_id = :u",
        "DELETE c FROM countries c JOIN orders o ON o.status = c.code WHERE o.user_id = :u",
    ],
)
def test_write_of_a_broadcast_table_by_a_join_is_refused(planner: Planner, sql: str) -> None:
    refused(planner, sql, "broadcast")


def test_colocated_write_joins_are_planned(planner: Planner) -> None:
    plan = planner.plan(
        "UPDATE orders o JOIN countries c ON o.status = c.code SET o.amount_cents = 1"
        " WHERE o.user_id = :u"
    )
    assert plan.routing_condition is not None
    plan = planner.plan(
        "UPDATE orders o JOIN order_items i ON o.order_id = i.order_id SET o.amount_cents = 1"
        " WHERE o.user_id = :u AND i.sku = 'x'"
    )
    assert plan.routing_condition is not None and plan.routing_condition.rule.column == "user_id"
    plan = planner.plan(
        "DELETE i FROM order_items i JOIN orders o ON o.order_id = i.order_id"
        " WHERE o.user_id = :u AND o.status = 'cancelled'"
    )
    assert plan.routing_condition is not None
    assert plan.render(Target("s0", 2), scatter=False) == (
        "DELETE i FROM order_items_0002 AS i JOIN orders_0002 AS o ON o.order_id = i.order_id"
        " WHERE o.user_id = :u AND o.status = 'cancelled'"
    )


@pytest.mark.parametrize(
    "sql",
    [
        "DELETE orders FROM order_items JOIN orders ON orders.order_id = order_items.order_id"
        " WHERE orders.user_id = :u",
        "DELETE o FROM orders o JOIN order_items i ON o.order_id = i.order_id WHERE o.user_id = :u",
        "DELETE o, i FROM orders o JOIN order_items i ON o.order_id = i.order_id"
        " WHERE o.user_id = :u",
        "DELETE o FROM orders o WHERE o.user_id = :u",
    ],
)
def test_multi_table_delete_of_a_lookup_owner_is_refused(planner: Planner, sql: str) -> None:
    refused(planner, sql, "owns lookup rows", "delete by key")


# -- defect 6: subqueries in INSERT -------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO order_items (order_id, line, user_id, sku) VALUES"
        " (:o, (SELECT COUNT(*) FROM order_items WHERE order_id = :o), :u, 'x')",
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents) VALUES"
        " (:o, :u, :m, (SELECT MAX(amount_cents) FROM orders))",
        "INSERT INTO countries (code, name) VALUES ('zz', (SELECT name FROM countries LIMIT 1))",
        "INSERT INTO orders (order_id, user_id, merchant_id) VALUES (:o, :u, :m)"
        " ON DUPLICATE KEY UPDATE amount_cents = (SELECT 1 FROM order_items LIMIT 1)",
    ],
)
def test_subquery_in_insert_is_refused(planner: Planner, sql: str) -> None:
    refused(planner, sql, "subquery", "INSERT")


# -- defect 13: bound tables inherit the owner's gene key -------------------------------------


def test_order_items_route_by_order_id(planner: Planner, orders_topology: Topology) -> None:
    for sql in (
        "SELECT sku FROM order_items WHERE order_id = :o",
        "UPDATE order_items SET sku = 'x' WHERE order_id = :o AND line = 1",
        "DELETE FROM order_items WHERE order_id = :o",
    ):
        condition = planner.plan(sql).routing_condition
        assert condition is not None and condition.rule.column == "order_id", sql
        assert condition.rule.strategy.name == "gene"
    order_id = orders_topology.id_layout.compose(1000, 741, 0, 0)
    assert orders_topology.shard_for("order_items", order_id, "order_id") == (
        orders_topology.shard_for("orders", order_id, "order_id")
    )
    # an item moved to another order could change shards: refused like any key change
    refused(planner, "UPDATE order_items SET order_id = :p WHERE user_id = :u", "order_id")


# -- defect 21: locking clauses -------------------------------------------------------------


@pytest.mark.parametrize(
    ("clause", "rendered"),
    [
        ("LOCK IN SHARE MODE", "LOCK IN SHARE MODE"),
        ("FOR SHARE", "LOCK IN SHARE MODE"),
        ("FOR UPDATE", "FOR UPDATE"),
        ("FOR UPDATE NOWAIT", "FOR UPDATE NOWAIT"),
        ("FOR UPDATE SKIP LOCKED", "FOR UPDATE SKIP LOCKED"),
        ("FOR UPDATE WAIT 2", "FOR UPDATE WAIT 2"),
        ("LOCK IN SHARE MODE NOWAIT", "LOCK IN SHARE MODE NOWAIT"),
    ],
)
def test_locking_reads_render_for_mariadb(planner: Planner, clause: str, rendered: str) -> None:
    plan = planner.plan(f"SELECT order_id FROM orders WHERE user_id = :u LIMIT 5 {clause}")
    assert plan.render(Target("s1", 3), scatter=False) == (
        f"SELECT order_id FROM orders_0003 WHERE user_id = :u LIMIT 5 {rendered}"
    )
    # across shards the locks would not be held by the caller's transaction
    assert plan.scatter_refusal is not None and "locking read" in plan.scatter_refusal


def test_locking_read_of_share_of_tables_is_refused(planner: Planner) -> None:
    refused(planner, "SELECT order_id FROM orders WHERE user_id = :u FOR UPDATE OF orders")


# -- section 2: the allow-list ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("SELECT SQL_CALC_FOUND_ROWS order_id FROM orders WHERE user_id = :u", "modifier"),
        ("SELECT HIGH_PRIORITY order_id FROM orders WHERE user_id = :u", "modifier"),
        ("SELECT order_id INTO @x FROM orders WHERE user_id = :u", "into"),
        ("SELECT @x := order_id FROM orders WHERE user_id = :u", "user variable"),
        ("SELECT order_id FROM orders WHERE user_id = @u", "user variable"),
        ("SELECT LAST_INSERT_ID() FROM orders WHERE user_id = :u", "LAST_INSERT_ID"),
        ("SELECT FOUND_ROWS()", "FOUND_ROWS"),
        ("SELECT GET_LOCK('a', 1) FROM orders WHERE user_id = :u", "GET_LOCK"),
        ("SELECT MY_UDF(order_id) FROM orders WHERE user_id = :u", "function"),
        ("SELECT status, COUNT(*) FROM orders GROUP BY status WITH ROLLUP", "ROLLUP"),
        ("WITH x AS (SELECT 1 AS a) SELECT a FROM x", "WITH"),
        ("SELECT order_id FROM orders NATURAL JOIN order_items", "method"),
        ("SELECT order_id FROM orders PARTITION (p0) WHERE user_id = :u", "partition"),
        ("INSERT INTO countries (code, name) VALUES ('zz', 'x') RETURNING code", "RETURNING"),
        ("UPDATE orders SET status = 'x' WHERE user_id = :u RETURNING order_id", "RETURNING"),
        (
            "SELECT order_id, ROW_NUMBER() OVER w FROM orders WHERE user_id = :u"
            " WINDOW w AS (ORDER BY order_id)",
            "WINDOW",
        ),
    ],
)
def test_constructs_outside_the_allow_list_are_refused(
    planner: Planner, sql: str, named: str
) -> None:
    refused(planner, sql, named)


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("SELECT order_id, RAND() FROM orders", "RAND"),
        ("SELECT order_id FROM orders ORDER BY RAND() LIMIT 3", "RAND"),
        (
            "SELECT order_id FROM orders WHERE status = 'x' AND amount_cents < UNIX_TIMESTAMP()",
            "UNIX_TIMESTAMP",
        ),
        ("SELECT CONNECTION_ID(), order_id FROM orders", "CONNECTION_ID"),
        ("SELECT @@sql_mode, order_id FROM orders", "system variable"),
        ("UPDATE orders SET status = CONCAT('x', UUID()) WHERE status = 'y'", "UUID"),
        ("SELECT LENGTH(GROUP_CONCAT(order_id)) FROM orders", "GROUP_CONCAT"),
        ("SELECT order_id, ROW_NUMBER() OVER (ORDER BY order_id) FROM orders", "window"),
    ],
)
def test_session_and_random_constructs_only_on_one_target(
    planner: Planner, sql: str, named: str
) -> None:
    plan = planner.plan(sql)
    assert plan.scatter_refusal is not None and named.lower() in plan.scatter_refusal.lower()


def test_time_functions_in_insert_values(planner: Planner) -> None:
    # A sharded row is written once, by one shard: NOW(3) is what one database would write.
    plan = planner.plan(
        "INSERT INTO orders (order_id, user_id, merchant_id, created_at) VALUES"
        " (:o, :u, :m, NOW(3)), (:o2, :u2, :m, NOW(3))"
    )
    assert plan.insert_rule is not None
    # Every shard holds a copy of a broadcast row: the copies would differ.
    refused(planner, "INSERT INTO countries (code, name) VALUES ('zz', UUID())", "broadcast")
    # A session value in a multi-row insert could come from several shards.
    refused(
        planner,
        "INSERT INTO orders (order_id, user_id, merchant_id, status) VALUES"
        " (:o, :u, :m, CONNECTION_ID()), (:o2, :u2, :m, 'x')",
        "CONNECTION_ID",
    )


def test_insert_ignore_into_a_lookup_owner_is_refused(planner: Planner) -> None:
    refused(
        planner,
        "INSERT IGNORE INTO orders (order_id, user_id, merchant_id) VALUES (:o, :u, :m)",
        "IGNORE",
        "lookup",
    )
    plan = planner.plan(
        "INSERT IGNORE INTO order_items (order_id, line, user_id) VALUES (:o, 1, :u)"
    )
    assert plan.insert_rule is not None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT o.*, COALESCE(amount_cents, 0) + 1 AS a FROM orders o WHERE user_id = :u",
        "SELECT order_id FROM orders WHERE user_id IN (:a, :b) AND status LIKE 'n%'"
        " AND amount_cents BETWEEN 1 AND 10 AND merchant_id IS NOT NULL ORDER BY order_id DESC"
        " LIMIT 10",
        "SELECT status, COUNT(*) AS n, SUM(amount_cents), AVG(amount_cents) FROM orders"
        " GROUP BY status HAVING COUNT(*) > 1 ORDER BY n",
        "SELECT DISTINCT UPPER(status) FROM orders WHERE NOT (status = 'x' OR status = 'y')",
        "SELECT CASE WHEN amount_cents > 100 THEN 'big' ELSE 'small' END, CAST(order_id AS CHAR)"
        " FROM orders WHERE DATE(created_at) >= '2026-01-01'",
        "SELECT order_id FROM orders WHERE created_at > NOW() - INTERVAL 1 DAY AND user_id = :u",
        "INSERT INTO orders (order_id, user_id, merchant_id) VALUES (:o, :u, :m)"
        " ON DUPLICATE KEY UPDATE status = VALUES(status)",
        "UPDATE orders SET amount_cents = amount_cents + 1 WHERE order_id = :o LIMIT 1",
        "SELECT CONNECTION_ID() AS cid, order_id FROM orders WHERE user_id = :u",
        "SELECT order_id FROM orders USE INDEX (PRIMARY) WHERE user_id = :u",
    ],
)
def test_everyday_shapes_are_accepted(planner: Planner, sql: str) -> None:
    planner.plan(sql)


def test_the_check_runs_once_per_text(planner: Planner, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = shapes.check

    def counting(tree: object, kind: shapes.StatementKind) -> shapes.Verdict:
        calls.append(kind)
        return real(tree, kind)  # type: ignore[arg-type]

    monkeypatch.setattr(shapes, "check", counting)
    sql = "SELECT order_id FROM orders WHERE user_id = :u"
    for _ in range(3):
        planner.plan(sql)
    assert calls == ["select"]


def test_unparsable_sql_is_a_typed_error(planner: Planner) -> None:
    refused(planner, "SELECT 'unterminated FROM orders", "cannot parse")


# -- docs/SQL.md agrees with the tables -------------------------------------------------------


def _doc_section(title: str) -> str:
    text = DOC.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match is not None, f"docs/SQL.md has no section '## {title}'"
    return match.group(1)


def _doc_names(title: str) -> dict[str, str]:
    """``| `NAME` | where | ...`` table rows of a section: {name: second cell}."""
    rows: dict[str, str] = {}
    for line in _doc_section(title).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = cells[1]
    return rows


def test_doc_lists_every_function_with_where_it_runs() -> None:
    documented = _doc_names("Functions")
    assert documented == {f.name: f.where for f in shapes.FUNCTIONS.values()}


def test_doc_lists_every_refused_function() -> None:
    assert set(_doc_names("Functions refused everywhere")) == set(shapes.REFUSED_FUNCTIONS)


def test_doc_lists_every_clause() -> None:
    documented = _doc_names("Clauses")
    expected = {
        f"{kind}.{arg}": "accepted" for kind, args in shapes.CLAUSES.items() for arg in args
    }
    assert documented == expected


def test_doc_lists_every_node() -> None:
    documented = _doc_names("Expression and clause nodes")
    expected = {node.__name__: shapes.ANYWHERE for node in shapes.NODES}
    expected |= {node.__name__: shapes.ONE_TARGET for node in shapes.ONE_TARGET_NODES}
    assert documented == expected


def test_group_by_with_a_direction_is_refused_with_the_way_out(planner: Planner) -> None:
    # MariaDB accepts GROUP BY x DESC (ordered groups); sqlglot does not parse it.
    message = refused(planner, "SELECT user_id, COUNT(*) FROM orders GROUP BY user_id DESC")
    assert "GROUP BY ... ORDER BY ... DESC" in message
    other = refused(planner, "SELECT user_id FROM orders WHERE (")
    assert "GROUP BY" not in other
