"""The execution layer (I/O): shard engines and lean read pools, the sync Router and the
AsyncRouter, XA transactions."""
