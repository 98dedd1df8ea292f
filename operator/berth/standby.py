"""What a standby replica keeps ready while another holds the Lease.

Taking over used to begin with a LIST of every pod in the cluster: 6-9 s of
a failover with 11,000 pods, on top of the Lease's 8 s. A standby lists
them while it waits and keeps its view current from the pod watch, reading
only; the new leader's runtime takes the view over and resumes the watch
where the standby's stopped. The ledgers are still repaired after the
Lease is won (the old leader wrote them until then), before any allocation.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from berth.config import OperatorConfig
from berth.kube import KubeApi
from berth.pods import awaits_ports, is_berths
from berth.view import ClusterView, StartupListing
from berth.watch import PodWatch

log = logging.getLogger("berth.standby")


class WarmView:
    def __init__(self, config: OperatorConfig, client: KubeApi) -> None:
        self.view = ClusterView(config)
        self._client = client
        #: uid -> Berth's pods bound and not delivered yet, whole (see StartupListing)
        self._unserved: dict[str, Mapping[str, Any]] = {}
        self._watch = PodWatch(client, self._observe, self.view.known_pods)

    async def start(self) -> None:
        listed = await self.view.fill(self._client)
        self._unserved = {pod["metadata"]["uid"]: pod for pod in listed.unserved}
        self._watch.start(listed.version)
        log.info("standby: %d pods in view, watching", len(self.view.known_pods()))

    async def _observe(self, event_type: str, pod: Mapping[str, Any]) -> None:
        self.view.observe_pod(event_type, pod)
        uid = pod["metadata"]["uid"]
        if event_type != "DELETED" and is_berths(pod) and awaits_ports(pod):
            self._unserved[uid] = pod
        else:
            self._unserved.pop(uid, None)

    async def hand_over(self) -> tuple[ClusterView, StartupListing]:
        """Stop watching: the view, and where the leader's watch resumes."""
        version = await self._watch.stop()
        return self.view, StartupListing(version, list(self._unserved.values()))

    async def close(self) -> None:
        await self._watch.close()
