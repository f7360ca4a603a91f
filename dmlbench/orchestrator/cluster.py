"""The sweep's Ray connection: which cluster (a private local Ray, ``--address`` or ``$RAY_ADDRESS``),
its token authentication, a bounded join with one sentence per failure, a watchdog for a cluster lost
under a running sweep, the resources a trial gets, and where Tune keeps its state.

* Without ``--address`` (and without ``$RAY_ADDRESS`` set by the user) a sweep always starts its own
  local Ray (``address="local"``): it never attaches to a cluster that Ray's pointer file
  (``<ray temp dir>/ray_current_cluster``) names, which may be another user's or a dead one.
* Token authentication: Ray enables it for a cluster whose head has a token (``~/.ray/auth_token``,
  which every local ``ray.init`` creates, ``$RAY_AUTH_TOKEN`` or ``$RAY_AUTH_TOKEN_PATH``), but a
  process joining an explicit address sends the token only under ``RAY_AUTH_MODE=token``, a
  setting Ray reads once, when it is imported. :func:`prepare_auth` sets it (before Ray is imported)
  whenever a token is available here and the user has not chosen a mode; a cluster without
  authentication accepts such a process too.
* Joining takes at most :data:`JOIN_TIMEOUT_S`; a failure ends with one sentence naming the address
  and the likely cause (nothing listening, token, Ray/Python version mismatch).
* :func:`watch` ends the driver with one sentence (exit 3) when the cluster's GCS stops answering for
  :data:`LOST_AFTER_S` seconds; the experiment state saved until then resumes with the same command.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from dmlbench.errors import ClusterError, ConfigError, DmlbenchError
from dmlbench.orchestrator.spec import SweepSpec

#: a join that has not finished after this many seconds ends the command (exit 2)
JOIN_TIMEOUT_S = 60.0
#: a connected cluster whose GCS does not answer for this long is lost (Ray itself gives up at 60 s)
LOST_AFTER_S = 20.0
#: exit status of a driver whose cluster was lost
EXIT_CLUSTER_LOST = 3
AUTH_MODE_VAR, TOKEN_VAR, TOKEN_PATH_VAR = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
TOKEN_HELP = (
    "copy the head node's token (`ray get-auth-token` prints it there; it is the head's ~/.ray/auth_token) "
    f"into ~/.ray/auth_token here, or set {TOKEN_VAR}=<token> or {TOKEN_PATH_VAR}=<file with the token>"
)

Printer = Callable[[str], None]


# ---- addresses ---------------------------------------------------------------------------------------
def _host_port(address: str) -> tuple[str, int] | None:
    """``host:port`` of an address (``http://h:8265``, ``h:6379``); None for ``auto``/``local``."""
    if address in ("auto", "local"):
        return None
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if not parsed.hostname:
        raise ConfigError(f"--address {address!r} is not HOST:PORT; e.g. --address head:6379.")
    default = {"http": 8265, "https": 8265}.get(parsed.scheme, 6379)
    try:
        return parsed.hostname, parsed.port or default
    except ValueError:
        raise ConfigError(f"--address {address!r} has an invalid port; e.g. --address head:6379.") from None


def probe(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast with one sentence when nothing listens at ``address``."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            return
    except OSError as err:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address} ({err.strerror or err}): nothing is listening there; start one "
            "with `ray start --head` and check the address and firewall, or drop --address to run locally."
        ) from None


def join_address(spec: SweepSpec) -> tuple[str | None, str]:
    """The cluster a sweep joins and where that came from: ``--address``, else ``$RAY_ADDRESS`` when
    the user set it (also how a Ray Job's driver finds its cluster), else None: a private local Ray."""
    env = os.environ.get("RAY_ADDRESS", "").strip()
    address, origin = (spec.address, "--address") if spec.address else (env or None, "$RAY_ADDRESS")
    if address is None:
        return None, "local"
    if address.startswith("ray://"):
        raise ConfigError(
            f"{origin} {address} is a Ray Client address, which dmlbench does not use (the sweep's driver writes "
            "rows and state where it runs); run the sweep on a node of the cluster with --address HEAD:6379, "
            "or submit it as a Ray Job: dmlbench submit --address http://HEAD:8265 -- sweep ..."
        )
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"{origin} {address} is a dashboard URL; a sweep joins the cluster's GCS address (HEAD:6379, printed by "
            "`ray start --head`), and the dashboard URL is for dmlbench submit."
        )
    return address, origin


