"""kopf handlers, thin: they call the layers below. Importing registers them."""

from berth.controllers import inferencedeployments, pods, startup, watches

__all__ = ["inferencedeployments", "pods", "startup", "watches"]
