"""Ray instances of their own on this machine, for tests, benchmarks and rehearsals.

LocalRayHead is a one-node cluster started with `ray start --head`. LocalAutoscalingCluster
adds worker node types that Ray's autoscaler starts and stops on demand as raylet processes on
this machine (Ray's fake multi-node provider). It rehearses on one machine what a cloud cluster
does with the trainer: waiting placement groups make the autoscaler add nodes of the types that
offer their resources, idle nodes are removed, and a node can be killed to see what the run
loses.

Several instances may run at once (parallel test workers, a job-submit cluster beside them)
without meeting:
- each lives in its own temp dir, and every process it starts names that dir on its command
  line, so shutdown() ends exactly those (`ray stop` would end every Ray instance on the
  machine, other users' too);
- everything it listens on gets a free port, where Ray's defaults are fixed (the dashboard
  agent, the client server) and the second instance's agents would fail to bind;
- RAY_ADDRESS is set in all its processes, so Ray libraries that look for "the" cluster
  themselves (Ray Train's placement-group cleaner, the state API) find this one and not
  "multiple active Ray instances".
Unlike ray.cluster_utils.AutoscalingCluster, it needs no example.yaml from Ray's source tree
(the wheel does not ship it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import ray
from ray import serve
from ray.autoscaler.v2.sdk import get_cluster_status

from spatialrl.ports import free_port

HEAD_NODE_TYPE = "ray.head.default"  # the fake provider's name for the head
NODE_TYPE_LABEL = "node-type"  # the label each worker node carries: its node type's name
RAY_CLI = Path(sys.executable).parent / "ray"


def processes_naming(temp_dir: str) -> list[psutil.Process]:
    """The processes of one Ray instance: each names its temp dir on its command line."""
    return [process for process in psutil.process_iter(["cmdline"])
            if any(temp_dir in arg for arg in process.info["cmdline"] or ())]


# Ray 2.60's gcs_server, raylet and autoscaler monitor outlive SIGTERM by more than 15 s
# (measured); an instance being thrown away has nothing to save, so they get one second.
TERMINATE_GRACE_S = 1.0


def end_processes_naming(temp_dir: str) -> None:
    """Terminate (then kill) the processes of one Ray instance. Unlike `ray stop`, other Ray
    instances on the machine live on."""
    processes = processes_naming(temp_dir)
    for process in processes:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(processes, timeout=TERMINATE_GRACE_S)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


class LocalRayHead:
    """A head node of its own (see the module docstring). `env` is added to its processes'
    environment; `extra_args` to `ray start`. With `dashboard`, the dashboard (and with it
    the job API) listens on `dashboard_address`."""

    def __init__(self, num_cpus: float = 2, resources: dict[str, float] | None = None,
                 system_config: dict | None = None, host: str | None = None,
                 dashboard: bool = False, env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.num_cpus = num_cpus
        self.resources = resources or {}
        self.system_config = system_config or {}
        self.host = host
        self.dashboard = dashboard
        self.extra_env = env or {}
        self.extra_args = extra_args
        self.temp_dir: str | None = None
        self.address: str | None = None
        self.dashboard_address: str | None = None

    @property
    def env(self) -> dict[str, str]:
        """The environment of its processes: connect a subprocess to it with this."""
        # A throwaway cluster of this machine: no token auth (Ray's default for `ray start`)
        # unless `env` asks for it, since a driver must have the token mode set before it
        # imports Ray.
        return {**os.environ, "RAY_AUTH_MODE": "disabled", **self.extra_env,
                "RAY_ADDRESS": self.address or ""}

    def start(self, attempts: int = 2) -> str:
        """Start the head; returns the GCS address to ray.init(). A failed start is ended and
        tried again with new ports and a new temp dir: once, in a parallel test run, the
        raylet did not register within Ray's fixed 30 s (a busy machine, or a port another
        instance took between its choice here and the bind)."""
        for attempt in range(1, attempts + 1):
            started = self._start_once()
            if started.returncode == 0:
                return self.address
            self.shutdown()
            failure = (f"ray start --head failed ({started.returncode}, attempt {attempt} of "
                       f"{attempts}): {(started.stdout + started.stderr)[-3000:]}")
        raise RuntimeError(failure)

    def _start_once(self) -> subprocess.CompletedProcess:
        # Short: Unix socket paths under it must stay below 108 characters.
        self.temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
        host = self.host or ray.util.get_node_ip_address()
        port = free_port(host)
        self.address = f"{host}:{port}"
        return subprocess.run(
            [str(RAY_CLI), "start", "--head", f"--port={port}", f"--node-ip-address={host}",
             f"--temp-dir={self.temp_dir}", f"--num-cpus={self.num_cpus}",
             f"--resources={json.dumps(self.resources)}",
             f"--system-config={json.dumps(self.system_config)}", "--disable-usage-stats",
             *self._port_args(host), *self._dashboard_args(host), *self.extra_args,
             *self.start_args()],
            env=self.env, capture_output=True, text=True, timeout=300,
        )

    def start_args(self) -> list[str]:
        """More `ray start` arguments, once temp_dir and address are known (for subclasses)."""
        return []

    @staticmethod
    def _port_args(host: str) -> list[str]:
        # Workers bind random ports (0): the default range is shared by every instance.
        return [f"--{name}={free_port(host)}" for name in (
            "node-manager-port", "object-manager-port", "ray-client-server-port",
            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
            "runtime-env-agent-port", "metrics-export-port",
        )] + ["--min-worker-port=0", "--max-worker-port=0"]

    def _dashboard_args(self, host: str) -> list[str]:
        if not self.dashboard:
            return ["--include-dashboard=false"]
        port = free_port(host)
        self.dashboard_address = f"http://{host}:{port}"
        return ["--include-dashboard=true", f"--dashboard-host={host}",
                f"--dashboard-port={port}"]

    def connect(self) -> None:
        ray.init(address=self.address, log_to_driver=False)

    def shutdown(self) -> None:
        """End this instance's processes (the driver must have called ray.shutdown())."""
        if self.temp_dir is None:
            return
        end_processes_naming(self.temp_dir)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        self.temp_dir = None