# ---- token authentication --------------------------------------------------------------------------
def auth_token() -> tuple[str, str] | None:
    """The Ray token available here and where it came from, in Ray's order of precedence:
    ``$RAY_AUTH_TOKEN``, the file ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``; None if none."""
    token = os.environ.get(TOKEN_VAR, "").strip()
    if token:
        return token, f"${TOKEN_VAR}"
    path = os.environ.get(TOKEN_PATH_VAR, "").strip()
    candidates = [(Path(path).expanduser(), f"${TOKEN_PATH_VAR} ({path})")] if path else []
    candidates.append((Path.home() / ".ray" / "auth_token", str(Path.home() / ".ray" / "auth_token")))
    for file, where in candidates:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text:
            return text, where
    return None


def prepare_auth() -> str | None:
    """Turn on Ray's token mode for this process and its children when a token is available here and
    ``RAY_AUTH_MODE`` is unset; returns where the token comes from (None: no token will be sent).

    Must run before ``ray`` is imported (Ray reads the mode once, at import).
    """
    found = auth_token()
    mode = os.environ.get(AUTH_MODE_VAR)
    if mode is None and found is not None:
        os.environ[AUTH_MODE_VAR] = "token"
        mode = "token"
    if mode is None or mode.lower() != "token" or found is None:
        return None
    return found[1]


def prepare_auth_for(spec: SweepSpec) -> str | None:
    """:func:`prepare_auth` when the sweep joins a cluster (a local Ray turns token mode on itself)."""
    return prepare_auth() if join_address(spec)[0] is not None else None


def http_auth_headers() -> dict[str, str]:
    """``Authorization`` header for Ray's dashboard / Jobs API when a token is available here."""
    found = auth_token()
    if found is None or os.environ.get(AUTH_MODE_VAR, "token").lower() == "disabled":
        return {}
    return {"Authorization": f"Bearer {found[0]}"}


def join_error(address: str, error: str, log: str, token_source: str | None) -> str:
    """One sentence for a failed join, from the exception text and what Ray printed meanwhile.

    Example:
        >>> join_error("h:6379", "Failed to connect", "InvalidAuthToken: missing", None)[:75]
        'cannot join the Ray cluster at h:6379: it requires an authentication token '
    """
    text = f"{error}\n{log}"
    if "Version mismatch" in text or "version mismatch" in text:
        found = re.findall(r"Ray:?\s*([0-9][\w.+-]*)[,\s]+Python:?\s*([0-9][\w.+-]*)", text)
        detail = f" (cluster Ray {found[0][0]} / Python {found[0][1]}, here Ray {found[1][0]} / Python {found[1][1]})" \
            if len(found) >= 2 else ""  # fmt: skip
        return (
            f"cannot join the Ray cluster at {address}: its Ray or Python version differs from this machine's{detail}; "
            "install the same Ray and Python versions here as on the cluster."
        )
    if re.search(r"InvalidAuthToken|Unauthenticated|AuthenticationError|authentication token", text, re.I):
        mode = os.environ.get(AUTH_MODE_VAR, "")
        if mode.lower() == "disabled":
            return (
                f"cannot join the Ray cluster at {address}: it requires an authentication token but "
                f"{AUTH_MODE_VAR}=disabled is set here; unset it and {TOKEN_HELP}."
            )
        if token_source is None:
            return f"cannot join the Ray cluster at {address}: it requires an authentication token and none was found here; {TOKEN_HELP}."
        return (
            f"cannot join the Ray cluster at {address}: it rejected the authentication token from {token_source}; "
            f"use the cluster's own token: {TOKEN_HELP}."
        )
    first = next((ln.strip() for ln in str(error).splitlines() if ln.strip()), "no answer")
    return (
        f"cannot join the Ray cluster at {address} ({first.rstrip('.')}); check that it is the head's GCS address "
        "(`ray start --head` prints it; port 6379 by default) and that this machine is a node of that cluster "
        "(run the sweep on the head node, or submit it from here with dmlbench submit)."
    )


# ---- bounded blocking calls -------------------------------------------------------------------------
def _say(fd: int, text: str) -> None:
    try:
        os.write(fd, (text.rstrip() + "\n").encode())
    except OSError:
        pass


