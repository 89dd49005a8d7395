"""`providers.include`: route files merged into the main file, with errors that name the right file."""

from __future__ import annotations

from pathlib import Path

import pytest

from portway.config.load import load_config, load_config_file
from portway.errors import ConfigError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def main(tmp_path: Path) -> Path:
    return write(
        tmp_path / "main.yml",
        "providers:\n  include: [routes/ssh.yml, routes/games.yml]\nroutes:\n  web:\n    port: 8080:80\n",
    )


def test_included_routes_are_merged_relative_to_the_main_file(main: Path) -> None:
    write(main.parent / "routes" / "ssh.yml", "ssh:\n  port: 2222:22\n")
    write(main.parent / "routes" / "games.yml", "mc:\n  scheme: udp\n  port: 19132:19132\n")
    sources = load_config(main)
    assert list(sources.config.routes) == ["web", "ssh", "mc"]
    assert sources.config.routes["ssh"].port.listening == 2222  # not base-60
    assert sources.origins == {
        "web": str(main),
        "ssh": str(main.parent / "routes" / "ssh.yml"),
        "mc": str(main.parent / "routes" / "games.yml"),
    }
    assert sources.files == (main, main.parent / "routes" / "ssh.yml", main.parent / "routes" / "games.yml")
    assert load_config_file(main).routes == sources.config.routes  # `portway check` sees the same


def test_an_empty_included_file_adds_nothing(main: Path) -> None:
    write(main.parent / "routes" / "ssh.yml", "")
    write(main.parent / "routes" / "games.yml", "# nothing yet\n")
    assert list(load_config(main).config.routes) == ["web"]


def test_error_in_an_included_file_names_that_file_line_route_and_field(main: Path) -> None:
    ssh = write(main.parent / "routes" / "ssh.yml", "ssh:\n  port: 2222:22\n  sheme: tcp\n")
    write(main.parent / "routes" / "games.yml", "")
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    err = caught.value
    assert (err.file, err.line, err.route, err.field) == (str(ssh), 3, "ssh", "sheme")
    assert "did you mean 'scheme'" in err.message


def test_a_route_defined_twice_names_both_files(main: Path) -> None:
    ssh = write(main.parent / "routes" / "ssh.yml", "ssh:\n  port: 2222:22\n")
    games = write(main.parent / "routes" / "games.yml", "mc:\n  port: 1:1\nssh:\n  port: 2223:22\n")
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    assert caught.value.message == f"route 'ssh' is defined in {ssh} and {games}"
    assert (caught.value.file, caught.value.line) == (str(games), 4)  # where the second one starts


def test_an_included_route_clashing_with_the_main_file(main: Path) -> None:
    ssh = write(main.parent / "routes" / "ssh.yml", "web:\n  port: 9090:80\n")
    write(main.parent / "routes" / "games.yml", "")
    with pytest.raises(ConfigError, match=f"route 'web' is defined in {main} and {ssh}"):
        load_config(main)


def test_a_listener_conflict_across_files_names_the_included_route(main: Path) -> None:
    ssh = write(main.parent / "routes" / "ssh.yml", "other:\n  port: 8080:81\n")
    write(main.parent / "routes" / "games.yml", "")
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    err = caught.value
    assert (err.file, err.route, err.field, err.line) == (str(ssh), "other", "port", 2)
    assert "same address and protocol as route 'web'" in err.message


def test_a_missing_included_file_says_who_included_it(main: Path) -> None:
    write(main.parent / "routes" / "ssh.yml", "")
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    assert caught.value.file == str(main.parent / "routes" / "games.yml")
    assert caught.value.message == f"no such file (included from {main}:2)"


def test_an_included_file_must_be_a_mapping(main: Path) -> None:
    write(main.parent / "routes" / "ssh.yml", "- ssh\n")
    write(main.parent / "routes" / "games.yml", "")
    with pytest.raises(ConfigError, match="mapping of route name to route"):
        load_config(main)


def test_invalid_yaml_in_an_included_file_points_into_it(main: Path) -> None:
    ssh = write(main.parent / "routes" / "ssh.yml", "ssh:\n  port: [2222\n")
    write(main.parent / "routes" / "games.yml", "")
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    assert caught.value.file == str(ssh)
    assert caught.value.line is not None