@contextmanager
def connected(head: LocalRayHead) -> Iterator[LocalRayHead]:
    """Start `head` and connect this process to it, with RAY_ADDRESS set here too for as long
    as it lasts; afterwards Serve, the connection and the instance are gone."""
    previous = os.environ.get("RAY_ADDRESS")
    try:
        os.environ["RAY_ADDRESS"] = head.start()
        head.connect()
        yield head
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            head.shutdown()
            if previous is None:
                os.environ.pop("RAY_ADDRESS", None)
            else:
                os.environ["RAY_ADDRESS"] = previous


def autoscaling_config(worker_node_types: dict[str, dict], gcs_address: str,
                       idle_timeout_s: float) -> dict:
    """A `ray up`-style config for the fake provider; the head advertises no CPUs (as in
    cluster/aws.yaml), so every actor needs a worker node."""
    return {
        "cluster_name": "spatialrl-local",
        "max_workers": sum(spec.get("max_workers", 1) for spec in worker_node_types.values()),
        "provider": {
            "type": "fake_multinode", "gcs_address": gcs_address,
            # Fake nodes share one IP: the autoscaler tells them apart by node id.
            "use_node_id_as_ip": True,
            "disable_node_updaters": True, "disable_launch_config_check": True,
        },
        "head_node_type": HEAD_NODE_TYPE,
        "available_node_types": {
            HEAD_NODE_TYPE: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **{name: {"node_config": {}, "min_workers": 0, "labels": {NODE_TYPE_LABEL: name},
                      **spec}
               for name, spec in worker_node_types.items()},
        },
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        # Keys the autoscaler reads even though fake nodes run no setup.
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


class LocalAutoscalingCluster(LocalRayHead):
    """`worker_node_types`: name -> {"resources": {...}, "max_workers": n} as in a `ray up`
    config; `resources` may hold object_store_memory (bytes) to keep each node's store small.
    The head advertises no CPUs (as in cluster/aws.yaml), so every actor needs a worker node.
    """

    def __init__(self, worker_node_types: dict[str, dict], idle_timeout_s: float = 6.0,
                 heartbeat_timeout_s: int = 10, object_store_bytes: int = 200 * 2**20):
        super().__init__(
            num_cpus=0,
            # A dead node is declared dead after 3 missed 1 s health checks (default 5 x 3 s).
            system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
            env={
                "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                # A node whose raylet stops reporting is replaced after this long (default 30 s).
                "AUTOSCALER_HEARTBEAT_TIMEOUT_S": str(heartbeat_timeout_s),
            },
            extra_args=(f"--object-store-memory={object_store_bytes}",),
        )
        self.worker_node_types = worker_node_types
        self.idle_timeout_s = idle_timeout_s

    def start_args(self) -> list[str]:
        config_path = Path(self.temp_dir) / "autoscaling.json"
        config_path.write_text(json.dumps(
            autoscaling_config(self.worker_node_types, self.address, self.idle_timeout_s)))
        return [f"--autoscaling-config={config_path}"]

    # --- nodes -------------------------------------------------------------------------

    @staticmethod
    def alive_nodes() -> list[dict]:
        return [node for node in ray.nodes() if node["Alive"]]

    @staticmethod
    def node_type(node: dict) -> str:
        return node.get("Labels", {}).get(NODE_TYPE_LABEL, HEAD_NODE_TYPE)

    def worker_counts(self) -> Counter:
        """Alive worker nodes per node type."""
        return Counter(self.node_type(n) for n in self.alive_nodes()
                       if self.node_type(n) != HEAD_NODE_TYPE)

    def nodes_of_type(self, name: str) -> list[dict]:
        return [n for n in self.alive_nodes() if self.node_type(n) == name]

    def kill_node(self, node_id: str) -> int:
        """SIGKILL a node's raylet and every process under it (its workers), as when its
        machine is lost. The workers must go too: an actor's process can otherwise answer
        direct calls for seconds after its raylet died. Returns the raylet's pid."""
        (raylet,) = [p for p in processes_naming(self.temp_dir)
                     if p.name() == "raylet" and f"--node_id={node_id}" in p.cmdline()]
        for process in [*raylet.children(recursive=True), raylet]:
            with suppress(psutil.NoSuchProcess):
                process.send_signal(signal.SIGKILL)
        return raylet.pid

    def wait_until_only_the_head_is_left(self, timeout_s: float) -> float:
        """Wait for the autoscaler to remove every worker node as idle; on a timeout, the
        error says what each node still holds."""
        try:
            return self.wait_for(lambda: not self.worker_counts(), timeout_s, "idle nodes removed")
        except TimeoutError as err:
            raise TimeoutError(f"{err}; nodes still up: {self.node_usage()}") from None

    def node_usage(self) -> list[dict]:
        """The autoscaler's view of each node: its type, status and the resources in use."""
        status = get_cluster_status(self.address)
        return [{"type": node.ray_node_type_name, "status": node.node_status,
                 "in_use": {u.resource_name: u.used for u in node.resource_usage.usage if u.used}}
                for node in status.active_nodes + status.idle_nodes]

    @staticmethod
    def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> float:
        """Poll until condition() holds; returns the seconds it took."""
        start = time.monotonic()
        while not condition():
            if time.monotonic() - start > timeout_s:
                raise TimeoutError(f"{what}: not after {timeout_s:g} s")
            time.sleep(0.5)
        return time.monotonic() - start
