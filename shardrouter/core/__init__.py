"""The pure routing core, no I/O: configuration, the topology, the key strategies and
the id layout."""
