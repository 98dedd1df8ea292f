"""Per-node ledgers persisted as ConfigMaps, written with compare-and-swap.

The API server is the arbiter (I5 in docs/design.md): every write carries the resourceVersion
it was computed from, so of two writers working from the same state exactly
one succeeds and the other re-reads — as Kubernetes' own NodePort allocator
does with its bitmap object.
"""

from __future__ import annotations

import logging

from berth import kube
from berth.allocator import AllocationConflict
from berth.kube import KubeApi, KubeError
from berth.ledger.records import NodeLedger
from berth.names import (
    ANNOTATION_LEDGER_NODE,
    LABEL_LEDGER,
    LABEL_MANAGED_BY,
    LEDGER_PREFIX,
    MANAGED_BY,
    ledger_configmap,
)
from berth.pools import Pool

log = logging.getLogger("berth.ledger")


class LedgerConflict(Exception):
    """Someone else wrote the ledger since we read it: re-read and retry."""


class LedgerNotOwned(Exception):
    """The ledger's name is taken by a ConfigMap Berth did not write."""


#: The pool of a ledger that could not be read: allocation reconfigures it.
UNKNOWN_POOL = Pool("unknown", ())


class LedgerStore:
    def __init__(self, client: KubeApi, namespace: str) -> None:
        self._client = client
        self._namespace = namespace

    def _url(self, node: str | None = None) -> str:
        name = ledger_configmap(node) if node is not None else None
        return kube.path("configmaps", namespace=self._namespace, name=name)

    async def load(self, node: str) -> NodeLedger | None:
        body = await self._client.get_or_none(self._url(node))
        if body is None:
            return None
        labels = body["metadata"].get("labels") or {}
        if labels.get(LABEL_MANAGED_BY) != MANAGED_BY:
            raise LedgerNotOwned(
                f"ConfigMap {self._namespace}/{ledger_configmap(node)} exists and Berth did not "
                "write it: Berth allocates nothing on that node until it is deleted or renamed"
            )
        return _decode(body)

    async def list(self) -> list[NodeLedger]:
        bodies = await self._client.list(self._url(), label_selector=f"{LABEL_LEDGER}=true")
        return [_decode(body) for body in bodies]

    async def save(self, ledger: NodeLedger, node_uid: str | None = None) -> None:
        """Create or CAS-replace; raises LedgerConflict when the state moved on."""
        metadata: dict[str, object] = {
            "name": ledger_configmap(ledger.node),
            "namespace": self._namespace,
            "labels": {LABEL_LEDGER: "true", LABEL_MANAGED_BY: MANAGED_BY},
            "annotations": {ANNOTATION_LEDGER_NODE: ledger.node},
        }
        node_uid = ledger.node_uid or node_uid
        if node_uid:
            # The garbage collector drops the ledger with its node.
            metadata["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": ledger.node, "uid": node_uid}
            ]
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata}
        body["data"] = ledger.encode()
        try:
            if ledger.resource_version is None:
                saved = await self._client.create(self._url(), body)
            else:
                metadata["resourceVersion"] = ledger.resource_version
                saved = await self._client.replace(self._url(ledger.node), body)
        except KubeError as error:
            if error.conflict or (error.not_found and ledger.resource_version):
                raise LedgerConflict(str(error)) from error
            raise
        ledger.resource_version = saved["metadata"]["resourceVersion"]
        ledger.node_uid = node_uid


def _decode(body: kube.Body) -> NodeLedger:
    """The ledger in ``body``; one that does not parse comes back empty, keeping
    its resourceVersion so the next CAS write replaces it with the repaired one."""
    metadata = body["metadata"]
    node = (metadata.get("annotations") or {}).get(ANNOTATION_LEDGER_NODE) or metadata[
        "name"
    ].removeprefix(LEDGER_PREFIX)
    version = metadata["resourceVersion"]
    try:
        ledger = NodeLedger.decode(node, body.get("data") or {}, version)
    except (ValueError, KeyError, AllocationConflict) as error:
        log.error(
            "ledger of node %s is unreadable (%s); it is rebuilt from the pods' delivered ports",
            node,
            error,
        )
        ledger = NodeLedger.empty(node, UNKNOWN_POOL)
        ledger.resource_version = version
    owners = [o for o in metadata.get("ownerReferences") or () if o.get("kind") == "Node"]
    ledger.node_uid = owners[0]["uid"] if owners else None
    return ledger
