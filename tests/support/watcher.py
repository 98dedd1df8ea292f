"""Check the invariants on every state the API server goes through, not only the last.

Pods and ConfigMaps are watched cluster-wide in two streams. Events are
applied in resourceVersion order across both (etcd revisions, which a
storage-backed API server hands out from one counter), so the checker never
sees a ConfigMap written after a pod's deletion next to that pod. A stream's
events can only be applied once every stream has reported a revision at
least as new: each watch asks for bookmarks, and a heartbeat touches one
object of each kind so that an idle stream still moves on.

Nothing fails quietly: an exception in any thread is kept and raised by
:meth:`ClusterWatcher.check` (and on leaving the ``with`` block). A watch
that ends resumes from the last revision it saw; one refused with 410 Gone
re-lists, and that gap is counted (``gaps``) so a test can insist on none.
"""

from __future__ import annotations

import heapq
import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines
from tests.support.invariants import (
    LEDGER_NAMESPACE,
    Body,
    ClusterState,
    InvariantViolation,
    StableTracker,
    is_live,
    key_of,
)

HEARTBEAT = "berth-checker-heartbeat"
HEARTBEAT_NAMESPACE = "default"


@dataclass(order=True)
class _Event:
    rv: int
    seq: int
    stream: str = field(compare=False)
    type: str = field(compare=False)
    obj: Body = field(compare=False)


class _Stream:
    """One resource kind: list, then watch from the last revision, forever."""

    def __init__(self, name: str, lister: Callable[..., Any], sink: ClusterWatcher) -> None:
        self.name = name
        self.lister = lister
        self.sink = sink
        self.rv = 0
        self.thread = threading.Thread(target=sink.guard(self.run), daemon=True, name=name)

    def list(self, replace: bool) -> None:
        resp = self.lister(_preload_content=False)
        body = json.loads(resp.data)
        self.rv = int(body["metadata"]["resourceVersion"])
        self.sink.put_list(self, body["items"], self.rv, replace)

    def run(self) -> None:
        self.list(replace=False)
        while not self.sink.stopping.is_set():
            try:
                for line in self._watch():
                    self._line(line)
            except ApiException as error:
                if error.status != 410:
                    raise
                self.sink.gone(self)

    def _watch(self) -> Iterator[str]:
        resp = self.lister(
            watch=True,
            resource_version=str(self.rv),
            allow_watch_bookmarks=True,
            timeout_seconds=3,
            _preload_content=False,
        )
        try:
            for line in iter_resp_lines(resp):  # type: ignore[no-untyped-call]
                yield line
                if self.sink.stopping.is_set():
                    return
        finally:
            resp.close()
            resp.release_conn()

    def _line(self, line: str) -> None:
        if not line.strip():
            return
        event = json.loads(line)
        obj = event["object"]
        if event["type"] == "ERROR":
            raise ApiException(status=obj.get("code"), reason=obj.get("message"))
        self.rv = int(obj["metadata"]["resourceVersion"])
        if event["type"] == "BOOKMARK":
            self.sink.mark(self, self.rv)
        else:
            self.sink.put(self, event["type"], obj, self.rv)


