"""rkfac.distributed: the pure assignment, the communicator and sharded K-FAC on gloo processes."""
