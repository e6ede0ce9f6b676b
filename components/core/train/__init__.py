"""The one trainer core: process group, precision, sharding, loop, checkpoints, metrics."""
