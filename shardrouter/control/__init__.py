"""The control plane: the meta store (topology versions, the router registry, worker-id leases,
migration state), routers following the current version with acknowledgements and fencing, and
the live topology changes of ``shardctl topology``."""