@contextmanager
def deadline(seconds: float, message: str, exit_code: int = 2, fd: int = 2) -> Iterator[None]:
    """End the process with ``message`` (one line on ``fd``) and ``exit_code`` when the block has not
    finished after ``seconds``: for calls that can block inside Ray's C++ core, where neither an
    exception nor Ctrl-C reaches them."""
    done = threading.Event()

    def fire() -> None:
        if not done.wait(seconds):
            _say(fd, f"error: {message}")
            os._exit(exit_code)

    thread = threading.Thread(target=fire, name="dmlbench-deadline", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


@contextmanager
def captured_stderr() -> Iterator[dict[str, Any]]:
    """Collect what is written to file descriptor 2 (Ray's C++ core logs there) during the block.

    Yields ``{"fd": <a descriptor of the real stderr>, "text": <filled in on exit>}``.
    """
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    out: dict[str, Any] = {"fd": saved, "text": ""}
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            tmp.seek(0)
            out["text"] = tmp.read().decode(errors="replace")
            os.close(saved)


# ---- connect -----------------------------------------------------------------------------------------
def connect(spec: SweepSpec, num_cpus: int | None = None, echo: Printer = print) -> bool:
    """Initialise Ray for ``spec``; returns True when this call started it (caller shuts it down).

    Reuses an already initialised Ray (tests). Locally the dashboard is bound to
    ``spec.dashboard_host`` (localhost by default) and not started at all unless asked.
    """
    address, origin = join_address(spec)
    token_source = prepare_auth_for(spec)  # before Ray is imported
    import ray

    if ray.is_initialized():
        return False
    env = {"env_vars": {"OMP_NUM_THREADS": str(max(1, int(spec.cpus_per_trial)))}}
    if address is None:
        ray.init(
            address="local",  # never a cluster found through Ray's pointer file
            num_cpus=num_cpus,
            include_dashboard=spec.dashboard_host != "127.0.0.1",
            dashboard_host=spec.dashboard_host,
            runtime_env=env,
            log_to_driver=False,
            configure_logging=False,
        )
        return True
    echo(f"joining the Ray cluster at {address} ({origin}" + (f"; token from {token_source})" if token_source else ")"))
    probe(address)
    with captured_stderr() as log:
        try:
            with deadline(JOIN_TIMEOUT_S, f"cannot join the Ray cluster at {address}: no answer within "
                          f"{JOIN_TIMEOUT_S:.0f} s; check that it is the head's GCS address (port 6379 by default) "
                          "and that the cluster is up (`ray status` on the head).", fd=log["fd"]):  # fmt: skip
                ray.init(address=address, runtime_env=env, log_to_driver=False, configure_logging=False)
            error = None
        except Exception as err:  # ConnectionError, RuntimeError (version), AuthenticationError, ...
            error = f"{type(err).__name__}: {err}"
    if error is not None:
        raise ClusterError(join_error(address, error, log["text"], token_source))
    if log["text"].strip():  # what Ray printed while joining (warnings), shown once it is known to be no failure
        _say(2, log["text"])
    cap = cluster_summary(node_capacity())
    echo(f"joined the Ray cluster at {address}: {cap}")
    return True


# ---- lost cluster ------------------------------------------------------------------------------------
def gcs_reachable(address: str, timeout_s: float = 2.0) -> bool:
    hp = _host_port(address)
    if hp is None:
        return True
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            return True
    except OSError:
        return False


@contextmanager
def watch(where: str, resume_hint: str, lost_after_s: float = LOST_AFTER_S, every_s: float = 2.0) -> Iterator[None]:
    """While the block runs, check every ``every_s`` seconds that the connected cluster's GCS answers;
    after ``lost_after_s`` seconds without an answer, print one sentence and end the process (exit
    :data:`EXIT_CLUSTER_LOST`): a driver whose cluster is gone can do nothing more, and Ray's core
    would otherwise end it later with a log line of its own."""
    import ray

    gcs = ray.get_runtime_context().gcs_address
    done = threading.Event()

    def loop() -> None:
        last_ok = time.monotonic()
        while not done.wait(every_s):
            if gcs_reachable(gcs):
                last_ok = time.monotonic()
            elif time.monotonic() - last_ok >= lost_after_s and not done.is_set():
                _say(2, f"error: lost the Ray cluster ({where}): its GCS at {gcs} has not answered for "
                        f"{lost_after_s:.0f} s; {resume_hint}")  # fmt: skip
                os._exit(EXIT_CLUSTER_LOST)

    thread = threading.Thread(target=loop, name="dmlbench-cluster-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()


# ---- resources ---------------------------------------------------------------------------------------
def node_capacity() -> list[dict[str, float]]:
    """CPU/GPU count of every alive node of the connected Ray cluster."""
    import ray

    out = []
    for node in ray.nodes():
        if node.get("Alive"):
            res = node.get("Resources", {})
            out.append({"CPU": float(res.get("CPU", 0.0)), "GPU": float(res.get("GPU", 0.0))})
    return out


def cluster_summary(nodes: list[dict[str, float]]) -> str:
    """E.g. ``2 node(s), 16 CPUs, 2 GPUs``."""
    return f"{len(nodes)} node(s), {sum(n['CPU'] for n in nodes):g} CPUs, {sum(n['GPU'] for n in nodes):g} GPUs"


def check_resources(spec: SweepSpec, nodes: list[dict[str, float]]) -> None:
    """A trial must fit on at least one node; else one sentence saying what the largest node has."""
    if not nodes:
        raise DmlbenchError("the Ray cluster has no alive nodes; start workers with `ray start --address ...`.")
    max_gpu = max(n["GPU"] for n in nodes)
    max_cpu = max(n["CPU"] for n in nodes)
    gpus = spec.gpus_per_trial or 0.0
    if gpus > max_gpu:
        where = "no node has a GPU" if max_gpu == 0 else f"the largest node has {max_gpu:g} GPU(s)"
        raise ConfigError(
            f"--gpus-per-trial {gpus:g} cannot be scheduled: {where}; lower it (fractions like 0.5 "
            "share a GPU) or use 0 for CPU-only."
        )
    if spec.cpus_per_trial > max_cpu:
        raise ConfigError(
            f"--cpus-per-trial {spec.cpus_per_trial:g} cannot be scheduled: the largest node has {max_cpu:g} CPUs; lower it."
        )


def resolve_resources(spec: SweepSpec, nodes: list[dict[str, float]]) -> SweepSpec:
    """The spec with the GPUs per trial decided for this cluster, checked before any trial starts.

    ``--gpus-per-trial`` not given: one GPU per trial when some node has a GPU, else 0. Trials on a
    benchmark dataset that would train on CPU are refused unless ``--allow-cpu`` (the embedded
    datasets are made for CPU). A request no node can hold is refused (:func:`check_resources`).
    """
    from dmlbench.datasets import DATASETS

    max_gpu = max((n["GPU"] for n in nodes), default=0.0)
    gpus = spec.gpus_per_trial if spec.gpus_per_trial is not None else (1.0 if max_gpu >= 1 else 0.0)
    spec = spec.model_copy(update={"gpus_per_trial": gpus})
    check_resources(spec, nodes)
    benchmarks = [d for d in spec.datasets if not getattr(DATASETS.get(d), "embedded", False)]
    on_cpu = gpus == 0 or str(spec.trial_base.get("device", "auto")) == "cpu"
    if benchmarks and on_cpu and not spec.allow_cpu:
        if str(spec.trial_base.get("device", "auto")) == "cpu":
            why = "the trials' device is set to cpu"
        elif max_gpu == 0:
            why = f"the Ray cluster has no GPU ({cluster_summary(nodes)})"
        else:
            why = "--gpus-per-trial is 0"
        raise ConfigError(
            f"the benchmark dataset(s) {', '.join(benchmarks)} would train on CPU ({why}); run on a cluster with "
            "GPUs (--address HEAD:6379 or dmlbench submit), or pass --allow-cpu to train on CPU anyway."
        )
    return spec


def loader_defaults(spec: SweepSpec) -> dict[str, Any]:
    """Trial keys ``num_workers``, ``torch_threads``, ``pin_memory`` that follow ``--cpus-per-trial``
    (:func:`dmlbench.engine.runtime.loader_settings`; a GPU trial when it gets a GPU, or, before the
    cluster is known, when it will get one by default)."""
    from dmlbench.engine.runtime import loader_settings

    cuda = spec.gpus_per_trial != 0 and str(spec.trial_base.get("device", "auto")) != "cpu"
    return loader_settings(spec.cpus_per_trial, cuda=cuda)


def trial_resources(spec: SweepSpec) -> dict[str, Any]:
    """What one trial gets: CPUs, GPUs, data-loader workers, threads, pinned memory (for the plan);
    ``trial_base`` values (a preset's) win over the defaults."""
    loader = loader_defaults(spec)
    loader.update({k: spec.trial_base[k] for k in loader if k in spec.trial_base})
    return {"cpus": spec.cpus_per_trial, "gpus": spec.gpus_per_trial, **loader}


def format_resources(spec: SweepSpec) -> str:
    """E.g. ``per trial: 8 CPUs, 1 GPU, 7 data-loader workers, 1 thread, pinned memory``."""
    r = trial_resources(spec)
    pinned = ", pinned memory" if r["pin_memory"] else ""
    loader = f"{r['num_workers']} data-loader worker(s), {r['torch_threads']} thread(s){pinned}"
    if r["gpus"] is None:  # decided when the cluster is known
        return f"per trial: {r['cpus']:g} CPU(s), 1 GPU if the cluster has GPUs, else 0; with a GPU: {loader}"
    return f"per trial: {r['cpus']:g} CPU(s), {r['gpus']:g} GPU(s), {loader}"


# ---- storage -----------------------------------------------------------------------------------------
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
