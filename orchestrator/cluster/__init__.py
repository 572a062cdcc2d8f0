"""Cluster-side tools: the EC2 spot-notice watcher and a local multi-node Ray cluster.

    python -m orchestrator.cluster.spot_watcher --address HEAD:6379   # on each spot node
    tips cluster local up --worker cpus=1,data_node=1

The cluster launcher YAMLs and KubeRay manifests that use them live in ``cluster/``; the
guide is ``docs/clusters.md``. Nothing here is imported by the training path.
"""
