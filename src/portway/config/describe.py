"""What a validated config will run, as ``portway check`` prints it: a table of routes and summary lines.

Every setting that changes what a connection goes through (ACL, PROXY protocol in and out,
timeouts, re-resolving) is shown, including where it came from (the route's own ACL or the
global one), so a reviewer reading ``check``'s output sees the effective behaviour without
reading the defaults table. Pure text from a ``Config``: tested without a process.
"""

from __future__ import annotations

from portway.addr import format_hostport, ip_family, is_udp
from portway.config.durations import format_duration
from portway.config.links import fold_links
from portway.config.schema import AclConfig, Config, ProxyProtocolConfig, RouteConfig, share_listener

__all__ = ["describe", "route_options", "route_table", "summary_lines"]


def describe(config: Config) -> str:
    """The route table, a blank line, then the process-wide settings.

    Routes joined by ``load_balance.link`` are shown as the one pool route they become."""
    folded = fold_links(config.routes)
    config = config.model_copy(update={"routes": folded.routes})
    return route_table(config) + "\n\n" + "\n".join(summary_lines(config))


def _targets(r: RouteConfig) -> str:
    """``host:port`` for one target; a pool as ``a:1,b:2*3,c:3(backup)`` (``*N``: weight N)."""
    if r.targets is None:
        return format_hostport(r.host, r.port.target)
    words = []
    for t in r.pool():
        word = format_hostport(t.host, t.port or r.port.target)
        if t.weight != 1:
            word += f"*{t.weight}"
        if t.backup:
            word += "(backup)"
        words.append(word)
    return ",".join(words)


def route_table(config: Config) -> str:
    rows = [("ROUTE", "SCHEME", "LISTEN", "TARGET", "OPTIONS")]
    for name, r in config.routes.items():
        listen = format_hostport(r.listen_host(), r.port.listening) + (
            " (any free port)" if not r.port.listening else ""
        )
        target = _targets(r)
        rows.append((name, r.scheme, listen, target, route_options(config, r)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:4])) + "  " + row[4] for row in rows
    )


def route_options(config: Config, r: RouteConfig) -> str:
    """``key=value`` words, no spaces inside one, in the order a connection meets them."""
    words: list[str] = []
    if r.match is not None:
        words.append(f"match={r.match.describe()}")
    elif any(o is not r and o.match is not None and share_listener(o, r) for o in config.routes.values()):
        words.append("match=fallback")
    if any(o.match is not None and share_listener(o, r) for o in config.routes.values()):
        words.append(f"peek_timeout={format_duration(r.peek_timeout)}")
    if r.tls is not None:
        tls = r.tls
        extra = f",client_ca={tls.client_ca}" if tls.client_ca else ""
        extra += (",relay" + ("" if tls.verify else "(no-verify)")) if tls.relay else ""
        words.append(f"tls=terminate(certs={len(tls.pairs())},min={tls.min_version}{extra})")
    if r.acl is not None:
        words.append(f"acl=route({_acl_counts(r.acl)})")
    elif config.acl is not None:
        words.append("acl=global")
    if not is_udp(r.scheme):
        receive = r.proxy_protocol if r.proxy_protocol is not None else config.entrypoint.proxy_protocol
        if receive.mode != "disabled":
            origin = "route" if r.proxy_protocol is not None else "entrypoint"
            words.append(f"pp_receive={receive.mode}({origin},trusted={_trusted(receive)})")
    if r.relay_proxy_protocol_header:
        words.append(f"pp_relay=v{r.proxy_protocol_version}")
    if is_udp(r.scheme):
        words.append(f"idle={format_duration(r.udp_idle_timeout)}")
        words.append(f"max_sessions={r.udp_max_sessions}")
    else:
        words.append(f"connect_timeout={format_duration(r.connect_timeout)}")
        words.append(f"idle={format_duration(r.idle_timeout) if r.idle_timeout else 'off'}")
        if not r.half_close:
            words.append("half_close=off")
    if any(ip_family(t.host) is None for t in r.pool()):  # an IP literal is never looked up again
        interval = format_duration(r.resolve_interval) if r.resolve_interval else "on-failure"
        words.append(f"resolve={interval}")
    if r.targets is not None and len(r.targets) > 1:
        words.append(f"balance={r.load_balance.mode}")
    hc = r.healthcheck
    if hc is not None:
        probe = "send/expect" if hc.send or hc.expect or hc.expect_regex else "connect"
        words.append(
            f"check={probe},every={format_duration(hc.interval)},timeout={format_duration(hc.timeout)},"
            f"rise={hc.rise},fall={hc.fall}"
        )
    if r.max_connections is not None:
        words.append(f"max_connections={r.max_connections}")
    per = r.per_client
    if per.max_connections is not None:
        words.append(f"per_client_max={per.max_connections}")
    if per.rate is not None:
        words.append(f"per_client_rate={per.rate.replace(' ', '')}")
    return " ".join(words)


def summary_lines(config: Config) -> list[str]:
    workers = "auto (one per CPU)" if config.workers is None else str(config.workers)
    lines = [
        f"workers: {workers}",
        f"grace_period: {format_duration(config.grace_period)} (reload drains and shutdown)",
    ]
    if config.acl is not None:
        acl = config.acl
        extra = f", geoip {acl.geoip.database}" if acl.geoip is not None else ""
        extra += f", log {acl.log.path}" if acl.log.path is not None else ""
        lines.append(f"acl (global): {_acl_counts(acl)}{extra}")
    else:
        lines.append("acl (global): none, every client admitted unless a route has its own")
    pp = config.entrypoint.proxy_protocol
    if pp.mode == "disabled":
        lines.append("proxy_protocol (entrypoint): disabled")
    else:
        lines.append(
            f"proxy_protocol (entrypoint): {pp.mode}, trusted {_trusted(pp)}, "
            f"header_timeout {format_duration(pp.header_timeout)}"
        )
    include = ", ".join(config.providers.include) or "none"
    docker = ", ".join(f"{name}={url}" for name, url in config.providers.docker.items()) or "none"
    lines.append(f"providers: include {include}; docker {docker}")
    return lines


def _acl_counts(acl: AclConfig) -> str:
    local = "allow_local" if acl.allow_local else "no_local"
    return f"default={acl.default},{local},allow={len(acl.allow)},deny={len(acl.deny)}"


def _trusted(pp: ProxyProtocolConfig) -> str:
    return "|".join(pp.trusted_proxies) if pp.trusted_proxies else "none"
