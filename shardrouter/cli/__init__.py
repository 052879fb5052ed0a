"""shardctl: the command line of shardrouter. Each command parses, calls the library, prints."""

from __future__ import annotations

import click

from ._common import JsonErrorsGroup
from .check_cmd import check
from .config_cmd import config
from .ids_cmd import ids
from .meta_cmd import meta
from .misc import bench, demo
from .reshard_cmd import reshard
from .route import route
from .sandbox import sandbox
from .schema_cmd import schema
from .topology_cmd import topology


@click.group(cls=JsonErrorsGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="shardrouter")
def main() -> None:
    """shardrouter: route orders to MySQL shards, hand out ids that carry their shard."""


for command in (bench, check, config, demo, ids, meta, reshard, route, sandbox, schema, topology):
    main.add_command(command)

__all__ = ["main"]
