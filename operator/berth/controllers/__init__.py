"""kopf handlers: thin, they call the layers below. Importing registers them."""

from berth.controllers import cluster, deployments, pods, startup

__all__ = ["cluster", "deployments", "pods", "startup"]
