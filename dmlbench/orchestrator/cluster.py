"""Ray connection: start locally (dashboard on localhost) or join ``--address``; resource checks."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlparse

from dmlbench.errors import ConfigError, DmlbenchError
from dmlbench.orchestrator.spec import SweepSpec


def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of an address (``ray://h:10001``, ``http://h:8265``, ``h:6379``); None for ``auto``."""
    if address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname:
        raise ConfigError(f"--address {address!r} is not host:port or ray://host:port; e.g. ray://head:10001.")
    default = {"ray": 10001, "http": 8265, "https": 8265}.get(parsed.scheme, 6379)
    return parsed.hostname, parsed.port or default


def probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast with one sentence when nothing listens at ``address``."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            return
    except OSError as err:
        raise DmlbenchError(
            f"cannot reach a Ray cluster at {address} ({err.strerror or err}); start one with `ray start --head` "
            "and check the address and firewall, or drop --address to run locally."
        ) from None


def connect(spec: SweepSpec, num_cpus: int | None = None) -> bool:
    """Initialise Ray for ``spec``; returns True when this call started it (caller shuts it down).

    Reuses an already initialised Ray (tests, Ray Jobs drivers). Locally the dashboard is bound
    to ``spec.dashboard_host`` (localhost by default) and not started at all unless asked.
    """
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(spec.cpus_per_trial)))}}
    if spec.address:
        probe(spec.address)
        try:
            ray.init(address=spec.address, runtime_env=env, log_to_driver=False, configure_logging=False)
        except (ConnectionError, TimeoutError, RuntimeError) as err:
            raise DmlbenchError(f"cannot join the Ray cluster at {spec.address}: {err}".rstrip(".") + ".") from None
        return True
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=spec.dashboard_host != "127.0.0.1",
        dashboard_host=spec.dashboard_host,
        runtime_env=env,
        log_to_driver=False,
        configure_logging=False,
    )
    return True


def node_capacity() -> list[dict[str, float]]:
    """CPU/GPU count of every alive node of the connected Ray cluster."""
    import ray

    out = []
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            out.append({"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))})
    return out


def check_resources(spec: SweepSpec, nodes: list[dict[str, float]]) -> None:
    """A trial must fit on at least one node; else one sentence saying what the largest node has."""
    if not nodes:
        raise DmlbenchError("the Ray cluster has no alive nodes; start workers with `ray start --address ...`.")
    max_gpu = max(n["GPU"] for n in nodes)
    max_cpu = max(n["CPU"] for n in nodes)
    if spec.gpus_per_trial > max_gpu:
        where = "no node has a GPU" if max_gpu == 0 else f"the largest node has {max_gpu:g} GPU(s)"
        raise ConfigError(
            f"--gpus-per-trial {spec.gpus_per_trial:g} cannot be scheduled: {where}; lower it (fractions like 0.5 "
            "share a GPU) or use 0 for CPU-only."
        )
    if spec.cpus_per_trial > max_cpu:
        raise ConfigError(
            f"--cpus-per-trial {spec.cpus_per_trial:g} cannot be scheduled: the largest node has {max_cpu:g} CPUs; lower it."
        )


def storage_root(spec: SweepSpec) -> str:
    """Where Tune keeps experiment state and checkpoints: ``--storage`` or ``<output>/<sweep>/tune``."""
    if spec.storage:
        if "://" in spec.storage:
            return spec.storage.rstrip("/") + f"/{spec.sweep_id}/tune"
        return str(Path(spec.storage).expanduser().resolve() / spec.sweep_id / "tune")
    return str(Path(spec.output).expanduser().resolve() / spec.sweep_id / "tune")


def check_writable(path: Path) -> None:
    """``--output`` must be creatable and writable (checked before Ray starts).

    Folders this check creates are removed again, so a sweep refused later (bad resume, changed
    spec, dry run) leaves nothing behind; the sweep creates them for real when it starts.
    """
    path = path.expanduser().absolute()
    missing = [p for p in (path, *path.parents) if not p.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe_file = path / ".dmlbench-write-test"
        probe_file.write_text("ok")
        probe_file.unlink()
        for p in missing:  # deepest first
            p.rmdir()
    except OSError as err:
        raise ConfigError(
            f"--output {str(path)!r} is not writable ({err.strerror or err}); choose a folder you can write to."
        ) from None
