"""Cluster configs, the spot watcher, the local multi-node cluster and the torch_xla path."""
