"""The command line: `portway serve | check | demo`.

click, because it is small, well kept, and gives us exit status 2 for usage errors, which we
extend to every configuration error so scripts can tell "bad input" from "failed to run".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from typing import NoReturn

import click

from portway import __version__
from portway.addr import format_hostport, is_udp
from portway.config.durations import format_duration
from portway.config.load import load_config_file
from portway.config.schema import Config
from portway.errors import ConfigError, PortwayError
from portway.logs import LoopErrorLog, setup_logging
from portway.loops import loop_factory, loop_name
from portway.server import Server

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
    default=3.0,
    show_default=True,
    help="Seconds live connections get to finish after SIGTERM/SIGINT.",
)


def _fail(exc: BaseException, status: int) -> NoReturn:
    click.echo(f"portway: error: {exc}", err=True)
    sys.exit(status)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="portway")
def main() -> None:
    """portway: a small, fast, safe TCP/UDP stream proxy."""


@main.command()
@click.option("-c", "--config", "config_path", required=True, help="The YAML file of routes.")
@_log_format
@_log_level
@_loop
@_grace
def serve(config_path: str, log_format: str, log_level: str, loop_kind: str | None, grace: float) -> None:
    """Serve the routes in a config file until SIGINT or SIGTERM."""
    setup_logging(log_level, log_format)  # type: ignore[arg-type]
    try:
        config = load_config_file(config_path)
    except ConfigError as exc:
        _fail(exc, EXIT_CONFIG)
    _run(config, loop_kind, grace, config_path=config_path)


@main.command()
@click.option("-c", "--config", "config_path", required=True, help="The YAML file of routes.")
def check(config_path: str) -> None:
    """Validate a config file and print its routes."""
    try:
        config = load_config_file(config_path)
    except ConfigError as exc:
        _fail(exc, EXIT_CONFIG)
    click.echo(format_routes(config))
    click.echo(f"\n{config_path}: {len(config.routes)} route(s), OK")


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
    from portway.demo import EchoTargets, demo_config, instructions

    setup_logging(log_level, log_format)  # type: ignore[arg-type]
    targets = EchoTargets()

    async def setup() -> Config:
        tcp_target, udp_target = await targets.start()
        return demo_config(tcp_port, udp_port, tcp_target, udp_target)

    async def ready(server: Server) -> None:
        tcp = server.streams["demo-tcp"].local_addr
        udp = server.streams["demo-udp"].local_addr
        assert tcp is not None and udp is not None
        click.echo(instructions(tcp[1], udp[1]), err=True)

    _run(None, loop_kind, 1.0, setup=setup, ready=ready, teardown=targets.stop)


def format_routes(config: Config) -> str:
    rows = [("ROUTE", "SCHEME", "LISTEN", "TARGET", "OPTIONS")]
    for name, r in config.routes.items():
        if is_udp(r.scheme):
            opts = f"idle={format_duration(r.udp_idle_timeout)} max_sessions={r.udp_max_sessions}"
        else:
            opts = f"connect_timeout={format_duration(r.connect_timeout)}"
            if r.idle_timeout:
                opts += f" idle={format_duration(r.idle_timeout)}"
        listen = format_hostport(r.listen_host(), r.port.listening) + (
            " (any free port)" if not r.port.listening else ""
        )
        rows.append((name, r.scheme, listen, format_hostport(r.host, r.port.target), opts))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4] for row in rows
    )


def _run(  # type: ignore[no-untyped-def]
    config: Config | None,
    loop_kind: str | None,
    grace: float,
    *,
    setup=None,
    ready=None,
    teardown=None,
    config_path: str | None = None,
) -> None:
    try:
        factory = loop_factory(loop_kind)
    except ValueError as exc:
        _fail(exc, EXIT_CONFIG)
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(_serve(config, grace, setup, ready, teardown, config_path))
        except ConfigError as exc:
            _fail(exc, EXIT_CONFIG)
        except PortwayError as exc:
            _fail(exc, EXIT_RUNTIME)


async def _serve(config, grace, setup, ready, teardown, config_path=None) -> None:  # type: ignore[no-untyped-def]
    if config_path is not None:
        # `serve`: reloads on file changes and SIGHUP, and merges Docker routes (see portway.app).
        from portway.app import serve_live

        await serve_live(config_path, grace)
        return
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(LoopErrorLog())
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if setup is not None:
        config = await setup()
    server = Server(config)
    try:
        await server.start()
    except BaseException:
        if teardown is not None:
            await teardown()
        raise
    log.info(
        "portway serving", extra={"routes": len(server.streams), "loop": loop_name(loop), "action": "ready"}
    )
    if ready is not None:
        await ready(server)
    await stop.wait()
    log.info("shutting down", extra={"action": "shutdown", "grace_s": grace})
    await server.stop(grace)
    if teardown is not None:
        with contextlib.suppress(Exception):
            await teardown()
