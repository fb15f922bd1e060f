"""The worker pool: the hive's devices, and worker processes spawned and supervised on them."""
