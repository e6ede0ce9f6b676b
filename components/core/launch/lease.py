"""`<output>/_LEASE.json`: the one writer of an output. A launcher of another job (another run pointed at the same
output) is refused while the lease is fresh or its job still exists, before it writes anything there; the holder
renews it while it waits and removes it at the end."""
from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Callable

from kubellama.components.core.errors import KubellamaError
from kubellama.components.core.io import storage

LEASE = "_LEASE.json"
# A lease not renewed for this long is stale (its launcher is gone) unless its job still exists.
LEASE_TTL_S = 300
# Between writing the lease and reading it back: a launcher that wrote within this window of another loses.
LEASE_SETTLE_S = 1.0


class Refused(KubellamaError):
    """Another writer holds the output, or the job's name under another spec: this launcher started and wrote
    nothing, and what is in the output (config, report) belongs to that other writer."""


class Lease:
    """`<output>/_LEASE.json`: which job writes this output. One per output; see the module docstring."""

    def __init__(self, output: str, job: dict, stage: str) -> None:
        meta = job["metadata"]
        self.url = storage.join(output, LEASE)
        self.output, self.stage = output, stage
        self.record = {"job": meta["name"], "namespace": meta["namespace"], "apiVersion": job["apiVersion"],
                       "kind": job["kind"], "holder": os.environ.get("KFP_POD_NAME") or socket.gethostname(),
                       "nonce": uuid.uuid4().hex}
        self.renewed = 0.0

    def _read(self) -> dict | None:
        try:
            return storage.read_json(self.url)
        except FileNotFoundError:
            return None
        except (ValueError, KubellamaError):
            return None  # a torn or foreign file holds nothing

    def _write(self) -> None:
        self.renewed = time.time()
        storage.write_json(self.url, {**self.record, "renewed": self.renewed})

    def _refuse(self, other: dict) -> Refused:
        age = int(time.time() - float(other.get("renewed", 0)))
        return Refused(
            f"{self.output} is being written by {other.get('kind')} {other.get('namespace')}/{other.get('job')} "
            f"(lease {self.url}, renewed {age}s ago by {other.get('holder')}): one writer per output; wait for it to "
            f"end, or delete that job, or write elsewhere (another run.id or {self.stage}.output)")

    def acquire(self, alive: Callable[[dict], bool]) -> None:
        """Take the lease, or raise naming the job that holds it. `alive(record)` says whether that job exists."""
        other = self._read()
        if other and other.get("job") != self.record["job"]:
            fresh = time.time() - float(other.get("renewed", 0)) < LEASE_TTL_S
            if fresh or alive(other):
                raise self._refuse(other)
        self._write()
        time.sleep(LEASE_SETTLE_S)
        now = self._read()
        if now and now.get("nonce") != self.record["nonce"] and now.get("job") != self.record["job"]:
            raise self._refuse(now)

    def renew(self) -> None:
        if time.time() - self.renewed > LEASE_TTL_S / 4:
            self._write()

    def release(self) -> None:
        now = self._read()
        if now and now.get("job") == self.record["job"]:
            storage.remove(self.url)
