"""The cluster seam: the registry and the bus, with an in-process and a Redis implementation."""
