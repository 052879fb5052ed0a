"""The pure SQL layer, no I/O: the allow-list planner, the scatter rewrite, the merge and
the sans-I/O execution core that the sync and async routers drive."""
