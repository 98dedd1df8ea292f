"""Reconcile one InferenceDeployment: its pods, its port map, its status.

One idempotent function, called from kopf's create/update/resume handlers and
(coalesced) whenever one of its pods changes. It reads Berth's pods from the
in-memory view (view.py); its reads of the API server are the deployment
itself (coalesced refreshes) and its port map.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pydantic import ValidationError

from berth import kube
from berth.api import InferenceDeployment, InferenceDeploymentStatus, RoleSpec, RoleStatus
from berth.capacity import scheduler_waiting
from berth.coalesce import Coalescer
from berth.engines import PresetError, resolve_role
from berth.events import EventSink
from berth.kube import KubeApi, KubeError
from berth.manifests import port_map_body, worker_pod
from berth.names import GROUP, VERSION, pod_name, pod_ports_configmap
from berth.plan import PortPlan, first_global_rank
from berth.pods import (
    delivered_ports,
    is_managed,
    is_ready,
    is_terminated,
    node_of,
    owned_by,
)
from berth.status import (
    Observed,
    active_message,
    degraded_condition,
    degraded_message,
    deployment_status,
    merge_conditions,
)

Body = dict[str, Any]
Key = tuple[str, str]
log = logging.getLogger("berth.reconcile")


class Workers(Protocol):
    def __call__(self, namespace: str, deployment: str) -> list[Mapping[str, Any]]: ...


class Reasons(Protocol):
    """Per-deployment notes another service keeps: why pods wait, which conflict."""

    def __call__(self, namespace: str, deployment: str) -> list[str]: ...


def deployment_url(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
    return kube.path(
        "inferencedeployments",
        namespace=namespace,
        name=name,
        group=GROUP,
        version=VERSION,
        subresource=subresource,
    )


@dataclass
class Reconciler:
    client: KubeApi
    post_event: EventSink
    #: Berth's worker pods of one deployment, from memory (view.py)
    workers: Workers
    #: Why this deployment's pods wait for ports (allocation.py)
    waiting: Reasons = lambda namespace, deployment: []
    #: Port conflicts its pods are part of (repair.py)
    conflicts: Reasons = lambda namespace, deployment: []
    #: Tells the view about a pod just created, before its watch event comes,
    #: so the next reconcile does not create it again.
    remember: Callable[[Mapping[str, Any]], object] = lambda pod: None
    _coalescer: Coalescer[Key] | None = None
    _locks: dict[Key, asyncio.Lock] = field(default_factory=dict)

    def request_refresh(self, namespace: str, name: str) -> None:
        if not name:
            return
        if self._coalescer is None:
            self._coalescer = Coalescer(self._refresh)
        self._coalescer.request((namespace, name))

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()

    async def _refresh(self, key: Key) -> None:
        body = await self.client.get_or_none(deployment_url(*key))
        if body is not None:
            await self.reconcile(body)

    async def reconcile(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if meta.get("deletionTimestamp"):
            return  # going away: the garbage collector removes its pods
        async with self._locks.setdefault(key, asyncio.Lock()):
            try:
                await self._reconcile(body)
            except KubeError as error:
                if not error.gone:
                    raise
                log.info("%s/%s is going away: %s", key[0], key[1], error.message)

    async def _reconcile(self, body: Mapping[str, Any]) -> None:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        generation = int(meta.get("generation", 0))
        previous = _status_of(body)
        try:
            deployment = InferenceDeployment.model_validate(dict(body))
        except ValidationError as error:
            await self._degraded(body, previous, "InvalidSpec", _first_error(error), generation)
            return
        observed = Observed(generation, roles=[])
        pods = self._own_pods(body, observed)
        wanted: set[str] = set()
        for role in deployment.spec.roles:
            wanted |= await self._reconcile_role(body, deployment, role, pods, observed)
        for pname, pod in pods.items():
            if pname not in wanted and not pod["metadata"].get("deletionTimestamp"):
                await self._delete_pod(namespace, pname, pod["metadata"]["uid"])
        live = [p for n, p in pods.items() if n in wanted and not is_terminated(p)]
        for pod in live:
            node, blocks = node_of(pod), delivered_ports(pod)
            observed.bound += node is not None
            if node is not None and blocks is not None:
                observed.delivered.append((node, blocks))
        observed.waiting = self.waiting(namespace, name)
        observed.unschedulable = scheduler_waiting(live)
        observed.conflicts = self.conflicts(namespace, name)
        await self._write_port_map(body, live, observed)
        status = deployment_status(observed, previous)
        message = degraded_message(observed.clashes + observed.problems)
        if message and message != active_message(previous, "Degraded"):
            reason = "NameClash" if observed.clashes else "ReconcileError"
            self.post_event(body, type="Warning", reason=reason, message=message)
        unpinned = degraded_message(observed.warnings)
        if unpinned and unpinned != active_message(previous, "PortsPinned", "False"):
            self.post_event(body, type="Warning", reason="UnpinnedPorts", message=unpinned)
        await self._patch_status(body, previous, status)

    def _own_pods(
        self, body: Mapping[str, Any], observed: Observed
    ) -> dict[str, Mapping[str, Any]]:
        """The deployment's pods by name; pods with its labels it does not own are clashes."""
        meta = body["metadata"]
        pods: dict[str, Mapping[str, Any]] = {}
        for pod in self.workers(meta["namespace"], meta["name"]):
            if owned_by(pod, meta["uid"]):
                pods[pod["metadata"]["name"]] = pod
            else:
                observed.clashes.append(
                    f"pod {pod['metadata']['name']} carries this deployment's labels but is not "
                    "owned by it: Berth leaves it alone; delete it or remove the labels"
                )
        return pods

    async def _reconcile_role(
        self,
        body: Mapping[str, Any],
        deployment: InferenceDeployment,
        role: RoleSpec,
        pods: Mapping[str, Mapping[str, Any]],
        observed: Observed,
    ) -> set[str]:
        """Create, replace and count the role's pods; returns the names it wants."""
        meta = body["metadata"]
        counts = RoleStatus(name=role.name, desired=role.replicas)
        observed.roles.append(counts)
        try:
            role_plan = resolve_role(deployment.spec, role)
        except PresetError as error:
            observed.problems.append(f"role {role.name}: {error}")
            return set()
        observed.warnings += [f"role {role.name}: {w}" for w in role_plan.warnings]
        template = role.template.model_dump(mode="json", by_alias=True, exclude_none=True)
        wanted = set()
        for index in range(role.replicas):
            pname = pod_name(meta["name"], role.name, index)
            wanted.add(pname)
            pod = pods.get(pname)
            if pod is None:
                plan = PortPlan(role_plan, first_global_rank(role, index))
                leader = pod_name(meta["name"], role.name, index - index % role.pods_per_group)
                manifest = worker_pod(body, role.name, index, template, plan, leader=leader)
                await self._create_pod(manifest, meta["uid"], observed)
            elif is_terminated(pod):
                # Finished for good: its ports are already released; replace it.
                await self._delete_pod(meta["namespace"], pname, pod["metadata"]["uid"])
            else:
                counts.ready += is_ready(pod)
                counts.allocated += delivered_ports(pod) is not None
        return wanted

    async def _create_pod(self, manifest: Body, owner_uid: str, observed: Observed) -> None:
        """Create a worker pod unless a name it needs is someone else's."""
        meta = manifest["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        ports = await self.client.get_or_none(
            kube.path("configmaps", namespace=namespace, name=pod_ports_configmap(name))
        )
        if ports is not None and not is_managed(ports):
            observed.clashes.append(
                f"ConfigMap {pod_ports_configmap(name)} exists and is not Berth's, so pod {name} "
                "could never get its ports: delete or rename the ConfigMap"
            )
            return
        if ports is not None and not await self._drop_stale(ports, namespace, name):
            return  # its pod still exists: created meanwhile, the view will show it
        try:
            created = await self.client.create(kube.path("pods", namespace=namespace), manifest)
            self.remember(created)
        except KubeError as error:
            if not error.conflict:
                observed.problems.append(f"pod {name}: {error.message}")
                return
            current = await self.client.get_or_none(
                kube.path("pods", namespace=namespace, name=name)
            )
            if current is not None and not owned_by(current, owner_uid):
                observed.clashes.append(
                    f"pod {name} exists and is not this deployment's: delete or rename it"
                )
            # else created meanwhile, or an earlier one still terminating

    async def _drop_stale(self, ports: Body, namespace: str, name: str) -> bool:
        """Delete the ConfigMap a gone pod of this name left; False if that pod lives.

        A kubelet resolves a new pod's env from whatever ConfigMap has the name,
        so an old pod's, not yet collected, would start it on ports that may be
        someone else's by now.
        """
        pod = await self.client.get_or_none(kube.path("pods", namespace=namespace, name=name))
        if pod is not None and owned_by(ports, pod["metadata"]["uid"]):
            return False
        precondition = {"preconditions": {"uid": ports["metadata"]["uid"]}}
        url = kube.path("configmaps", namespace=namespace, name=pod_ports_configmap(name))
        try:
            await self.client.delete(url, precondition)
        except KubeError as error:
            if not error.conflict:
                raise
        return True

    async def _delete_pod(self, namespace: str, name: str, uid: str) -> None:
        precondition = {"preconditions": {"uid": uid}}
        try:
            await self.client.delete(
                kube.path("pods", namespace=namespace, name=name), precondition
            )
        except KubeError as error:
            if not error.conflict:
                raise

    async def _write_port_map(
        self, body: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], observed: Observed
    ) -> None:
        desired = port_map_body(body, pods)
        meta = desired["metadata"]
        url = kube.path("configmaps", namespace=meta["namespace"], name=meta["name"])
        current = await self.client.get_or_none(url)
        if current is not None and not owned_by(current, body["metadata"]["uid"]):
            observed.clashes.append(
                f"ConfigMap {meta['name']} exists and is not this deployment's port map: "
                "Berth leaves it alone; delete or rename it to get the port map"
            )
        elif current is None:
            try:
                await self.client.create(
                    kube.path("configmaps", namespace=meta["namespace"]), desired
                )
            except KubeError as error:
                if not error.conflict:
                    raise
        elif (current.get("data") or {}) != desired["data"]:
            await self.client.merge_patch(
                url,
                {"data": {**{k: None for k in current.get("data") or {}}, **desired["data"]}},
            )

    async def _degraded(
        self,
        body: Mapping[str, Any],
        previous: InferenceDeploymentStatus | None,
        reason: str,
        message: str,
        generation: int,
    ) -> None:
        if message != active_message(previous, "Degraded"):
            self.post_event(body, type="Warning", reason=reason, message=message)
        conditions = merge_conditions(previous, [degraded_condition([message], generation, reason)])
        status = InferenceDeploymentStatus(observed_generation=generation, conditions=conditions)
        await self._patch_status(body, previous, status)

    async def _patch_status(
        self,
        body: Mapping[str, Any],
        previous: InferenceDeploymentStatus | None,
        status: InferenceDeploymentStatus,
    ) -> None:
        written = status.model_dump(mode="json", by_alias=True, exclude_none=True)
        current = body.get("status") or {}
        if all(current.get(key) == value for key, value in written.items()):
            return  # a refresh that changed nothing costs no write
        meta = body["metadata"]
        try:
            await self.client.merge_patch(
                deployment_url(meta["namespace"], meta["name"], "status"), {"status": written}
            )
        except KubeError as error:
            if not error.not_found:
                raise


def _status_of(body: Mapping[str, Any]) -> InferenceDeploymentStatus | None:
    """The status as last written; an unreadable one counts as none."""
    try:
        return InferenceDeploymentStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return None


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"spec is invalid at {where}: {first['msg']}"
