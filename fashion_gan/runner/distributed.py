"""torch.distributed settings for multi-node jobs (SageMaker instance_count > 1, several containers).

Lightning's default cluster environment reads MASTER_ADDR, MASTER_PORT and NODE_RANK from the
environment and spawns one process per GPU on each node itself, so a node needs only these
values plus `trainer.num_nodes` (NUM_NODES here). WORLD_SIZE is the total number of processes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from fashion_gan.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500


def torch_distributed_env(hosts: list[str], current_host: str, gpus_per_host: int,
                          port: int = DEFAULT_MASTER_PORT) -> dict[str, str]:
    """Return the torch.distributed variables of `current_host`; the first host is the master (rank 0).

    `gpus_per_host` is the number of processes per node (use 1 for CPU nodes).
    """
    if not hosts:
        raise ConfigError("no hosts given for a distributed job; expected at least one host name")
    if current_host not in hosts:
        raise ConfigError(f"current host {current_host!r} is not in the host list {hosts}")
    if gpus_per_host < 1:
        raise ConfigError(f"invalid gpus_per_host {gpus_per_host}: expected at least 1 process per node")
    node_rank = hosts.index(current_host)
    return {
        "MASTER_ADDR": hosts[0],
        "MASTER_PORT": str(port),
        "NUM_NODES": str(len(hosts)),
        "NODE_RANK": str(node_rank),
        "WORLD_SIZE": str(len(hosts) * gpus_per_host),
    }


def sagemaker_distributed_env(environ: Mapping[str, str], port: int = DEFAULT_MASTER_PORT) -> dict[str, str] | None:
    """Return torch.distributed variables from SageMaker's SM_HOSTS, SM_CURRENT_HOST and SM_NUM_GPUS.

    Returns None outside SageMaker (SM_HOSTS or SM_CURRENT_HOST not set) and for single-host jobs.
    """
    hosts_text = environ.get("SM_HOSTS")
    current_host = environ.get("SM_CURRENT_HOST")
    if not hosts_text or not current_host:
        return None
    try:
        hosts = json.loads(hosts_text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"invalid SM_HOSTS {hosts_text!r}: expected a JSON list of host names") from err
    if not isinstance(hosts, list) or len(hosts) < 2:
        return None
    gpus_per_host = max(1, int(environ.get("SM_NUM_GPUS", "0") or 0))
    values = torch_distributed_env([str(host) for host in hosts], current_host, gpus_per_host, port)
    log.info("SageMaker multi-node job: host %s is node %s of %s (master %s)", current_host,
             values["NODE_RANK"], values["NUM_NODES"], values["MASTER_ADDR"])
    return values


def node_host_names(job_id: str, node_count: int) -> list[str]:
    """Return the container host names of a multi-container job: `<job_id>-node-0`, `-node-1`, …"""
    return [f"{job_id}-node-{index}" for index in range(node_count)]


def multi_node_envs(job_id: str, node_count: int, gpus_per_host: int,
                    port: int = DEFAULT_MASTER_PORT) -> list[dict[str, str]]:
    """Return one environment per node of a multi-container (e.g. Docker) job, in node order.

    The containers must reach each other by the names from `node_host_names`, for example on one
    user-defined Docker network; node 0 is the master.
    """
    if node_count < 1:
        raise ConfigError(f"invalid node count {node_count}: expected at least 1")
    hosts = node_host_names(job_id, node_count)
    return [torch_distributed_env(hosts, host, gpus_per_host, port) for host in hosts]
