"""One writer per output prefix: a lease object taken with a conditional write and renewed while the run
makes progress.

    {output}/_lease.json   {"run_id", "holder", "token", "generation", "acquired_at", "renewed_at",
                            "expires_at", "ttl_s", "released"}

Taken with If-None-Match: * the first time and If-Match on the tag read after that (O_EXCL / a
compare-and-swap under flock for local folders), so of two runs started together exactly one gets it.
`generation` grows by one at every take-over: it is the fencing token. The intent, the `_SUCCESS` record
and the ledger of a run carry it, and the holder confirms it with a compare-and-swap on the lease
(`fence()`) right before its point of no return and after each irreversible stage; a holder that was
paused (SIGSTOP, a long GC, a partition) and superseded finds out there and stops, undoing its own
intent. `token` is this holder's own: a retried PUT whose first attempt landed gets 412, and finding
our token in the object tells that it was ours.

Renewed every ttl/3 only while the run makes progress (`progress()` changes within `stall_s`) and for
at most `max_run_s`: a hung holder stops renewing, is interrupted (`on_lost`), and the next run takes
over after one TTL. Release writes `released: true` (keeping the generation).

Expiry is judged by observation, never by comparing clocks: a run that finds the lease held watches the
object on its own monotonic clock. If it changes (a renewal, a release, another taker) its holder is
alive and this run touches nothing and exits with EXIT_LEASE_HELD, which a scheduler can tell apart from
a failure; if it stays unchanged for one TTL (the longer of the holder's and ours) the holder has stopped,
and it is taken over with a compare-and-swap on what was watched. A holder stops writing 2/3 TTL after
its last renewal on its own monotonic clock, so the two never overlap whatever the wall clocks say; the
`expires_at` in the object is for people. A run that meets a live holder waits up to one renewal period
(ttl/3) to see it renew; one that meets a crashed holder waits one TTL and goes on.

The generation only grows: when the object is gone (an operator deleted a stuck lease) or unreadable,
the next one continues from `floor()`, the greatest generation the output's own records carry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable

from pipeline.core import conditional, storage
from pipeline.core.exits import EXIT_TEMPFAIL
from pipeline.core.signals import interrupt_main

log = logging.getLogger(__name__)
LEASE = "_lease.json"
EXIT_LEASE_HELD = EXIT_TEMPFAIL  # 75, sysexits EX_TEMPFAIL: "try again later", not a failure


class LeaseHeld(RuntimeError):
    """Another run holds the output's lease; nothing was written."""

    exit_code = EXIT_LEASE_HELD

    def __init__(self, output: str, holder: dict, watched_s: float = 0.0):
        self.holder = holder
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_number(holder.get("expires_at"))))
        super().__init__(
            f"another run holds the lease on {output}: run {holder.get('run_id')!r} on "
            f"{holder.get('holder')!r} changed it while this run watched ({watched_s:.0f} s), so it is alive "
            f"(it says it expires at {expires}, by its own clock, unless renewed). "
            f"This run wrote nothing; the next scheduled run will try again"
        )


