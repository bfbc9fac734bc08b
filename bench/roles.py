"""CPU seconds by role on this machine: what a benchmark's images cost, told apart from Ray's fixed cost."""

import os


def cpu_seconds_by_role() -> dict[int, tuple[str, float]]:
    """pid -> (role, user+system CPU seconds) of every process that serves a run: this driver, Ray's data and
    train workers and model actors, Ray's services, the S3 server."""
    import psutil

    out = {}
    for p in psutil.process_iter(["name", "cmdline", "cpu_times"]):
        name, cmd, t = p.info["name"] or "", " ".join(p.info["cmdline"] or []), p.info["cpu_times"]
        if t is None:
            continue
        if p.pid == os.getpid():
            role = "driver"
        elif "weed" in name:
            role = "S3 server"
        elif name.startswith("ray::") and any(
            k in name for k in ("RayTrainWorker", "Predictor", "MapWorker", "_MapWorker")
        ):
            role = "model (train workers / actors)"
        elif name.startswith("ray::") and not any(
            k in name for k in ("Actor", "Dashboard", "Controller", "Coordinator", "Manager", "Watcher", "Stats")
        ):
            role = "data tasks"  # ray::IDLE between tasks, ray::ReadBinary->MapBatches(...) during them
        elif (
            name.startswith("ray::") or "raylet" in name or "gcs_server" in name or "ray/" in cmd or "dashboard" in cmd
        ):
            role = "Ray services"
        else:
            continue
        out[p.pid] = (role, t.user + t.system)
    return out


class RoleClock:
    """CPU seconds per role between start() and stop(). Sampled twice a second, so processes that start and
    exit in between (Ray Train's workers, data tasks' workers) count with their last sample."""

    def start(self, every_s: float = 0.5):
        import threading

        self.t0 = cpu_seconds_by_role()
        self.last = dict(self.t0)
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(every_s):
                self.last.update(cpu_seconds_by_role())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.last.update(cpu_seconds_by_role())
        out: dict[str, float] = {}
        for pid, (role, seconds) in self.last.items():
            out[role] = out.get(role, 0.0) + seconds - self.t0.get(pid, (role, 0.0))[1]
        return out


def per_image(cpu: dict[str, float], images: int) -> str:
    return ", ".join(f"{k} {v / max(images, 1) * 1000:.2f}" for k, v in sorted(cpu.items())) + " ms CPU per image"
