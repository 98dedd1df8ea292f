"""Reconcile one InferenceDeployment: its pods, its port map, its status.

One idempotent function, called from kopf's create/update/resume handlers and
(coalesced) whenever one of its pods changes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from berth import kube
from berth.api import InferenceDeployment
from berth.coalesce import Coalescer
from berth.engines import PresetError, resolve_role
from berth.kube import Kube, KubeError
from berth.names import (
    ANNOTATION_PORTS,
    GROUP,
    LABEL_DEPLOYMENT,
    VERSION,
    pod_name,
)
from berth.plan import PortPlan, first_global_rank
from berth.ports import EventSink, Waiting, is_terminated
from berth.workload import port_map_body, worker_pod

Body = dict[str, Any]
log = logging.getLogger("berth.deployments")


@dataclass
class RoleCounts:
    name: str
    desired: int = 0
    ready: int = 0
    allocated: int = 0


def _is_ready(pod: Mapping[str, Any]) -> bool:
    status = pod.get("status", {})
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions", [])
    )


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int) -> Body:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
    }


@dataclass
class DeploymentService:
    client: Kube
    post_event: EventSink
    #: (namespace, deployment) -> its worker pods, from memory (berth.cluster)
    workers: Callable[[str, str], list[Mapping[str, Any]]]
    waiting: dict[str, Waiting] = field(default_factory=dict)
    _coalescer: Coalescer[tuple[str, str]] | None = None
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def request_refresh(self, namespace: str, name: str) -> None:
        if not name:
            return
        if self._coalescer is None:
            self._coalescer = Coalescer(self._refresh)
        self._coalescer.request((namespace, name))

    async def close(self) -> None:
        if self._coalescer is not None:
            await self._coalescer.close()

    async def _refresh(self, key: tuple[str, str]) -> None:
        namespace, name = key
        body = await self.client.get_or_none(self._url(namespace, name))
        if body is not None:
            await self.reconcile(body)

    @staticmethod
    def _url(namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        return kube.path(
            "inferencedeployments",
            namespace=namespace,
            name=name,
            group=GROUP,
            version=VERSION,
            subresource=subresource,
        )

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
        try:
            deployment = InferenceDeployment.model_validate(dict(body))
        except ValidationError as error:
            await self._degraded(body, "InvalidSpec", _first_error(error), generation)
            return
        by_name = {p["metadata"]["name"]: p for p in self.workers(namespace, name)}
        problems: list[str] = []
        counts: list[RoleCounts] = []
        wanted: set[str] = set()
        for role in deployment.spec.roles:
            count = RoleCounts(role.name, desired=role.replicas)
            counts.append(count)
            try:
                resolved = resolve_role(deployment.spec, role)
            except PresetError as error:
                problems.append(f"role {role.name}: {error}")
                continue
            template = role.template.model_dump(mode="json", by_alias=True, exclude_none=True)
            for index in range(role.replicas):
                pname = pod_name(name, role.name, index)
                wanted.add(pname)
                pod = by_name.get(pname)
                if pod is not None and is_terminated(pod):
                    # Finished for good: its ports are already released; replace it.
                    await self._delete_pod(namespace, pname, pod["metadata"]["uid"])
                    continue
                if pod is None:
                    plan = PortPlan(resolved, first_global_rank(role, index))
                    manifest = worker_pod(body, role.name, index, template, plan)
                    error_text = await self._create_pod(manifest)
                    if error_text:
                        problems.append(f"pod {pname}: {error_text}")
                    continue
                count.ready += _is_ready(pod)
                count.allocated += bool(
                    pod["metadata"].get("annotations", {}).get(ANNOTATION_PORTS)
                )
        for pname, pod in by_name.items():
            if pname not in wanted and not pod["metadata"].get("deletionTimestamp"):
                await self._delete_pod(namespace, pname, pod["metadata"]["uid"])
        live = [p for n, p in by_name.items() if n in wanted and not is_terminated(p)]
        await self._write_port_map(body, live)
        await self._write_status(body, counts, live, problems, generation)

    async def _create_pod(self, manifest: Body) -> str | None:
        meta = manifest["metadata"]
        try:
            await self.client.create(kube.path("pods", namespace=meta["namespace"]), manifest)
        except KubeError as error:
            if error.conflict:  # created meanwhile, or still terminating
                return None
            return error.message
        return None

    async def _delete_pod(self, namespace: str, name: str, uid: str) -> None:
        precondition = {"preconditions": {"uid": uid}}
        try:
            await self.client.delete(
                kube.path("pods", namespace=namespace, name=name), precondition
            )
        except KubeError as error:
            if not error.conflict:
                raise

    async def _write_port_map(self, body: Mapping[str, Any], pods: list[Mapping[str, Any]]) -> None:
        desired = port_map_body(body, pods)
        meta = desired["metadata"]
        url = kube.path("configmaps", namespace=meta["namespace"], name=meta["name"])
        current = await self.client.get_or_none(url)
        if current is None:
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

    async def _write_status(
        self,
        body: Mapping[str, Any],
        counts: list[RoleCounts],
        live: list[Mapping[str, Any]],
        problems: list[str],
        generation: int,
    ) -> None:
        meta = body["metadata"]
        waiting = [
            w
            for w in self.waiting.values()
            if w.pod["metadata"]["namespace"] == meta["namespace"]
            and w.pod["metadata"].get("labels", {}).get(LABEL_DEPLOYMENT) == meta["name"]
        ]
        desired = sum(c.desired for c in counts)
        ready = sum(c.ready for c in counts)
        allocated = sum(c.allocated for c in counts)
        bound = sum(1 for p in live if p.get("spec", {}).get("nodeName"))
        if waiting:
            ports_ok, ports_reason = False, "PortsExhausted"
            ports_msg = f"{len(waiting)} pod(s) waiting for ports: {waiting[0].reason}"
        else:
            ports_ok = allocated >= bound
            ports_reason = "Allocated" if ports_ok else "Pending"
            ports_msg = f"{allocated} of {desired} pods have their ports"
        all_ready = ready == desired and not problems and not waiting
        conditions = [
            _condition(
                "Ready",
                all_ready,
                "AllReady" if all_ready else "NotReady",
                f"{ready}/{desired} pods ready",
                generation,
            ),
            _condition(
                "Progressing",
                not all_ready and not problems,
                "Reconciling" if not all_ready else "Complete",
                f"{allocated}/{desired} allocated, {ready}/{desired} ready",
                generation,
            ),
            _condition("PortsAllocated", ports_ok, ports_reason, ports_msg, generation),
            _condition(
                "Degraded",
                bool(problems),
                "ReconcileError" if problems else "AsExpected",
                "; ".join(problems)[:1000] or "no problems",
                generation,
            ),
        ]
        status = {
            "observedGeneration": generation,
            "conditions": _merge_conditions(
                body.get("status", {}).get("conditions", []), conditions
            ),
            "roles": [c.__dict__ for c in counts],
            "summary": _summary(live),
            **{c.name: f"{c.ready}/{c.desired}" for c in counts if c.name in ("prefill", "decode")},
        }
        degraded = "; ".join(problems)[:1000]
        if problems and degraded != _condition_message(body, "Degraded"):
            self.post_event(body, type="Warning", reason="ReconcileError", message=degraded)
        await self._patch_status(body, status)

    async def _degraded(
        self, body: Mapping[str, Any], reason: str, message: str, generation: int
    ) -> None:
        if message != _condition_message(body, "Degraded"):
            self.post_event(body, type="Warning", reason=reason, message=message)
        condition = _condition("Degraded", True, reason, message, generation)
        conditions = _merge_conditions(body.get("status", {}).get("conditions", []), [condition])
        await self._patch_status(body, {"observedGeneration": generation, "conditions": conditions})

    async def _patch_status(self, body: Mapping[str, Any], status: Body) -> None:
        current = body.get("status") or {}
        if all(current.get(key) == value for key, value in status.items()):
            return  # a refresh that changed nothing costs no write
        meta = body["metadata"]
        url = self._url(meta["namespace"], meta["name"], "status")
        try:
            await self.client.merge_patch(url, {"status": status})
        except KubeError as error:
            if not error.not_found:
                raise


def _summary(pods: list[Mapping[str, Any]]) -> str:
    """``node-a: 20000-20011, node-b: 20000-20003`` — the span each node uses."""
    spans: dict[str, list[int]] = {}
    for pod in pods:
        ports = pod["metadata"].get("annotations", {}).get(ANNOTATION_PORTS)
        node = pod.get("spec", {}).get("nodeName")
        if not ports or not node:
            continue
        for text in json.loads(ports).values():
            first, _, last = text.partition("-")
            span = spans.setdefault(node, [int(first), int(last or first)])
            span[0], span[1] = min(span[0], int(first)), max(span[1], int(last or first))
    return ", ".join(f"{n}: {a}-{b}" for n, (a, b) in sorted(spans.items()))[:500]


def _condition_message(body: Mapping[str, Any], type_: str) -> str | None:
    """The message of a condition that is currently True (to post Events once)."""
    for condition in body.get("status", {}).get("conditions", []):
        if condition.get("type") == type_ and condition.get("status") == "True":
            return str(condition.get("message"))
    return None


def _merge_conditions(old: list[Body], new: list[Body]) -> list[Body]:
    """Keep lastTransitionTime when a condition's status did not change."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    previous = {c.get("type"): c for c in old}
    merged = {c["type"]: c for c in old}
    for condition in new:
        before = previous.get(condition["type"])
        same = before is not None and before.get("status") == condition["status"]
        stamp = before.get("lastTransitionTime", now) if same and before else now
        merged[condition["type"]] = {**condition, "lastTransitionTime": stamp}
    return list(merged.values())


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"spec is invalid at {where}: {first['msg']}"