def _number(value, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


class LeaseLost(RuntimeError):
    """The lease is no longer certainly ours: another run may own the output now. Nothing more is written."""

    exit_code = EXIT_LEASE_HELD  # the job raises PartialCommit instead once its intent is written


class Lease:
    """Context manager: `with Lease(output, run_id, ttl_s=600): ...` holds the output for the block.

    progress: a callable whose value changes while the run makes progress (None: any time is progress);
    stall_s: stop renewing after this long without a change; max_run_s: stop renewing after this long in
    all; on_lost: called from the renewal thread, outside its lock, when the lease is lost or given up
    (`closing` is set once the run has begun to release it: a callback may wait on it)."""

    def __init__(
        self,
        output: str,
        run_id: str,
        ttl_s: float = 600.0,
        *,
        max_run_s: float | None = None,
        stall_s: float | None = None,
        progress: Callable[[], object] | None = None,
        on_lost: Callable[[], None] | None = None,
        floor: Callable[[], int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if ttl_s < 3:
            raise ValueError(f"lease ttl_s must be at least 3 seconds, got {ttl_s}")
        self.output = storage.parse_uri(output)
        self.uri = self.output.join(LEASE).uri
        self.run_id, self.ttl_s = run_id, ttl_s
        self.max_run_s, self.stall_s, self.progress, self.on_lost = max_run_s, stall_s, progress, on_lost
        self.floor = floor or (lambda: 0)  # the greatest generation the output's records carry
        self._clock, self._sleep = clock, sleep  # for watching another holder's lease (injected in tests)
        self.token = uuid.uuid4().hex
        self.generation = 0
        self.tag: str | None = None
        self.renewed_at = 0.0  # local monotonic time at which the last successful write was sent
        self.renewals = 0
        self._lost: str | None = None
        self.closing = threading.Event()  # release() has begun: a loss found now interrupts nobody
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # ---- the object ----------------------------------------------------------------------------
    def _body(self, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps(
            {
                "run_id": self.run_id,
                "holder": f"{socket.gethostname()}:{os.getpid()}",
                "token": self.token,
                "generation": self.generation,
                "acquired_at": self.acquired_at,
                "renewed_at": now,
                "expires_at": 0 if released else now + self.ttl_s,
                "ttl_s": self.ttl_s,
                "released": released,
            }
        ).encode()

    def _read(self) -> tuple[dict, str] | None:
        current = conditional.read_with_tag(self.uri)
        if current is None:
            return None
        try:
            body = json.loads(current[0])
            if isinstance(body, dict) and isinstance(body.get("generation", 0), int):
                return body, current[1]
        except ValueError:
            pass
        return {"run_id": "(unreadable lease)", "unreadable": True}, current[1]

    def _ours(self) -> str | None:
        """The object's tag if it is our own last write (a retried request that did land), else None."""
        current = self._read()
        if current and current[0].get("token") == self.token and current[0].get("generation") == self.generation:
            return current[1]
        return None

    # ---- taking, keeping, giving back ----------------------------------------------------------
    def acquire(self) -> Lease:
        """Take the lease, or raise LeaseHeld (naming the holder) once it was seen to change."""
        self.acquired_at, self._started = time.time(), time.monotonic()
        watched: tuple[str, float] | None = None  # (the holder's tag, our clock when we first read it)
        while True:
            started = time.monotonic()
            current = self._read()
            if current is None:
                self.generation, cond = self.floor() + 1, {"if_absent": True}
            else:
                holder, tag = current
                if watched and watched[0] != tag:  # renewed, released or taken while we watched
                    raise LeaseHeld(self.output.uri, holder, self._clock() - watched[1])
                if holder.get("unreadable"):
                    log.warning("the lease on %s is not one of ours (unreadable): replacing it", self.output.uri)
                    self.generation = self.floor() + 1
                elif not holder.get("released"):
                    watched = watched or (tag, self._clock())
                    ttl = max(self.ttl_s, _number(holder.get("ttl_s"), self.ttl_s))
                    waited = self._clock() - watched[1]
                    if waited < ttl:
                        self._sleep(min(max(ttl / 12, 0.05), 10.0, ttl - waited))
                        continue
                    log.warning(
                        "taking over the lease of run %s on %s: unchanged for %.0f s (its TTL is %.0f s)",
                        holder.get("run_id"),
                        self.output.uri,
                        waited,
                        ttl,
                    )
                    self.generation = int(holder.get("generation") or 0) + 1
                else:
                    self.generation = int(holder.get("generation") or 0) + 1
                cond = {"if_match": tag}
            try:
                self.tag = conditional.write_conditional(self.uri, self._body(), **cond)
                break
            except conditional.PreconditionFailed:
                self.tag = self._ours()  # our PUT landed and its retry was refused: it is ours
                if self.tag:
                    break
                current = self._read()  # another run wrote it between our read and our write: it is alive
                raise LeaseHeld(self.output.uri, current[0] if current else {"run_id": "(unknown)"}) from None
        self.renewed_at = started
        self._progress_seen, self._progress_at = self._progress_value(), time.monotonic()
        self._thread = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        """One compare-and-swap of the lease; sets `_lost` when another run changed it."""
        started = time.monotonic()
        with self._lock:
            if self._lost:
                return
            try:
                self.tag = conditional.write_conditional(self.uri, self._body(), if_match=self.tag)
            except conditional.PreconditionFailed:
                tag = self._ours()
                if tag is None:
                    self._lose("the lease object was changed by another run")
                    return
                self.tag = tag
            self.renewed_at = started
            self.renewals += 1

    def _progress_value(self):
        if self.progress is None:
            return None
        try:
            return self.progress()
        except Exception as e:  # noqa: BLE001 - an unreadable progress is no progress
            log.debug("progress probe failed: %s", e)
            return self._progress_seen if hasattr(self, "_progress_seen") else None

    def _give_up_reason(self) -> str | None:
        now = time.monotonic()
        if self.max_run_s and now - self._started > self.max_run_s:
            return f"the run held the output for more than --max-run-s {self.max_run_s:.0f} s"
        if self.progress is not None and self.stall_s:
            value = self._progress_value()
            if value != self._progress_seen:
                self._progress_seen, self._progress_at = value, now
            elif now - self._progress_at > self.stall_s:
                return f"no progress for {now - self._progress_at:.0f} s (--stall-s {self.stall_s:.0f})"
        return None

    def _lose(self, why: str) -> None:
        self._lost = why
        log.error("lease on %s: %s; run %s stops", self.output.uri, why, self.run_id)

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            reason = self._give_up_reason()
            if reason:
                self._lose(reason)
            else:
                try:
                    self._renew()
                except storage.StorageError as e:  # transient: keep trying until the TTL runs out
                    log.warning("could not renew the lease on %s (will retry): %s", self.output.uri, e)
            if self._lost:
                if self.on_lost and not self.closing.is_set():
                    self.on_lost()
                return

    @property
    def lost(self) -> str | None:
        return self._lost

    def check(self) -> None:
        """Raise LeaseLost unless the lease is certainly still ours (no request: call it often)."""
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

    def fence(self) -> None:
        """Confirm the fencing token with the store itself (a compare-and-swap that also renews): after it,
        the lease is ours for a full TTL. Raises LeaseLost when another run has taken it."""
        self.check()
        try:
            self._renew()
        except storage.StorageError as e:
            raise LeaseLost(f"cannot confirm the lease on {self.output.uri}: {e}") from None
        self.check()

    def release(self) -> None:
        """Mark the lease released (the next run takes it at once); never touches another run's lease."""
        self.closing.set()
        self._stop.set()
        if self._thread and self._thread is not threading.current_thread():
            self._thread.join()
        if self.tag is None:
            return
        try:
            with self._lock:
                conditional.write_conditional(self.uri, self._body(released=True), if_match=self.tag)
        except conditional.PreconditionFailed:
            if not self._ours():
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


class NoLease:
    """--unsafe-no-lease: the lease's interface, holding nothing. Its generation continues the output's."""

    lost = None

    def __init__(self, floor: Callable[[], int] | None = None):
        self.floor, self.generation = floor or (lambda: 0), 0

    def __enter__(self):
        self.generation = self.floor() + 1
        return self

    def __exit__(self, *exc):
        pass

    def check(self):
        pass

    def fence(self):
        pass


def output_lease(
    output: str,
    run_id: str,
    ttl_s: float,
    *,
    unsafe_no_lease: bool = False,
    max_run_s: float | None = None,
    stall_s: float | None = None,
    progress: Callable[[], object] | None = None,
    floor: Callable[[], int] | None = None,
) -> Lease | NoLease:
    """A job's lease on `output`, after the store showed it honours conditional writes. Renewed while the
    run makes progress (`progress()` changes); when it is lost or given up the main thread is interrupted
    and the run stops. `floor()`: the greatest generation the output's records carry."""
    if unsafe_no_lease:
        log.warning("--unsafe-no-lease: writing %s without a lease; a second run at the same time corrupts it", output)
        return NoLease(floor)
    conditional.probe(output, run_id)
    lease = Lease(output, run_id, ttl_s, max_run_s=max_run_s, stall_s=stall_s, progress=progress, floor=floor)
    lease.on_lost = lambda: interrupt_main(unwound=lease.closing)
    return lease