class ClusterWatcher:
    """Checks I1, the ledgers and I3 on every state of the cluster; see the module doc.

    ``ledgers=False`` leaves the ledgers out (for tests that break them on purpose).
    """

    def __init__(self, core_api: Any, ledgers: bool = True, heartbeat: float = 0.5) -> None:
        self._core = core_api
        self._check_ledgers = ledgers
        self._heartbeat = heartbeat
        self.state = ClusterState()
        self.tracker = StableTracker()
        self.violations: list[str] = []
        self.errors: list[BaseException] = []
        self.states_checked = 0  # distinct revisions applied and checked
        self.gaps = 0  # watches refused with 410 Gone, so re-listed
        self.stopping = threading.Event()
        self._lock = threading.Condition()
        self._heap: list[_Event] = []
        self._seq = itertools.count()
        self._marks: dict[str, int] = {}
        self._applied = 0  # every event up to this revision is applied
        self._streams = [
            _Stream("pods", core_api.list_pod_for_all_namespaces, self),
            _Stream("configmaps", core_api.list_config_map_for_all_namespaces, self),
        ]
        self._threads = [s.thread for s in self._streams] + [
            threading.Thread(target=self.guard(self._apply_loop), daemon=True, name="checker"),
            threading.Thread(target=self.guard(self._beat), daemon=True, name="heartbeat"),
        ]

    # --- lifecycle ---------------------------------------------------------------

    def __enter__(self) -> ClusterWatcher:
        self._ensure_heartbeat_objects()
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, kind: object, *_: object) -> None:
        try:
            if kind is None:  # a failing test's own error says more than a lagging checker
                self.drain()
        finally:
            self.stopping.set()
            with self._lock:
                self._lock.notify_all()
            for thread in self._threads:
                thread.join(15)
            self._delete_heartbeat_objects()
        if kind is None:
            self.check()

    def guard(self, target: Callable[[], None]) -> Callable[[], None]:
        """Run ``target``; keep whatever it raises for the test to see."""

        def run() -> None:
            try:
                target()
            except BaseException as error:
                if not self.stopping.is_set():
                    self.errors.append(error)
                    self.stopping.set()
                    with self._lock:
                        self._lock.notify_all()

        return run

    def check(self) -> None:
        """Raise what the watcher found so far: a thread's error or any violation."""
        if self.errors:
            raise AssertionError(
                f"the cluster checker failed: {self.errors[0]!r}"
            ) from self.errors[0]
        problems = self.violations + self.tracker.violations
        if problems:
            raise InvariantViolation(problems)

    def drain(self, timeout: float = 30) -> None:
        """Wait until every event up to now has been applied (or the checker died)."""
        target = max(int(self._core.list_namespace(limit=1).metadata.resource_version), 0)
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self.errors and self._applied < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"checker lagged: applied {self._applied}, marks {self._marks}, "
                        f"target {target}, {len(self._heap)} events queued"
                    )
                self._lock.wait(min(remaining, 0.5))

    # --- the streams' side -------------------------------------------------------

    def put(self, stream: _Stream, type_: str, obj: Body, rv: int) -> None:
        with self._lock:
            heapq.heappush(self._heap, _Event(rv, next(self._seq), stream.name, type_, obj))
            self._marks[stream.name] = rv
            self._lock.notify_all()

    def mark(self, stream: _Stream, rv: int) -> None:
        with self._lock:
            self._marks[stream.name] = max(self._marks.get(stream.name, 0), rv)
            self._lock.notify_all()

    def put_list(self, stream: _Stream, items: list[Body], rv: int, replace: bool) -> None:
        """A list is one state at revision ``rv``; after a gap it replaces the stream's state."""
        event = _Event(
            rv, next(self._seq), stream.name, "LIST", {"items": items, "replace": replace}
        )
        with self._lock:
            heapq.heappush(self._heap, event)
            self._marks[stream.name] = rv
            self._lock.notify_all()

    def gone(self, stream: _Stream) -> None:
        self.gaps += 1
        stream.list(replace=True)

    # --- the checker's side ------------------------------------------------------

    def _apply_loop(self) -> None:
        while not self.stopping.is_set():
            with self._lock:
                horizon = min(self._marks.values(), default=0)
                ready = self._ready()
                if len(self._marks) < len(self._streams) or not ready:
                    if len(self._marks) == len(self._streams):
                        self._applied = max(self._applied, horizon)
                        self._lock.notify_all()
                    self._lock.wait(0.5)
                    continue
            for event in ready:
                self._apply(event)
            with self._lock:
                self._applied = max(self._applied, horizon)
                self._lock.notify_all()

    def _ready(self) -> list[_Event]:
        if len(self._marks) < len(self._streams):
            return []
        horizon = min(self._marks.values())
        out = []
        while self._heap and self._heap[0].rv <= horizon:
            out.append(heapq.heappop(self._heap))
        return out

    def _apply(self, event: _Event) -> None:
        state = self.state
        touched: list[Body] = []  # pods whose delivery may have changed
        nodes: set[str] = set()
        if event.type == "LIST":
            items, replace = event.obj["items"], event.obj["replace"]
            if event.stream == "pods":
                if replace:
                    nodes |= state.nodes()
                    state.pods.clear()
                for pod in items:
                    state.pods[pod["metadata"]["uid"]] = pod
                touched = list(state.pods.values())
            else:
                if replace:
                    state.configmaps.clear()
                for cm in items:
                    state.configmaps[key_of(cm)] = cm
                touched = list(state.pods.values())
        elif event.stream == "pods":
            uid = event.obj["metadata"]["uid"]
            old = state.pods.get(uid)
            if old is not None and is_live(old):
                nodes.add(old["spec"]["nodeName"])
            if event.type == "DELETED":
                state.pods.pop(uid, None)
            else:
                state.pods[uid] = event.obj
                touched = [event.obj]
        else:
            namespace, name = key_of(event.obj)
            if event.type == "DELETED":
                state.configmaps.pop((namespace, name), None)
            else:
                state.configmaps[(namespace, name)] = event.obj
            touched = state.pods_using(namespace, name)
        nodes |= {p["spec"]["nodeName"] for p in touched if is_live(p)}
        self.states_checked += 1
        for node in sorted(nodes):
            self.violations += state.node_violations(node)
        for pod in touched:
            self.tracker.observe(state, pod)
        ledger_event = event.stream == "configmaps" and (
            event.type == "LIST" or key_of(event.obj)[0] == LEDGER_NAMESPACE
        )
        if self._check_ledgers and (ledger_event or nodes):
            self.violations += state.ledger_violations(strict=False)
        del self.violations[100:]  # the first hundred say enough

    # --- heartbeat ---------------------------------------------------------------

    def _heartbeat_bodies(self) -> tuple[Body, Body]:
        meta = {"name": HEARTBEAT, "namespace": HEARTBEAT_NAMESPACE}
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            # No scheduler serves this name: the pod stays unbound and harmless.
            "spec": {
                "schedulerName": "berth-checker-none",
                "containers": [{"name": "idle", "image": "none:1"}],
            },
        }
        return pod, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}

    def _ensure_heartbeat_objects(self) -> None:
        pod, cm = self._heartbeat_bodies()
        for create, body in (
            (self._core.create_namespaced_pod, pod),
            (self._core.create_namespaced_config_map, cm),
        ):
            try:
                create(HEARTBEAT_NAMESPACE, body)
            except ApiException as error:
                if error.status != 409:
                    raise

    def _delete_heartbeat_objects(self) -> None:
        for delete in (
            self._core.delete_namespaced_pod,
            self._core.delete_namespaced_config_map,
        ):
            try:
                delete(HEARTBEAT, HEARTBEAT_NAMESPACE, grace_period_seconds=0)
            except ApiException as error:
                if error.status != 404:
                    raise

    def _beat(self) -> None:
        for tick in itertools.count():
            if self.stopping.wait(self._heartbeat):
                return
            patch = {"metadata": {"annotations": {"berth.dev/checker-tick": str(tick)}}}
            self._core.patch_namespaced_pod(HEARTBEAT, HEARTBEAT_NAMESPACE, patch)
            self._core.patch_namespaced_config_map(HEARTBEAT, HEARTBEAT_NAMESPACE, patch)
