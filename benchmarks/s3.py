"""A moto S3 server on 127.0.0.1 for the storage benchmarks, started and stopped by the harness."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

START_TIMEOUT_S = 30.0
SERVER_NICENESS = 19
# Size above which moto moves an object from memory to a temporary file (its default is about 5 MiB).
# At 8 GiB a 90 MB checkpoint push cost the server 0.52 to 0.57 s of CPU, against 0.62 to 1.01 s
# through files. The default benchmarks store under 2 GB (estimate: 3 checkpoints per round, photos twice).
SERVER_OBJECT_BUFFER_BYTES = 8 * 1024**3
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # ignores *_proxy variables


def s3_environment(endpoint: str) -> dict[str, str]:
    """Return the variables that point boto3 and the AWS CLI at `endpoint` with fake credentials.

    Instance metadata lookups are off and shared config files are ignored, so nothing but the
    loopback server is contacted.
    """
    return {
        "AWS_ACCESS_KEY_ID": "benchmark",
        "AWS_SECRET_ACCESS_KEY": "benchmark",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_CONFIG_FILE": os.devnull,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


class MotoServer:
    """`python -m moto.server` on a free loopback port; use as a context manager."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.endpoint = ""

    def __enter__(self) -> "MotoServer":
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        # It keeps objects in memory, because a remote service's disks are not the training machine's.
        environment = {**os.environ, "MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(SERVER_OBJECT_BUFFER_BYTES)}
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
        # The server starts at normal priority, because at the lowest one it took over 30 s to start
        # while other processes kept both cores busy.
        self._wait_until_answering()
        _lower_priority(self.process.pid)
        return self

    def __exit__(self, *exc_info) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _wait_until_answering(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.process.returncode} before responding")
            try:
                with _DIRECT_OPENER.open(self.endpoint + "/", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP status means the server is up
            except OSError:
                time.sleep(0.1)  # poll interval while the server starts
        raise RuntimeError(f"moto server did not respond at {self.endpoint} within {START_TIMEOUT_S} s")


def _lower_priority(pid: int) -> None:
    """Move every thread of process `pid` to nice 19 and, on Linux, to SCHED_IDLE.

    The server replaces a remote S3 service, so its CPU time is not the training job's. Under
    SCHED_IDLE it runs only on CPU time that other processes leave idle. Threads it starts later
    inherit the policy and niceness of the thread that starts them.
    """
    task_folder = f"/proc/{pid}/task"
    thread_ids = [int(name) for name in os.listdir(task_folder)] if os.path.isdir(task_folder) else [pid]
    for thread_id in thread_ids:
        try:
            os.setpriority(os.PRIO_PROCESS, thread_id, SERVER_NICENESS)
            if hasattr(os, "SCHED_IDLE"):
                os.sched_setscheduler(thread_id, os.SCHED_IDLE, os.sched_param(0))
        except ProcessLookupError:
            continue  # a request thread, such as the start-up probe's, ended after the listing


def create_bucket(endpoint: str, name: str) -> None:
    import boto3

    environment = s3_environment(endpoint)
    client = boto3.client("s3", endpoint_url=endpoint, region_name=environment["AWS_DEFAULT_REGION"],
                          aws_access_key_id=environment["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=environment["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=name)
