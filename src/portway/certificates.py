"""TLS termination's certificates: loaded, picked by SNI, reloaded without dropping connections.

A `ServerCertificates` holds one `ssl.SSLContext` per (cert, key) pair of a route. New connections
read `context` once, when accepted; a reload builds a complete new set of contexts first and only
then swaps the attribute, so live connections keep the context they started with and a bad file
(missing, unreadable, a key that does not belong to its certificate) changes nothing: the error
names the route and the file, and the previous certificates keep serving.

Several pairs: the first is the default; the one whose names (subjectAltName DNS entries, else
the subject's CN) cover the client's SNI is swapped in by the SNI callback, exact names before
one-label wildcards, as `portway.matching` ranks them.

Files are watched with watchfiles (the directories, filtered by name: certbot and configuration
tools replace files by renaming over them), and re-read on every config reload (SIGHUP).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl

from cryptography import x509
from cryptography.x509.oid import NameOID

from portway.errors import ConfigError

__all__ = ["ServerCertificates", "target_context"]

log = logging.getLogger("portway.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
#: watchfiles waits this long after the last change of a burst (certbot writes several files).
_DEBOUNCE_MS = 200


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        if "KEY_VALUES_MISMATCH" in str(exc):
            return "the key does not belong to the certificate"
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _names(cert_file: str, route: str) -> list[str]:
    """The DNS names a PEM certificate (its first, the leaf) is valid for, lower-cased."""
    try:
        with open(cert_file, "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"certificate {cert_file}: {_reason(exc)}", route=route, field="tls") from None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return [n.lower().rstrip(".") for n in names]


class ServerCertificates:
    """The certificates one TLS-terminating route serves (see the module docstring)."""

    def __init__(
        self,
        route: str,
        pairs: list[tuple[str, str]],
        *,
        client_ca: str | None = None,
        min_version: str = "1.2",
    ) -> None:
        """Loads every file now: raises ConfigError naming the route and the file."""
        self.route = route
        self.pairs = pairs
        self.client_ca = client_ca
        self.min_version = _VERSIONS[min_version]
        #: Read once per new connection; replaced whole by `reload`.
        self.context = self._load()
        self._watch: asyncio.Task[None] | None = None

    @property
    def files(self) -> list[str]:
        out = [path for pair in self.pairs for path in pair]
        return out + ([self.client_ca] if self.client_ca else [])

    def _context(self, cert: str, key: str) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = self.min_version
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"certificate {cert} with key {key}: {_reason(exc)}", route=self.route, field="tls"
            ) from None
        if self.client_ca is not None:
            try:
                ctx.load_verify_locations(self.client_ca)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"client_ca {self.client_ca}: {_reason(exc)}", route=self.route, field="tls.client_ca"
                ) from None
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def _load(self) -> ssl.SSLContext:
        contexts = [(self._context(cert, key), _names(cert, self.route)) for cert, key in self.pairs]
        default = contexts[0][0]
        if len(contexts) > 1:
            exact: dict[str, ssl.SSLContext] = {}
            wildcard: dict[str, ssl.SSLContext] = {}
            for ctx, names in contexts:
                for name in names:
                    if name.startswith("*."):
                        wildcard.setdefault(name[2:], ctx)
                    else:
                        exact.setdefault(name, ctx)

            def pick(conn: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
                if server_name:
                    name = server_name.lower().rstrip(".")
                    chosen = exact.get(name) or wildcard.get(name.partition(".")[2])
                    if chosen is not None:
                        conn.context = chosen

            default.sni_callback = pick
        return default

    def reload(self) -> bool:
        """Read the files again; on any problem log it (naming route and file) and keep serving
        the previous certificates. Returns whether the new ones are in use."""
        try:
            context = self._load()
        except ConfigError as exc:
            log.error(
                "certificate reload failed; the previous certificates keep serving",
                extra={"route": self.route, "action": "tls_reload", "error": str(exc)},
            )
            return False
        self.context = context
        log.info("certificates reloaded", extra={"route": self.route, "action": "tls_reload"})
        return True

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload whenever one of the files changes on disk (until `stop_watching`)."""
        if self._watch is None:
            files = {os.path.abspath(p) for p in self.files}
            self._watch = loop.create_task(self._watch_files(files))

    def stop_watching(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def _watch_files(self, files: set[str]) -> None:
        from watchfiles import awatch

        directories = sorted({os.path.dirname(p) for p in files})
        try:
            async for changes in awatch(*directories, debounce=_DEBOUNCE_MS, recursive=False):
                if any(path in files for _, path in changes):  # watchfiles reports absolute paths
                    self.reload()
        except (OSError, RuntimeError) as exc:  # a directory vanished: reloads still re-read
            log.warning(
                "stopped watching certificate files",
                extra={"route": self.route, "action": "tls_reload", "error": str(exc)},
            )


def target_context(route: str, *, ca: str | None, verify: bool) -> ssl.SSLContext:
    """The client context for re-encrypting to a target (``tls.relay``)."""
    if not verify:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    try:
        return ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ca {ca}: {_reason(exc)}", route=route, field="tls.ca") from None
