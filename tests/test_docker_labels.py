"""Docker label parsing and container target resolution, without a Docker daemon."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from portway.providers.docker_labels import (
    LabelResult,
    Skip,
    Target,
    routes_from_labels,
    target_for_container,
)


def parse(labels: dict[str, str], *, name: str = "web", explicit_only: bool = False) -> LabelResult:
    return routes_from_labels(name, labels, explicit_only=explicit_only)


def routes(labels: dict[str, str], **kwargs: Any) -> dict[str, dict[str, Any]]:
    result = parse(labels, **kwargs)
    assert result.problems == []
    return result.routes


def only_problem(result: LabelResult) -> str:
    assert len(result.problems) == 1, result.problems
    return result.problems[0]


# --- aliases ---------------------------------------------------------------------------------


class TestAliases:
    def test_default_alias_is_the_container_name(self) -> None:
        assert routes({"proxy.web.port": "8080:80"}) == {"web": {"port": "8080:80"}}

    def test_leading_slash_of_docker_names_is_dropped(self) -> None:
        assert routes({}, name="/web") == {"web": {}}

    def test_container_without_labels_still_gets_its_default_route(self) -> None:
        # The schema fills in defaults; an opt-out provider routes every container.
        assert routes({"com.example.other": "x"}) == {"web": {}}

    def test_explicit_only_skips_containers_without_aliases(self) -> None:
        result = parse({"proxy.web.port": "80"}, explicit_only=True)
        assert result.routes == {}
        assert result.problems == []

    def test_explicit_only_routes_containers_with_aliases(self) -> None:
        assert routes({"proxy.aliases": "ssh"}, explicit_only=True) == {"ssh": {}}

    def test_aliases_are_split_on_commas_and_trimmed(self) -> None:
        assert list(routes({"proxy.aliases": " ssh , sftp,dns "})) == ["ssh", "sftp", "dns"]

    def test_aliases_replace_the_container_name(self) -> None:
        result = parse({"proxy.aliases": "ssh", "proxy.web.port": "22"})
        assert result.routes == {"ssh": {}}
        assert "'proxy.web.port'" in only_problem(result)

    def test_empty_items_are_holes_that_keep_positions(self) -> None:
        result = routes({"proxy.aliases": "a,,b,", "proxy.ports": "1,,3", "proxy.#3.scheme": "udp"})
        assert result == {"a": {"port": "1"}, "b": {"port": "3", "scheme": "udp"}}

    def test_no_alias_at_all_is_a_problem(self) -> None:
        result = parse({"proxy.aliases": " , "})
        assert result.routes == {}
        assert "names no alias" in only_problem(result)

    def test_duplicate_alias_keeps_the_first(self) -> None:
        result = parse({"proxy.aliases": "a,b,a", "proxy.ports": "1,2,3"})
        assert result.routes == {"a": {"port": "1"}, "b": {"port": "2"}}
        assert any("listed twice" in p for p in result.problems)
        assert any("'3'" in p and "alias #3" in p for p in result.problems)

    @pytest.mark.parametrize("bad", ["*", "#1", "#x"])
    def test_addressing_syntax_is_not_an_alias(self, bad: str) -> None:
        result = parse({"proxy.aliases": f"{bad},ok"})
        assert result.routes == {"ok": {}}
        assert repr(bad) in only_problem(result)


# --- fields ----------------------------------------------------------------------------------


class TestFields:
    def test_every_field_value_is_kept_as_written(self) -> None:
        labels = {
            "proxy.aliases": "ssh",
            "proxy.ssh.port": "2222:22",  # base-60 in YAML 1.1: must stay a string
            "proxy.ssh.scheme": "tcp",
            "proxy.ssh.host": " 10.0.0.1 ",
            "proxy.ssh.relay_proxy_protocol_header": "NO",
        }
        assert routes(labels) == {
            "ssh": {
                "port": "2222:22",
                "scheme": "tcp",
                "host": " 10.0.0.1 ",
                "relay_proxy_protocol_header": "NO",
            }
        }

    def test_dots_nest_into_mappings(self) -> None:
        labels = {
            "proxy.web.acl.default": "deny",
            "proxy.web.acl.allow": "10.0.0.0/8",
            "proxy.web.a.b.c": "deep",
        }
        assert routes(labels) == {
            "web": {"acl": {"default": "deny", "allow": "10.0.0.0/8"}, "a": {"b": {"c": "deep"}}}
        }

    def test_scalar_and_nested_labels_for_one_field_conflict(self) -> None:
        result = parse({"proxy.web.acl": "off", "proxy.web.acl.default": "deny"})
        assert result.routes == {"web": {"acl": "off"}}  # first in sorted label order wins
        assert "'proxy.web.acl.default'" in only_problem(result)
        assert "conflicts" in only_problem(result)

    def test_nested_then_scalar_conflict_is_reported_on_the_scalar(self) -> None:
        result = parse({"proxy.web.acl.default": "deny", "proxy.web.acl.allow": "x", "proxy.#1.acl": "y"})
        # #1 is a lower layer than the name, so the nested labels override it without a complaint.
        assert result.routes == {"web": {"acl": {"default": "deny", "allow": "x"}}}
        assert result.problems == []

    @pytest.mark.parametrize(
        "key", ["proxy.web..port", "proxy.web.", "proxy.web.acl.", "proxy.*.", "proxy.#1."]
    )
    def test_empty_field_names_are_problems(self, key: str) -> None:
        result = parse({key: "1"})
        assert result.routes == {"web": {}}
        assert "empty field name" in only_problem(result)

    def test_field_names_are_case_sensitive(self) -> None:
        result = parse({"proxy.Web.port": "1"})
        assert result.routes == {"web": {}}
        assert "'Web'" in only_problem(result)


# --- inline YAML -----------------------------------------------------------------------------


class TestInlineYaml:
    def test_whole_route_as_yaml_keeps_values_as_written(self) -> None:
        yaml = "port: 2222:22\nscheme: tcp\nacl:\n  default: NO\n  allow: [10.0.0.0/8, 192.168.0.0/16]\n"
        assert routes({"proxy.web": yaml}) == {
            "web": {
                "port": "2222:22",
                "scheme": "tcp",
                "acl": {"default": "NO", "allow": ["10.0.0.0/8", "192.168.0.0/16"]},
            }
        }

    def test_field_labels_override_yaml_keys_deeply(self) -> None:
        labels = {
            "proxy.web": "port: 1:1\nacl:\n  default: deny\n  allow: [a]\n",
            "proxy.web.port": "2:2",
            "proxy.web.acl.default": "allow",
        }
        assert routes(labels) == {"web": {"port": "2:2", "acl": {"default": "allow", "allow": ["a"]}}}

    def test_field_label_replaces_a_yaml_scalar_with_a_mapping(self) -> None:
        assert routes({"proxy.web": "acl: off", "proxy.web.acl.default": "deny"}) == {
            "web": {"acl": {"default": "deny"}}
        }

    def test_empty_yaml_declares_the_route(self) -> None:
        assert routes({"proxy.aliases": "a", "proxy.a": ""}) == {"a": {}}

    def test_explicit_null_stays_none_for_the_schema(self) -> None:
        assert routes({"proxy.web": "host: ~"}) == {"web": {"host": None}}

    @pytest.mark.parametrize("text", ["- a\n- b\n", "just text"])
    def test_yaml_that_is_not_a_mapping_is_a_problem(self, text: str) -> None:
        result = parse({"proxy.web": text, "proxy.web.port": "1"})
        assert result.routes == {"web": {"port": "1"}}
        assert "must be a YAML mapping" in only_problem(result)

    def test_invalid_yaml_is_a_problem_with_its_position(self) -> None:
        result = parse({"proxy.web": "port: 1\nport: 2\n"})
        assert result.routes == {"web": {}}
        problem = only_problem(result)
        assert "'proxy.web'" in problem
        assert "duplicate key" in problem
        assert "line 2" in problem

    def test_yaml_aliases_are_copied_not_shared_between_routes(self) -> None:
        result = routes({"proxy.aliases": "a,b", "proxy.*": "acl: {default: deny}", "proxy.a.acl.allow": "x"})
        assert result == {"a": {"acl": {"default": "deny", "allow": "x"}}, "b": {"acl": {"default": "deny"}}}


# --- wildcard, index and shortcuts -----------------------------------------------------------


class TestAddressing:
    def test_wildcard_applies_to_every_alias(self) -> None:
        labels = {"proxy.aliases": "a,b", "proxy.*.bind": "127.0.0.1", "proxy.*": "scheme: udp"}
        assert routes(labels) == {
            "a": {"bind": "127.0.0.1", "scheme": "udp"},
            "b": {"bind": "127.0.0.1", "scheme": "udp"},
        }

    def test_specific_labels_win_over_wildcard(self) -> None:
        labels = {"proxy.aliases": "a,b", "proxy.*.port": "1", "proxy.b.port": "2", "proxy.#1": "port: 3"}
        assert routes(labels) == {"a": {"port": "3"}, "b": {"port": "2"}}

    def test_index_addresses_aliases_one_based(self) -> None:
        labels = {"proxy.aliases": "a,b", "proxy.#1.port": "1", "proxy.#2": "port: 2"}
        assert routes(labels) == {"a": {"port": "1"}, "b": {"port": "2"}}

    def test_name_wins_over_index(self) -> None:
        assert routes({"proxy.#1.port": "1", "proxy.web.port": "2"}) == {"web": {"port": "2"}}

    def test_two_spellings_of_one_index_conflict(self) -> None:
        result = parse({"proxy.#1.port": "1", "proxy.#01.port": "2"})
        assert result.routes == {"web": {"port": "2"}}  # "#01" sorts before "#1"
        assert "conflicts" in only_problem(result)

    @pytest.mark.parametrize("index", ["#0", "#3", "#", "#one", "#-1"])
    def test_index_out_of_range_is_a_problem(self, index: str) -> None:
        result = parse({"proxy.aliases": "a,b", f"proxy.{index}.port": "1"})
        assert result.routes == {"a": {}, "b": {}}
        assert only_problem(result).startswith(
            f"container 'web': label 'proxy.{index}.port' refers to alias #"
        )

    def test_index_of_a_hole_is_a_problem(self) -> None:
        result = parse({"proxy.aliases": "a,,b", "proxy.#2.port": "1"})
        assert "alias #2, which is empty" in only_problem(result)

    def test_shortcuts_fan_out_by_position(self) -> None:
        labels = {"proxy.aliases": "ssh,dns", "proxy.ports": "2222:22, 5353:53", "proxy.schemes": "tcp,udp"}
        assert routes(labels) == {
            "ssh": {"port": "2222:22", "scheme": "tcp"},
            "dns": {"port": "5353:53", "scheme": "udp"},
        }

    def test_fewer_shortcut_values_than_aliases_leaves_the_rest_alone(self) -> None:
        assert routes({"proxy.aliases": "a,b", "proxy.ports": "1"}) == {"a": {"port": "1"}, "b": {}}

    def test_more_shortcut_values_than_aliases_is_a_problem(self) -> None:
        result = parse({"proxy.aliases": "a", "proxy.ports": "1,2,3"})
        assert result.routes == {"a": {"port": "1"}}
        problem = only_problem(result)
        assert "'proxy.ports'" in problem
        assert "'2', '3'" in problem

    def test_shortcuts_rank_between_wildcard_and_specific(self) -> None:
        labels = {"proxy.aliases": "a,b", "proxy.*.port": "0", "proxy.ports": "1,2", "proxy.b.port": "9"}
        assert routes(labels) == {"a": {"port": "1"}, "b": {"port": "9"}}

    def test_aliases_with_dots_match_the_longest_alias(self) -> None:
        labels = {
            "proxy.aliases": "a,a.b,git.example.com",
            "proxy.a.b.port": "1",
            "proxy.a.x.port": "2",
            "proxy.git.example.com.port": "3",
            "proxy.git.example.com": "scheme: tcp",
        }
        assert routes(labels) == {
            "a": {"x": {"port": "2"}},
            "a.b": {"port": "1"},
            "git.example.com": {"port": "3", "scheme": "tcp"},
        }

    def test_default_alias_with_dots_is_addressable(self) -> None:
        assert routes({"proxy.my.app.port": "1"}, name="my.app") == {"my.app": {"port": "1"}}

    def test_alias_named_like_a_setting_keeps_its_fields(self) -> None:
        labels = {"proxy.aliases": "ports", "proxy.ports.scheme": "udp", "proxy.ports": "1"}
        assert routes(labels) == {"ports": {"port": "1", "scheme": "udp"}}


# --- container-wide settings -----------------------------------------------------------------


class TestContainerSettings:
    @pytest.mark.parametrize("value", ["true", "True", "yes", "1", "on", " TRUE "])
    def test_exclude_skips_the_container(self, value: str) -> None:
        result = parse({"proxy.exclude": value, "proxy.web.port": "1", "proxy.bogus.x": "1"})
        assert result == LabelResult({}, [], excluded=True)

    @pytest.mark.parametrize("value", ["false", "no", "0", "off"])
    def test_exclude_false_routes_it(self, value: str) -> None:
        assert routes({"proxy.exclude": value}) == {"web": {}}

    def test_unreadable_exclude_fails_closed(self) -> None:
        result = parse({"proxy.exclude": "maybe", "proxy.web.port": "1"})
        assert result.routes == {}
        assert result.excluded
        assert only_problem(result) == (
            "container 'web': label 'proxy.exclude' must be true or false, not 'maybe'; "
            "skipping the container"
        )

    def test_network_is_reported_not_routed(self) -> None:
        result = parse({"proxy.network": " backend ", "proxy.web.port": "1"})
        assert result == LabelResult({"web": {"port": "1"}}, [], network="backend")

    def test_empty_network_is_a_problem(self) -> None:
        result = parse({"proxy.network": ""})
        assert result.network is None
        assert "'proxy.network'" in only_problem(result)

    def test_network_is_known_even_without_routes(self) -> None:
        result = parse({"proxy.network": "n"}, explicit_only=True)
        assert result == LabelResult({}, [], network="n")


class TestProblems:
    def test_unknown_labels_are_reported_not_fatal(self) -> None:
        result = parse(
            {"proxy.aliases": "a", "proxy.b.port": "1", "proxy.idle_timeout": "1h", "proxy.a.port": "2"}
        )
        assert result.routes == {"a": {"port": "2"}}
        assert len(result.problems) == 2
        for problem in result.problems:
            assert problem.startswith("container 'web': label 'proxy.")
            assert "not an alias" in problem

    def test_labels_outside_the_namespace_are_ignored(self) -> None:
        assert routes({"proxy": "x", "proxyfoo.port": "1", "traefik.enable": "true"}) == {"web": {}}

    def test_problems_come_in_sorted_label_order(self) -> None:
        result = parse({"proxy.z.x": "1", "proxy.a.x": "1", "proxy.m.x": "1"})
        assert [p.split("'")[3] for p in result.problems] == ["proxy.a.x", "proxy.m.x", "proxy.z.x"]


# --- properties ------------------------------------------------------------------------------

alias_names = st.from_regex(r"[a-z][a-z0-9_-]{0,11}", fullmatch=True).filter(
    lambda s: s not in {"aliases", "exclude", "network", "ports", "schemes"}
)
field_names = st.from_regex(r"[a-z_]{1,10}", fullmatch=True)
any_text = st.text(max_size=30)


@given(st.lists(alias_names, min_size=1, max_size=5, unique=True), field_names, st.data())
def test_specific_values_come_back_exactly_as_written(
    aliases: list[str], field: str, data: st.DataObject
) -> None:
    values = {a: data.draw(any_text, label=a) for a in aliases}
    labels = {"proxy.aliases": ",".join(aliases), f"proxy.*.{field}": "wild"}
    labels.update({f"proxy.{a}.{field}": v for a, v in values.items()})
    result = parse(labels)
    assert result.problems == []
    assert result.routes == {a: {field: v} for a, v in values.items()}


@given(st.lists(alias_names, min_size=1, max_size=5, unique=True), field_names, any_text)
def test_wildcard_reaches_every_alias(aliases: list[str], field: str, value: str) -> None:
    result = parse({"proxy.aliases": ",".join(aliases), f"proxy.*.{field}": value})
    assert result.routes == {a: {field: value} for a in aliases}


@given(
    st.lists(alias_names, min_size=1, max_size=5, unique=True),
    st.lists(st.from_regex(r"[0-9:]{1,11}", fullmatch=True), max_size=7),
)
def test_ports_shortcut_pairs_by_position(aliases: list[str], ports: list[str]) -> None:
    result = parse({"proxy.aliases": ",".join(aliases), "proxy.ports": ",".join(ports)})
    for alias, port in zip(aliases, ports, strict=False):
        assert result.routes[alias] == {"port": port}
    for alias in aliases[len(ports) :]:
        assert result.routes[alias] == {}
    assert (len(result.problems) == 1) == (len(ports) > len(aliases))


label_keys = st.one_of(
    st.builds(lambda rest: "proxy." + rest, st.text(alphabet="ab.#*12x", max_size=12)),
    st.sampled_from(["proxy.aliases", "proxy.ports", "proxy.schemes", "proxy.network", "proxy.exclude"]),
    st.text(max_size=10),
)
label_values = st.one_of(any_text, st.sampled_from(["a: 1", "a,b", "[1", "x: {y: z}", "", "1,2,3"]))


@given(st.dictionaries(label_keys, label_values, max_size=12), st.booleans(), st.randoms())
def test_arbitrary_labels_never_raise_and_order_does_not_matter(
    labels: dict[str, str], explicit_only: bool, rnd: random.Random
) -> None:
    result = parse(labels, explicit_only=explicit_only)
    assert all(isinstance(route, dict) for route in result.routes.values())
    assert all(p.startswith("container 'web': label 'proxy.") for p in result.problems)
    items = list(labels.items())
    rnd.shuffle(items)
    assert parse(dict(items), explicit_only=explicit_only) == result


# --- target_for_container --------------------------------------------------------------------


def attrs(
    *,
    mode: str = "bridge",
    ports: dict[str, Any] | None = None,
    networks: dict[str, Any] | None = None,
    running: bool | None = True,
    name: str = "/web",
) -> dict[str, Any]:
    """A trimmed `docker inspect` result with only the keys target_for_container reads."""
    result: dict[str, Any] = {
        "Id": "4d35e433713557e210682a1d0b7ae50a344b77bf93b08830be7c5a558fce3f36",
        "Name": name,
        "HostConfig": {"NetworkMode": mode},
        "NetworkSettings": {"Ports": ports if ports is not None else {}, "Networks": networks or {}},
    }
    if running is not None:
        result["State"] = {"Running": running}
    return result


def endpoint(ipv4: str = "", ipv6: str = "") -> dict[str, str]:
    return {"IPAddress": ipv4, "GlobalIPv6Address": ipv6, "Gateway": ""}


def resolve(
    info: dict[str, Any], port: int = 22, proto: str = "tcp", network: str | None = None
) -> Target | Skip:
    assert proto in ("tcp", "udp")
    return target_for_container(info, port, proto, network=network, host_address="127.0.0.1")  # type: ignore[arg-type]


class TestTarget:
    def test_host_network_uses_host_address_and_the_port_itself(self) -> None:
        assert resolve(attrs(mode="host"), 2222) == Target("127.0.0.1", 2222, "host-network")

    @pytest.mark.parametrize("wildcard", ["0.0.0.0", "::", "", None])
    def test_published_wildcard_binding_is_reached_at_host_address(self, wildcard: str | None) -> None:
        info = attrs(
            ports={"22/tcp": [{"HostIp": wildcard, "HostPort": "2222"}]},
            networks={"bridge": endpoint("172.17.0.2")},
        )
        assert resolve(info) == Target("127.0.0.1", 2222, "published")

    def test_published_specific_binding_keeps_its_address(self) -> None:
        info = attrs(ports={"53/udp": [{"HostIp": "10.1.2.3", "HostPort": "5353"}]})
        assert resolve(info, 53, "udp") == Target("10.1.2.3", 5353, "published")

    def test_ipv4_binding_is_preferred_whatever_the_order(self) -> None:
        bindings = [{"HostIp": "::", "HostPort": "2223"}, {"HostIp": "0.0.0.0", "HostPort": "2222"}]
        assert resolve(attrs(ports={"22/tcp": bindings})) == Target("127.0.0.1", 2222, "published")

    def test_ipv6_only_binding_is_used(self) -> None:
        info = attrs(ports={"22/tcp": [{"HostIp": "::1", "HostPort": "2222"}]})
        assert resolve(info) == Target("::1", 2222, "published")

    def test_protocol_must_match(self) -> None:
        info = attrs(
            ports={"53/tcp": [{"HostIp": "", "HostPort": "5353"}]}, networks={"n": endpoint("10.0.0.5")}
        )
        assert resolve(info, 53, "udp") == Target("10.0.0.5", 53, "network")

    def test_exposed_but_unpublished_port_falls_back_to_the_network(self) -> None:
        info = attrs(ports={"22/tcp": None}, networks={"n": endpoint("10.0.0.5")})
        assert resolve(info) == Target("10.0.0.5", 22, "network")

    @pytest.mark.parametrize("host_port", ["", "0", "65536", "x", None])
    def test_unusable_host_ports_are_ignored(self, host_port: str | None) -> None:
        info = attrs(
            ports={"22/tcp": [{"HostIp": "", "HostPort": host_port}]}, networks={"n": endpoint("10.0.0.5")}
        )
        assert resolve(info) == Target("10.0.0.5", 22, "network")

    def test_first_network_in_name_order_with_an_address(self) -> None:
        info = attrs(
            networks={"zeta": endpoint("10.0.0.9"), "beta": endpoint("10.0.0.2"), "alpha": endpoint()}
        )
        assert resolve(info) == Target("10.0.0.2", 22, "network")

    def test_network_label_picks_the_network(self) -> None:
        info = attrs(networks={"a": endpoint("10.0.0.1"), "b": endpoint("10.0.1.1")})
        assert resolve(info, network="b") == Target("10.0.1.1", 22, "network")

    def test_global_ipv6_is_used_when_there_is_no_ipv4(self) -> None:
        info = attrs(networks={"v6": endpoint(ipv6="fd00::5")})
        assert resolve(info) == Target("fd00::5", 22, "network")

    def test_unknown_network_is_skipped_with_the_known_ones(self) -> None:
        result = resolve(attrs(networks={"a": endpoint("10.0.0.1")}), network="b")
        assert result == Skip("container 'web' is not on network 'b' (it is on: a)")

    def test_network_without_address_is_skipped(self) -> None:
        result = resolve(attrs(networks={"a": endpoint(), "b": endpoint("10.0.0.2")}), network="a")
        assert result == Skip("container 'web' has no IP address on network 'a'")

    def test_network_mode_none_is_skipped(self) -> None:
        assert resolve(attrs(mode="none")) == Skip("container 'web' has no network (network mode 'none')")

    def test_shared_network_namespace_is_skipped(self) -> None:
        result = resolve(attrs(mode="container:abc123"))
        assert isinstance(result, Skip)
        assert "'abc123'" in result.reason

    def test_stopped_container_is_skipped(self) -> None:
        result = resolve(attrs(mode="host", running=False))
        assert result == Skip("container 'web' is not running")

    def test_missing_state_is_taken_as_running(self) -> None:
        assert resolve(attrs(mode="host", running=None)) == Target("127.0.0.1", 22, "host-network")

    def test_bridge_none_daemon_gives_no_address(self) -> None:
        # What dockerd --bridge=none reports for a container on the default network.
        info = attrs(mode="default", networks={"bridge": endpoint()})
        result = resolve(info)
        assert result == Skip("container 'web' does not publish 22/tcp and has no IP address on any network")

    def test_nameless_attrs_fall_back_to_the_short_id(self) -> None:
        info = attrs(mode="none", name="")
        assert resolve(info) == Skip("container '4d35e4337135' has no network (network mode 'none')")

    def test_sparse_attrs_do_not_raise(self) -> None:
        assert isinstance(resolve({}), Skip)
        assert isinstance(resolve({"NetworkSettings": {"Ports": None, "Networks": None}}), Skip)
        assert isinstance(resolve({"NetworkSettings": {"Networks": {"n": None}}}), Skip)
