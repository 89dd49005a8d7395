"""GoDoxy's load_balance.link: routes naming one link become one pool on one listener."""

from __future__ import annotations

import asyncio
import textwrap
from collections import Counter

import pytest

from portway.config.links import fold_links
from portway.config.load import load_config_text
from portway.config.schema import RouteConfig
from portway.errors import ConfigError
from portway.server import Server
from tests.ports import free_port
from tests.targets import TCPEchoTarget


def route(**fields: object) -> RouteConfig:
    return RouteConfig.model_validate({"scheme": "tcp4", "bind": "127.0.0.1", **fields})


def test_linked_routes_fold_into_one_pool_named_after_the_link() -> None:
    folded = fold_links(
        {
            "app-1": route(port="8080:80", host="127.0.0.11", load_balance={"link": "app"}),
            "app-2": route(port="8080:80", host="127.0.0.12", load_balance={"link": "app", "weight": "3"}),
            "other": route(port="9090:90"),
        }
    )
    assert not folded.problems
    assert sorted(folded.routes) == ["app", "other"]
    pool = folded.routes["app"].pool()
    assert [(t.host, t.port, t.weight) for t in pool] == [("127.0.0.11", 80, 1), ("127.0.0.12", 80, 3)]
    assert folded.members["app"] == ("app-1", "app-2")
    assert folded.routes["app"].load_balance.link is None


@pytest.mark.parametrize(
    ("second", "field"),
    [
        ({"port": "8081:80"}, "port"),
        ({"port": "8080:80", "scheme": "udp4"}, "scheme"),
        ({"port": "8080:80", "load_balance": {"link": "app", "mode": "leastconn"}}, "load_balance.mode"),
    ],
)
def test_members_that_disagree_are_named_with_the_field(second: dict[str, object], field: str) -> None:
    fields: dict[str, object] = {"host": "127.0.0.12", "load_balance": {"link": "app"}, **second}
    folded = fold_links(
        {
            "app-1": route(port="8080:80", host="127.0.0.11", load_balance={"link": "app"}),
            "app-2": route(**fields),
        }
    )
    (problem,) = folded.problems
    assert (problem.route, problem.other, problem.field) == ("app-2", "app-1", field)
    assert [t.host for t in folded.routes["app"].pool()] == ["127.0.0.11"]


def test_a_file_with_disagreeing_members_is_a_config_error_naming_both() -> None:
    text = textwrap.dedent(
        """\
        routes:
          app-1:
            port: 8080:80
            load_balance: {link: app}
          app-2:
            port: 8081:80
            load_balance: {link: app}
        """
    )
    with pytest.raises(ConfigError) as err:
        load_config_text(text, "portway.yml")
    assert str(err.value) == (
        "portway.yml:6:11, route 'app-2', field 'port': "
        "is linked to 'app' with route 'app-1' but differs in port"
    )


def test_a_link_named_like_an_unlinked_route_is_an_error() -> None:
    folded = fold_links(
        {"app": route(port="9000:1"), "web": route(port="8080:80", load_balance={"link": "app"})}
    )
    (problem,) = folded.problems
    assert problem.route == "web" and problem.field == "load_balance.link"


async def test_linked_routes_serve_one_listener_spread_over_their_targets(both_tcp_engines: str) -> None:
    targets = [TCPEchoTarget(), TCPEchoTarget()]
    for t in targets:
        await t.start()
    port = free_port()
    text = textwrap.dedent(
        f"""\
        routes:
          app-1:
            scheme: tcp4
            bind: 127.0.0.1
            port: {port}:{targets[0].port}
            host: 127.0.0.1
            load_balance: {{link: app}}
          app-2:
            scheme: tcp4
            bind: 127.0.0.1
            port: {port}:{targets[1].port}
            host: 127.0.0.1
            load_balance: {{link: app}}
        """
    )
    server = Server(load_config_text(text, "links.yml"))
    await server.start()
    try:
        assert list(server.streams) == ["app"]
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            await writer.wait_closed()
        served = Counter({i: t.accepted for i, t in enumerate(targets)})
        assert served == Counter({0: 10, 1: 10})  # round robin over the two members
    finally:
        await server.stop()
        for t in targets:
            await t.stop()
