"""Berth's test bed: a local control plane, kwok's fake GPU nodes and real nodes.

    python -m testbed up --dir DIR [--nodes N] [--real-nodes M]  # prints KUBECONFIG
    python -m testbed status --dir DIR
    python -m testbed down --dir DIR

Tests, benchmarks and hack/demo.sh import it: ``LocalCluster(DIR).up(nodes=4,
real_nodes=1)`` / ``.down()``, or ``with running(DIR) as cluster: ...``.
docs/local-cluster.md describes what runs and what is simulated.
"""

from testbed.cluster import COMPONENTS, LocalCluster, node_manifest, node_name, running
from testbed.procs import ClusterError
from testbed.realnode import RealNode, real_node_name
from testbed.toolchain import Toolchain

__all__ = [
    "COMPONENTS",
    "ClusterError",
    "LocalCluster",
    "RealNode",
    "Toolchain",
    "node_manifest",
    "node_name",
    "real_node_name",
    "running",
]
