"""The command line: `portway serve | check | demo`.

click, because it is small, well kept, and gives us exit status 2 for usage errors, which we
extend to every configuration error so scripts can tell "bad input" from "failed to run".
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

import click

from portway import __version__
from portway.addr import is_udp
from portway.app import serve_live
from portway.config.describe import describe
from portway.config.load import Sources, load_config
from portway.config.preflight import preflight
from portway.config.schema import Config
from portway.errors import BindError, ConfigError, PortwayError
from portway.logs import BatchingHandler, LoopErrorLog, setup_logging
from portway.loops import loop_factory, loop_name
from portway.server import Server
from portway.stream.listen import bind_listener
from portway.supervisor import CONTROL_SOCKET_ENV, Supervisor, cpu_count

log = logging.getLogger("portway")

EXIT_RUNTIME = 1
EXIT_CONFIG = 2

_log_format = click.option(
    "--log-format",
    type=click.Choice(["console", "json"]),
    default="console",
    show_default=True,
    help="Human-readable lines, or one JSON object per line.",
)
_log_level = click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
_loop = click.option(
    "--loop",
    "loop_kind",
    type=click.Choice(["auto", "uvloop", "asyncio"]),
    default=None,
    help="Event loop (default: $PORTWAY_LOOP, else uvloop where installed).",
)
_grace = click.option(
    "--grace",
    type=float,
    default=None,
    help="Seconds live connections get to finish after SIGTERM/SIGINT; overrides the file's "
    "grace_period (default 10s) for shutdown only. A second signal stops at once.",
)


def _fail(exc: BaseException, status: int) -> NoReturn:
    _report(exc, status=status)
    sys.exit(status)


def _report(exc: BaseException, *, status: int | None = None, warning: bool = False) -> None:
    """One line on stderr: ``portway: error: ...``, or a JSON log record under ``--log-format json``.

    Log shippers reading JSON lines must see the one line that says why portway stopped.
    """
    root = logging.getLogger("portway")
    handler = root.handlers[0] if len(root.handlers) == 1 else None
    if not isinstance(handler, BatchingHandler) or handler.fmt != "json":
        click.echo(f"portway: {'warning' if warning else 'error'}: {exc}", err=True)
        return
    fields: dict[str, object] = {"action": "check" if warning else "fatal"}
    if status is not None:
        fields["status"] = status
    if isinstance(exc, ConfigError):
        where = {"file": exc.file, "line": exc.line, "column": exc.column, "route": exc.route}
        fields.update({k: v for k, v in where.items() if v is not None})
        if exc.field is not None:
            fields["field"] = exc.field
        fields["error"] = exc.message
    root.log(logging.WARNING if warning else logging.ERROR, str(exc), extra=fields)
    handler.flush()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="portway")
def main() -> None:
    """portway: a small, fast, safe TCP/UDP stream proxy.

    Start with `portway check -c FILE`, then `portway serve -c FILE` (SIGHUP reloads).
    """


@main.command()
@click.option("-c", "--config", "config_path", required=True, help="The YAML file of routes.")
@_log_format
@_log_level
@_loop
@_grace
def serve(
    config_path: str, log_format: str, log_level: str, loop_kind: str | None, grace: float | None
) -> None:
    """Serve the routes in a config file until SIGINT or SIGTERM.

    \b
    Reloads, keeping unchanged routes and their connections, when a config file
    (or an included one) is saved or on SIGHUP:  kill -HUP <pid>
    A reload that fails validation changes nothing and logs where the error is.
    SIGINT/SIGTERM: stop accepting, let connections finish for grace_period
    (or --grace); a second signal stops at once.
    """
    setup_logging(log_level, log_format)  # type: ignore[arg-type]
    try:
        sources = load_config(config_path)
        factory = loop_factory(loop_kind)
    except (ConfigError, ValueError) as exc:
        _fail(exc, EXIT_CONFIG)
    _preflight_or_fail(sources, offline=False)
    config = sources.config
    workers = config.workers if config.workers is not None else cpu_count()
    if workers == 1:
        _run(factory, lambda: serve_live(config_path, grace, sources=sources))
        return
    try:
        overrides = reserve_listeners(config)
    except PortwayError as exc:
        _fail(exc, EXIT_RUNTIME)

    def control(listener: socket.socket, ready: Callable[[], None]) -> int:
        from portway.control import run_control

        for handler in logging.getLogger("portway").handlers:
            handler.addFilter(_WorkerField("control"))  # also the records of portway.* loggers
        return _run(
            factory,
            lambda: run_control(
                config_path, listener, port_overrides=dict(overrides), sources=sources, on_ready=ready
            ),
            exit_on_error=False,
        )

    def worker(index: int, ready: Callable[[], None]) -> int:
        from portway.worker import serve_worker

        root = logging.getLogger("portway")
        for handler in root.handlers:
            handler.addFilter(_WorkerField(index))  # also the records of portway.* loggers

        def serving() -> None:
            for handler in root.handlers:
                handler.flush()  # this worker's start lines come before the supervisor's
            ready()

        return _run(
            factory,
            lambda: serve_worker(
                os.environ[CONTROL_SOCKET_ENV], index, config_path=config_path, grace=grace, on_ready=serving
            ),
            exit_on_error=False,
        )

    # The supervisor waits this long (plus a margin) before killing a worker that will not stop.
    shutdown_grace = grace if grace is not None else config.grace_period
    sys.exit(Supervisor(workers, worker, grace=shutdown_grace, control=control).run())


@main.command()
@click.option("-c", "--config", "config_path", required=True, help="The YAML file of routes.")
@click.option(
    "--offline",
    is_flag=True,
    help="A target name that does not resolve is a warning, not an error (checking away from its DNS).",
)
@click.option(
    "--providers",
    "with_providers",
    is_flag=True,
    help="Also read the Docker, etcd and Redis providers once and show the merged routes with "
    "the source of each (exit 1 if one does not answer within --provider-timeout).",
)
@click.option(
    "--provider-timeout",
    type=float,
    default=5.0,
    show_default=True,
    help="Seconds to wait for each provider's first snapshot (with --providers).",
)
def check(config_path: str, offline: bool, with_providers: bool, provider_timeout: float) -> None:
    """Validate a config file as strictly as `serve` would, and print what it will run.

    Opens the GeoIP databases and ACL log files and resolves every target name, as serve does
    before listening; binds nothing. With --providers, also asks the Docker daemons and the
    stores the file names for their routes (read only) and prints the merged set.
    """
    try:
        sources = load_config(config_path)
    except ConfigError as exc:
        _fail(exc, EXIT_CONFIG)
    _preflight_or_fail(sources, offline=offline)
    config = sources.config
    if not with_providers:
        click.echo(describe(config))
        click.echo(f"\n{config_path}: {len(config.routes)} route(s), OK")
        return
    from pathlib import Path

    from portway.providers.snapshot import read_every_source

    every = asyncio.run(read_every_source(sources, Path(config_path).parent, provider_timeout))
    click.echo(describe(config.model_copy(update={"routes": every.routes})))
    width = max((len(name) for name in every.origins), default=5)
    click.echo("\n" + "ROUTE".ljust(width) + "  SOURCE")
    for name, origin in every.origins.items():
        click.echo(f"{name.ljust(width)}  {origin}")
    for problem in every.problems:
        _report(PortwayError(problem), warning=True)
    for label in every.silent:
        _report(PortwayError(f"{label}: no answer within {provider_timeout:g}s; its routes are missing"))
    if every.silent:
        sys.exit(EXIT_RUNTIME)
    click.echo(f"\n{config_path}: {len(every.routes)} route(s) from every source, OK")


@main.command()
@click.option(
    "--tcp-port", type=int, default=7000, show_default=True, help="Where the demo TCP route listens."
)
@click.option(
    "--udp-port", type=int, default=7001, show_default=True, help="Where the demo UDP route listens."
)
@_log_format
@_log_level
@_loop
def demo(tcp_port: int, udp_port: int, log_format: str, log_level: str, loop_kind: str | None) -> None:
    """Start echo targets on loopback and routes to them, then print how to try it."""
    setup_logging(log_level, log_format)  # type: ignore[arg-type]
    try:
        factory = loop_factory(loop_kind)
    except ValueError as exc:
        _fail(exc, EXIT_CONFIG)
    _run(factory, lambda: _demo(tcp_port, udp_port))


async def _demo(tcp_port: int, udp_port: int) -> None:
    from portway.demo import EchoTargets, demo_config, instructions

    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrorLog())
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    targets = EchoTargets()
    tcp_target, udp_target = await targets.start()
    server = Server(demo_config(tcp_port, udp_port, tcp_target, udp_target))
    try:
        try:
            await server.start()
        except BindError as exc:
            option = "--udp-port" if "'demo-udp'" in str(exc) else "--tcp-port"
            raise BindError(f"{exc} (pick another port with `portway demo {option} PORT`)") from None
        tcp, udp = server.streams["demo-tcp"].local_addr, server.streams["demo-udp"].local_addr
        assert tcp is not None and udp is not None
        log.info("portway serving", extra={"routes": 2, "loop": loop_name(loop), "action": "ready"})
        click.echo(instructions(tcp[1], udp[1]), err=True)
        await stop.wait()
        log.info("shutting down", extra={"action": "shutdown"})
    finally:
        await server.stop(1.0)
        await targets.stop()


def _preflight_or_fail(sources: Sources, *, offline: bool) -> None:
    """What serve would refuse before listening: every problem on its own line, then exit 2."""
    found = preflight(sources, offline=offline)
    for warning in found.warnings:
        _report(warning, warning=True)
    if found.errors:
        for error in found.errors[:-1]:
            _report(error, status=EXIT_CONFIG)
        _fail(found.errors[-1], EXIT_CONFIG)


def _run(
    factory: Callable[[], asyncio.AbstractEventLoop],
    main: Callable[[], Coroutine[Any, Any, None]],
    *,
    exit_on_error: bool = True,
) -> int:
    """Run `main` on a fresh loop; errors become one line and an exit status, never a traceback."""
    status = 0
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(main())
        except ConfigError as exc:
            status = EXIT_CONFIG
            error: PortwayError = exc
        except PortwayError as exc:
            status = EXIT_RUNTIME
            error = exc
    if status and exit_on_error:
        _fail(error, status)
    elif status:
        _report(error, status=status)
    return status


def reserve_listeners(config: Config) -> dict[str, int]:
    """Check every listener can bind (with SO_REUSEPORT, as workers will) and pick ports for 0.

    The main process does this before forking, so a port in use is one clear error rather than N
    failing workers, and routes written with listening port 0 get one port all workers share.
    The probe sockets are closed again: a bound UDP socket in the group would receive datagrams.
    """
    overrides: dict[str, int] = {}
    probes = []
    try:
        for name, route in config.routes.items():
            host = route.listen_host()
            kind = socket.SOCK_DGRAM if is_udp(route.scheme) else socket.SOCK_STREAM
            sock = bind_listener(route.scheme, host, route.port.listening, kind, reuse_port=True, name=name)
            probes.append(sock)
            if route.port.listening == 0:
                overrides[name] = sock.getsockname()[1]
    finally:
        for sock in probes:
            sock.close()
    return overrides


class _WorkerField(logging.Filter):
    """Tags every log record of a worker process with its index."""

    def __init__(self, index: int | str) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


# -- `portway status` (issue 10): the admin listener's /api/status as a table


@main.command()
@click.option(
    "--admin",
    "admin_addr",
    default="127.0.0.1:9108",
    show_default=True,
    help="The admin listener (host:port or an http:// URL).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw /api/status document.")
@click.option("--token-file", type=click.Path(dir_okay=False), default=None, help="The admin bearer token.")
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for an answer.")
def status(admin_addr: str, as_json: bool, token_file: str | None, timeout: float) -> None:
    """Show the routes, targets and totals of a running portway."""
    import json as _json
    import urllib.error
    import urllib.request

    from portway.admin import read_token_file
    from portway.status import format_status, status_from_json

    base = admin_addr if admin_addr.startswith(("http://", "https://")) else f"http://{admin_addr}"
    request = urllib.request.Request(base.rstrip("/") + "/api/status")
    try:
        if token_file is not None:
            request.add_header("Authorization", f"Bearer {read_token_file(token_file)}")
    except ConfigError as exc:
        _fail(PortwayError(f"--token-file: {exc.message}"), EXIT_CONFIG)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        hint = " (give --token-file)" if exc.code == 401 else ""
        _fail(PortwayError(f"{base}: HTTP {exc.code} {exc.reason}{hint}"), EXIT_RUNTIME)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        _fail(PortwayError(f"{base}: cannot reach the admin listener: {reason}"), EXIT_RUNTIME)
    if as_json:
        click.echo(body.decode())
        return
    try:
        doc = status_from_json(_json.loads(body))
    except (ValueError, KeyError, TypeError) as exc:
        _fail(PortwayError(f"{base}: not a portway status document: {exc}"), EXIT_RUNTIME)
    click.echo(format_status(doc))
