"""One writer per output prefix: a lease object taken with a conditional write and renewed while the run lives.

    {output}/_lease.json   {"run_id", "holder", "acquired_at", "renewed_at", "expires_at", "ttl_s"}

Taken with If-None-Match: * (O_EXCL for local folders), so of two runs started together exactly one
gets it. Renewed every ttl/3 with If-Match on the tag the holder last wrote; a crashed holder stops
renewing, and the next run may take the lease over once `expires_at` has passed (again with
If-Match, so two successors cannot both take it). A run that finds a live lease touches nothing and
exits with EXIT_LEASE_HELD, which a scheduler can tell apart from a failure.
Expiry compares wall clocks: keep the nodes' clocks in sync (NTP), and the TTL well above any skew.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from pipeline.core import conditional, storage
from pipeline.core.exits import EXIT_TEMPFAIL

log = logging.getLogger(__name__)
LEASE = "_lease.json"
EXIT_LEASE_HELD = EXIT_TEMPFAIL  # 75, sysexits EX_TEMPFAIL: "try again later", not a failure


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease; nothing was written."""

    exit_code = EXIT_LEASE_HELD

    def __init__(self, output: str, holder: dict):
        self.holder = holder
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(holder.get("expires_at", 0)))
        super().__init__(
            f"another run holds the lease on {output}: run {holder.get('run_id')!r} on "
            f"{holder.get('holder')!r}, lease expires at {expires} unless renewed. "
            f"This run wrote nothing; the next scheduled run will try again"
        )


class LeaseLost(RuntimeError):
    """The lease could not be renewed in time: another run may own the output now."""


class Lease:
    """Context manager: `with Lease(output, run_id, ttl_s=600): ...` holds the output for the block."""

    def __init__(self, output: str, run_id: str, ttl_s: float = 600.0):
        if ttl_s < 3:
            raise ValueError(f"lease ttl_s must be at least 3 seconds, got {ttl_s}")
        self.output = storage.parse_uri(output)
        self.uri = self.output.join(LEASE).uri
        self.run_id, self.ttl_s = run_id, ttl_s
        self.tag: str | None = None
        self.renewed_at = 0.0  # local monotonic time of the last successful write
        self.renewals = 0
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _body(self, acquired_at: float) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "run_id": self.run_id,
                "holder": f"{socket.gethostname()}:{os.getpid()}",
                "acquired_at": acquired_at,
                "renewed_at": now,
                "expires_at": now + self.ttl_s,
                "ttl_s": self.ttl_s,
            }
        ).encode()

    def acquire(self) -> Lease:
        """Take the lease or raise LeaseHeld (naming the holder and its expiry)."""
        self.acquired_at = time.time()
        for _ in range(3):  # the holder may release or renew between our two requests
            started = time.monotonic()
            try:
                self.tag = conditional.write_conditional(self.uri, self._body(self.acquired_at), if_absent=True)
                break
            except conditional.PreconditionFailed:
                pass
            current = conditional.read_with_tag(self.uri)
            if current is None:
                continue
            data, tag = current
            try:
                holder = json.loads(data)
            except ValueError:
                holder = {"run_id": "(unreadable lease)", "expires_at": 0}
            if holder.get("expires_at", 0) > time.time():
                raise LeaseHeld(self.output.uri, holder)
            log.warning(
                "taking over the expired lease of run %s on %s (it expired at %s)",
                holder.get("run_id"),
                self.output.uri,
                time.strftime("%H:%M:%SZ", time.gmtime(holder.get("expires_at", 0))),
            )
            try:
                self.tag = conditional.write_conditional(self.uri, self._body(self.acquired_at), if_match=tag)
                break
            except conditional.PreconditionFailed:
                continue  # another successor won: read it again
        else:
            current = conditional.read_with_tag(self.uri)
            raise LeaseHeld(self.output.uri, json.loads(current[0]) if current else {"run_id": "(unknown)"})
        self.renewed_at = started
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            started = time.monotonic()
            try:
                with self._lock:
                    self.tag = conditional.write_conditional(self.uri, self._body(self.acquired_at), if_match=self.tag)
                self.renewed_at = started
                self.renewals += 1
            except conditional.PreconditionFailed:
                self._lost = "the lease object was changed by another run"
                log.error("lost the lease on %s: %s", self.output.uri, self._lost)
                return
            except storage.StorageError as e:  # transient: keep trying until the TTL runs out
                log.warning("could not renew the lease on %s (will retry): %s", self.output.uri, e)

    def check(self) -> None:
        """Raise LeaseLost unless the lease is certainly still ours (call before each irreversible step)."""
        if self._lost:
            raise LeaseLost(
                f"lost the lease on {self.output.uri}: {self._lost}; nothing more is written by run {self.run_id}"
            )
        # A margin of one renewal period: the TTL counts from before our last successful write.
        if time.monotonic() - self.renewed_at > self.ttl_s * 2 / 3:
            raise LeaseLost(
                f"the lease on {self.output.uri} was not renewed for {time.monotonic() - self.renewed_at:.0f} s "
                f"(TTL {self.ttl_s:.0f} s): another run may own the output; stopping run {self.run_id}"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        if self._lost or self.tag is None:
            return
        try:
            with self._lock:
                conditional.delete_conditional(self.uri, self.tag)
        except conditional.PreconditionFailed:
            log.warning("the lease on %s was taken over before release", self.output.uri)
        except storage.StorageError as e:  # it expires by itself
            log.warning(
                "could not release the lease on %s (it expires within %.0f s): %s", self.output.uri, self.ttl_s, e
            )
        self.tag = None

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
