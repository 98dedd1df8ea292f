"""Per-node ledgers persisted as ConfigMaps, written with compare-and-swap.

The API server is the arbiter (I5 in docs/design.md): every write carries the resourceVersion
it was computed from, so of two writers working from the same state exactly
one succeeds and the other re-reads — as Kubernetes' own NodePort allocator
does with its bitmap object.
"""

from __future__ import annotations

import logging
from typing import Any

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


#: The pool of a ledger that could not be read: allocation reconfigures it.
UNKNOWN_POOL = Pool("unknown", ())


class LedgerStore:
    def __init__(self, client: KubeApi, namespace: str) -> None:
        self._client = client
        self._namespace = namespace

    def _url(self, node: str | None = None) -> str:
        name = ledger_configmap(node) if node is not None else None
        return kube.path("configmaps", namespace=self._namespace, name=name)

    def reference(self, node: str) -> dict[str, Any]:
        meta = {"name": ledger_configmap(node), "namespace": self._namespace}
        return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}

    async def load(self, node: str) -> NodeLedger | None:
        body = await self._client.get_or_none(self._url(node))
        if body is None:
            return None
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
    name = f"{metadata.get('namespace', '')}/{metadata['name']}"
    try:
        if (metadata.get("labels") or {}).get(LABEL_MANAGED_BY) != MANAGED_BY:
            raise ValueError("Berth did not write it (no managed-by label)")
        ledger = NodeLedger.decode(node, body.get("data") or {}, version)
    except (ValueError, KeyError, AllocationConflict) as error:
        damage = f"ledger {name} is unusable ({error}): rebuilt from the pods' delivered ports"
        log.error("%s", damage)
        ledger = NodeLedger.empty(node, UNKNOWN_POOL)
        ledger.resource_version = version
        ledger.damage = damage
    owners = [o for o in metadata.get("ownerReferences") or () if o.get("kind") == "Node"]
    ledger.node_uid = owners[0]["uid"] if owners else None
    return ledger
