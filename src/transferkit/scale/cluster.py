"""Connect to a Ray cluster, or start a local one.

``--ray`` alone starts a new local Ray instance with this machine's cores; ``--ray ADDRESS`` connects to a running
cluster (``ray start --head`` on one machine, ``ray start --address HEAD:6379`` on the others), as
``ray.init(address=...)`` does (``--ray auto``: the cluster ``ray start`` runs on this machine). A process that
has already called ``ray.init`` keeps its cluster.
Starting Ray takes about 5 s here (2 cores); that is the fixed cost of ``--ray`` on one machine.

An address is tried with a plain TCP connection first (``REACH_SECONDS``): Ray 2.60's ``ray.init`` on an address
where nothing listens logs a warning every 40 s and was still retrying after 5 minutes.
"""

from __future__ import annotations

import logging
import socket

from transferkit.errors import TransferkitError
from transferkit.log import logger, show_progress

LOCAL = "local"  # ``--ray`` without an address
REACH_SECONDS = 5.0  # the TCP connection to a cluster's address


def require_ray():
    """The ``ray`` module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data needs pyarrow: the [ray] extra brings both)
    except ImportError as exc:
        raise TransferkitError(f"--ray needs Ray Data ({exc.name} is not installed): "
                               f"pip install 'transferkit[ray]'") from None
    return ray


def connect(address: str | None = LOCAL):
    """The ``ray`` module, initialised: on the running cluster at ``address``, or on a new local instance with
    this machine's cores when ``address`` is None or ``"local"``. Progress bars follow transferkit's verbosity."""
    ray = require_ray()
    if not ray.is_initialized():
        quiet = not show_progress()
        kwargs = dict(log_to_driver=not quiet, logging_level=logging.WARNING, configure_logging=True)
        if address in (None, "", LOCAL):  # a new instance, even where `ray start` left one (that is "auto")
            kwargs |= dict(address="local", include_dashboard=False)  # Ray counts the cores (cgroup limits too)
        else:
            check_reachable(address)
            kwargs["address"] = address
        try:
            ray.init(**kwargs)
        except (ConnectionError, ValueError, RuntimeError, ray.exceptions.RayError) as exc:
            raise TransferkitError(f"--ray {address}: cannot reach a Ray cluster there ({_first_line(exc)})") \
                from None
        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        logger.info(f"Ray: {nodes} node(s), {cluster_cpus()} CPU(s)")
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = show_progress()
    context.enable_operator_progress_bars = show_progress()
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING if show_progress() else logging.ERROR)
    return ray


def preflight(address: str | None) -> None:
    """Before a run reads any image: Ray is installed and ``address`` (unless local or auto) answers."""
    require_ray()
    if address not in (None, "", LOCAL):
        check_reachable(address)


def check_reachable(address: str, timeout: float = REACH_SECONDS) -> None:
    """A one-line error unless a TCP connection to ``address`` (HOST:PORT, ray://HOST:PORT) opens within
    ``timeout`` seconds; an address without a port (``auto``) is left to Ray."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else \
            exc.strerror or type(exc).__name__
        raise TransferkitError(f"--ray {address}: cannot reach a Ray cluster there ({reason})") from None


def cluster_cpus() -> int:
    """CPUs of the connected cluster (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
