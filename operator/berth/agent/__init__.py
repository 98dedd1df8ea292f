"""The optional node agent (``python -m berth.agent``), one per node (DaemonSet).

It reads what only the node knows: its ephemeral port range, the ports the
kernel keeps out of it, and the TCP/UDP listeners of the host network
namespace. It publishes them in the ConfigMap ``berth-node.<node>`` and, when
allowed, reserves the node's pool in ``ip_local_reserved_ports``.
docs/node-agent.md explains each read, write and privilege.
"""
