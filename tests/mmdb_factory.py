"""Write tiny MaxMind databases for tests, placing loopback ranges in real countries.

Integration tests can only send traffic from loopback, so the default layout gives three
127.x ranges three countries and time zones; a test picks its "country" by binding its
client socket to one of them (Linux routes all of 127/8 to lo).

    path = write_city_mmdb(tmp_path / "city.mmdb")
    GeoIpDatabase(path).lookup(ipaddress.ip_address("127.0.2.9"))  # CN, Asia/Shanghai
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from mmdb_writer import MMDBWriter
from netaddr import IPSet

# network -> (country ISO code, time zone)
DEFAULT_LAYOUT: Mapping[str, tuple[str, str]] = {
    "127.0.0.0/24": ("GB", "Europe/London"),
    "127.0.1.0/24": ("US", "America/New_York"),
    "127.0.2.0/24": ("CN", "Asia/Shanghai"),
    "2001:db8::/32": ("DE", "Europe/Berlin"),
}


def write_city_mmdb(
    path: str | os.PathLike[str],
    layout: Mapping[str, tuple[str, str]] = DEFAULT_LAYOUT,
    *,
    with_location: bool = True,
) -> str:
    """Write a GeoLite2-City-shaped database (or -Country-shaped without `with_location`).

    Returns the path as a string. IPv4 networks are stored in the IPv6 tree the way MaxMind
    does (::/96), so both address families can be looked up.
    """
    writer = MMDBWriter(
        ip_version=6,
        ipv4_compatible=True,
        database_type="GeoLite2-City" if with_location else "GeoLite2-Country",
        languages=["en"],
        description="portway test database",
    )
    for network, (country, time_zone) in layout.items():
        record: dict[str, object] = {"country": {"iso_code": country, "names": {"en": country}}}
        if with_location:
            record["location"] = {"time_zone": time_zone}
        writer.insert_network(IPSet([network]), record)
    writer.to_db_file(os.fspath(path))
    return os.fspath(path)
