"""Faults the test harness injects on purpose, to prove the checker catches them.

These are harness-only writes, never a mode of the operator: each breaks a
promise Berth made to a pod in a way Berth itself never may (a delivered
port rewritten to another pod's, a ledger replaced by one that contradicts
the pods). Each returns a function that undoes it.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from tests.support.invariants import LEDGER_NAMESPACE, PORTS_ANNOTATION, Body

Undo = Callable[[], None]


def _get(cluster: Any, *args: str) -> Body:
    found: Body = cluster.json("get", *args)
    return found


def _put(cluster: Any, body: Body) -> None:
    cluster.kubectl("replace", "-f", "-", input=json.dumps(body))


def _fresh(body: Body) -> dict[str, Any]:
    """``body`` without the server's fields, to create it again."""
    out = copy.deepcopy(dict(body))
    for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
        out["metadata"].pop(key, None)
    return out


def overlap_configmap(cluster: Any, victim: Body, donor: Body, key: str) -> Undo:
    """Rewrite env ``key`` of ``victim``'s ports ConfigMap to ``donor``'s value."""
    ns = victim["metadata"]["namespace"]
    name = f"{victim['metadata']['name']}-ports"
    original = _get(cluster, "configmap", "-n", ns, name)
    theirs = _get(cluster, "configmap", "-n", ns, f"{donor['metadata']['name']}-ports")
    broken = _fresh(original)
    broken["data"][key] = theirs["data"][key]
    _put(cluster, broken)
    return lambda: _put(cluster, _fresh(original))


def overlap_annotation(cluster: Any, victim: Body, donor: Body) -> Undo:
    """Give ``victim`` the ``berth.dev/ports`` annotation ``donor`` received."""
    meta = victim["metadata"]

    def annotate(value: str) -> None:
        patch = json.dumps({"metadata": {"annotations": {PORTS_ANNOTATION: value}}})
        cluster.kubectl("patch", "pod", "-n", meta["namespace"], meta["name"], "-p", patch)

    annotate(donor["metadata"]["annotations"][PORTS_ANNOTATION])
    return lambda: annotate(meta["annotations"][PORTS_ANNOTATION])


def conflicting_ledger(cluster: Any, node: str, donor: Body) -> Undo:
    """Delete ``node``'s ledger and write one where a ghost pod holds ``donor``'s ports."""
    name = f"berth-ledger.{node}"
    original = _get(cluster, "configmap", "-n", LEDGER_NAMESPACE, name)
    forged = _fresh(original)
    blocks = json.loads(donor["metadata"]["annotations"][PORTS_ANNOTATION])
    record = ",".join(f"{block}={ports}" for block, ports in blocks.items())
    forged["data"] = {
        "pool": original["data"]["pool"],
        "00000000-ghost": f"{donor['metadata']['namespace']} ghost - - {record}",
    }
    cluster.kubectl("delete", "configmap", "-n", LEDGER_NAMESPACE, name)
    cluster.kubectl("create", "-f", "-", input=json.dumps(forged))

    def undo() -> None:
        current = _get(cluster, "configmap", "-n", LEDGER_NAMESPACE, name)
        _put(cluster, {**_fresh(original), "metadata": current["metadata"]})

    return undo
