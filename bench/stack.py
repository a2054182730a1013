"""A throwaway cxr stack on 127.0.0.1 (redis-server, Celery worker(s), gunicorn) for benchmarks.

:func:`run_stack` builds an untrained model in a subprocess (the calling process never imports
TensorFlow), starts every server in its own process group and stops them all on exit, also on
Ctrl-C or an exception. The model registry can be made beforehand with :func:`make_model` and
shared by several stacks.

    .venv/bin/python -m bench.stack --make-model --kind standin --input-size 224 --model-dir DIR
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import redis
import requests

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["NORMAL", "PNEUMONIA"]

ModelKind = Literal["vgg16", "standin"]
Pool = Literal["threads", "prefork"]
MODEL_KINDS: tuple[ModelKind, ...] = ("vgg16", "standin")
CLK_TCK = os.sysconf("SC_CLK_TCK")
GUNICORN_CONF = ROOT / "web" / "gunicorn_conf.py"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(check: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``check()`` until true or raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, requests.RequestException, ValueError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{what} not up after {timeout} s")


# --- /proc helpers (Linux; no psutil) -------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    """Parent pid -> child pids of every process visible in /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(pids: list[int]) -> list[int]:
    """``pids`` and all their live descendants."""
    children = _children_map()
    out: list[int] = []
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid in out or not Path(f"/proc/{pid}").exists():
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # After the command name: state(0) ppid(1) ... utime(11) stime(12).
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process in MiB; empty when it is gone."""
    out: dict[str, float] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)  # the value is in kB
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all cores have spent not idle since boot (from /proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest time is already counted in user/nice.
    return (sum(values[:8]) - idle) / CLK_TCK


# --- the model ------------------------------------------------------------------------------


def build_model_version(kind: ModelKind, input_size: int, model_dir: Path, seed: int = 0) -> None:
    """Save an untrained ``kind`` model as version 1 of ``model_dir`` and make it active.

    Imports TensorFlow: run it in a subprocess (:func:`make_model`) from benchmark parents.
    """
    import keras

    from ml.model import build_classifier, build_standin_classifier
    from ml.versions import save_version, write_active_file

    keras.utils.set_random_seed(seed)
    if kind == "vgg16":
        model = build_classifier(CLASSES, input_size=input_size, base_weights=None)
    else:
        model = build_standin_classifier(CLASSES, input_size=input_size)
    metadata = save_version(
        model,
        model_dir,
        class_names=CLASSES,
        base_weights=None,
        extra={"trained": False, "note": f"untrained {kind} for bench/"},
    )
    write_active_file(model_dir, metadata.version)


def make_model(kind: ModelKind, input_size: int, model_dir: Path) -> None:
    """Write an untrained model registry (version 1, active) in a TensorFlow subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.stack", "--make-model", "--kind", kind,
         "--input-size", str(input_size), "--model-dir", str(model_dir)],
        cwd=ROOT, capture_output=True, text=True,
        env=os.environ | {"TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"building the {kind} model failed:\n{proc.stderr[-3000:]}")


# --- the stack ------------------------------------------------------------------------------


@dataclass
class Stack:
    """URLs, folders and processes of a running stack."""

    web_url: str
    redis_url: str
    model_dir: Path
    workdir: Path
    settings: dict[str, object] = field(default_factory=dict)
    redis_pid: int = 0
    web_pid: int = 0  # the gunicorn master
    worker_pids: list[int] = field(default_factory=list)  # one per `celery worker` command
    # Memory of every inference worker process (commands and their pool children) once serving.
    worker_memory: list[dict[str, Any]] = field(default_factory=list)

    def component_pids(self) -> dict[str, list[int]]:
        """Live pids of each component, children included."""
        return {
            "web": process_tree([self.web_pid]),
            "worker": process_tree(self.worker_pids),
            "redis": process_tree([self.redis_pid]),
        }

    def inference_processes(self) -> list[tuple[int, str]]:
        """Every process that runs inference tasks: ``(pid, "worker" | "pool-child")``."""
        procs: list[tuple[int, str]] = []
        children = _children_map()
        for pid in self.worker_pids:
            procs.append((pid, "worker"))
            procs.extend((c, "pool-child") for c in process_tree(children.get(pid, [])))
        return procs

    def read_worker_memory(self) -> list[dict[str, Any]]:
        """VmRSS / VmHWM (MiB) of each inference worker process right now."""
        out: list[dict[str, Any]] = []
        for pid, role in self.inference_processes():
            out.append({"pid": pid, "role": role, **memory_mb(pid)})
        return out

    def cpu_by_component(self) -> dict[str, float]:
        """CPU seconds used so far by each component's live processes."""
        return {
            name: sum(cpu_seconds(p) for p in pids) for name, pids in self.component_pids().items()
        }


def _log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _stop(procs: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM every process group, wait up to ``grace`` s in all, then SIGKILL what is left."""
    for proc in reversed(procs):
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in reversed(procs):
        with suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.1, deadline - time.monotonic()))
        # Also whatever the leader left behind in its group (e.g. prefork children).
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def run_stack(
    input_size: int,
    worker_concurrency: int = 1,
    web_workers: int = 2,
    *,
    model_kind: ModelKind = "vgg16",
    model_dir: Path | None = None,
    worker_processes: int = 1,
    pool: Pool = "prefork",
    batch_max_size: int = 16,
    batch_max_delay_ms: float = 5.0,
    web_threads: int = 4,
    ready_timeout: float = 180.0,
    precision: str = "auto",
    explain: bool = True,
) -> Iterator[Stack]:
    """Serve an untrained model of ``input_size`` px on 127.0.0.1; stop everything on exit.

    Args:
        input_size: Model input side in px.
        worker_concurrency: ``--concurrency`` of each inference worker command (pool processes
            for prefork, task threads sharing one model and batcher for threads).
        web_workers: gunicorn worker processes (gthread worker class).
        model_kind: ``"vgg16"`` (VGG16 base, random weights) or ``"standin"`` (pooling + dense).
        model_dir: An existing registry with an active version to serve (e.g. from
            :func:`make_model`); by default one is built in the stack's temporary folder.
        precision: ``CXR_PRECISION`` of the workers (``auto``: what the hardware runs fastest).
        worker_processes: Separate ``celery worker`` commands, each its own process (group).
        pool: Celery pool of each worker command.
        batch_max_size: ``CXR_BATCH_MAX_SIZE`` (1 turns dynamic batching off).
        batch_max_delay_ms: ``CXR_BATCH_MAX_DELAY_MS``.
        explain: ``CXR_EXPLAIN`` (Grad-CAM maps of every prediction; the service's default).
        web_threads: gunicorn threads per web worker; a long-polling status request holds one,
            so give at least as many as concurrent clients.
        ready_timeout: Seconds to wait for every worker process to serve.
    """
    workdir = Path(tempfile.mkdtemp(prefix="cxr-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    logs = []
    try:
        if model_dir is None:
            model_dir = workdir / "models"
            make_model(model_kind, input_size, model_dir)
        rport, wport = free_port(), free_port()
        redis_url = f"redis://127.0.0.1:{rport}/0"

        def start(name: str, cmd: list[str], env: dict[str, str] | None = None) -> int:
            if env is not None:
                # Metrics files of this component stay in the stack's folder (removed on exit).
                metrics_dir = workdir / f"metrics-{name}"
                metrics_dir.mkdir()
                env = env | {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
            log = (workdir / f"{name}.log").open("wb")
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
            )
            return procs[-1].pid

        redis_pid = start(
            "redis",
            ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(workdir)],
        )  # fmt: skip
        wait_until(lambda: redis.Redis.from_url(redis_url).ping(), 10, "redis-server")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env |= {
            "CXR_REDIS_URL": redis_url,
            "CXR_MODEL_DIR": str(model_dir),
            "CXR_WORKER_HEARTBEAT_SECONDS": "1",
            "CXR_WORKER_CONCURRENCY": str(worker_concurrency),
            "CXR_BATCH_MAX_SIZE": str(batch_max_size),
            "CXR_BATCH_MAX_DELAY_MS": str(batch_max_delay_ms),
            # The load comes from one address at hundreds of requests per second: no per-client
            # limit and no queue bound, so the stack's own capacity is what is measured.
            "CXR_RATE_LIMIT_UPLOADS": "",
            "CXR_RATE_LIMIT_STATUS": "",
            "CXR_MAX_QUEUED_PREDICTIONS": "0",
            "CXR_PRECISION": precision,
            "CXR_EXPLAIN": "1" if explain else "0",
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        worker_pids = []
        for i in range(worker_processes):
            cmd = [sys.executable, "-m", "celery", "--app", "worker.celery_app", "worker",
                   "--queues", "inference", "--pool", pool,
                   "--concurrency", str(worker_concurrency), "--hostname", f"bench{i}@%h",
                   "--without-gossip", "--without-mingle", "--without-heartbeat",
                   "--loglevel", "WARNING"]  # fmt: skip
            # Each worker command serves its Prometheus metrics on a port of its own.
            metrics = {
                "CXR_WORKER_METRICS_PORT": str(free_port()),
                "CXR_WORKER_METRICS_ADDR": "127.0.0.1",
            }
            worker_pids.append(start(f"worker{i}", cmd, env | metrics))
        # The deployed gunicorn settings (web/gunicorn_conf.py) when present; flags override them.
        conf = ["--config", "python:web.gunicorn_conf"] if GUNICORN_CONF.is_file() else []
        web_pid = start(
            "web",
            [sys.executable, "-m", "gunicorn", *conf, "--bind", f"127.0.0.1:{wport}",
             "--workers", str(web_workers), "--worker-class", "gthread",
             "--threads", str(web_threads), "--log-level", "warning", "web:create_app()"],
            env,
        )  # fmt: skip
        web_url = f"http://127.0.0.1:{wport}"
        # A prefork worker command reports one heartbeat per pool process, threads one per command.
        expected = worker_processes * (worker_concurrency if pool == "prefork" else 1)

        def serving() -> bool:
            for proc in procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
            doc = requests.get(f"{web_url}/readyz", timeout=2).json()
            states = [w["state"] for w in doc["workers"]]
            return len(states) == expected and set(states) == {"serving"}

        try:
            wait_until(serving, ready_timeout, f"{expected} serving worker process(es)")
        except (TimeoutError, RuntimeError) as exc:
            tails = "\n".join(
                f"--- {p.name}\n{_log_tail(p)}" for p in sorted(workdir.glob("*.log"))
            )
            raise RuntimeError(f"the stack did not come up: {exc}\n{tails}") from exc
        stack = Stack(
            web_url=web_url,
            redis_url=redis_url,
            model_dir=model_dir,
            workdir=workdir,
            settings={
                "model_kind": model_kind,
                "input_size": input_size,
                "worker_processes": worker_processes,
                "pool": pool,
                "worker_concurrency": worker_concurrency,
                "batch_max_size": batch_max_size,
                "batch_max_delay_ms": batch_max_delay_ms,
                "explain": explain,
                "web_workers": web_workers,
                "web_threads": web_threads,
                "web_worker_class": "gthread",
                "gunicorn_config": conf[1] if conf else None,
            },
            redis_pid=redis_pid,
            web_pid=web_pid,
            worker_pids=worker_pids,
        )
        stack.worker_memory = stack.read_worker_memory()
        yield stack
    finally:
        _stop(procs)
        for log in logs:
            log.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> None:
    """``--make-model``: write an untrained model registry (used by :func:`make_model`)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--make-model", action="store_true", required=True)
    parser.add_argument("--kind", choices=MODEL_KINDS, default="vgg16")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--model-dir", type=Path, required=True)
    args = parser.parse_args()
    build_model_version(args.kind, args.input_size, args.model_dir)


if __name__ == "__main__":
    main()
