"""Where secrets may travel: https anywhere, plain http to this machine only (a stand-in, Azurite)."""

from __future__ import annotations

import ipaddress
import urllib.parse


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost, with or without a port: the only hosts plain http may carry secrets to."""
    try:
        name = urllib.parse.urlsplit(f"//{host}").hostname or ""
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def plain_http_elsewhere(url: str) -> str | None:
    """The host a plain-http URL points at when that host is not this machine; None for https or loopback."""
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme.lower() == "https":
        return None
    if parts.scheme.lower() == "http" and is_loopback(parts.netloc.rsplit("@", 1)[-1]):
        return None
    return parts.netloc or url.strip()


def has_host_and_port(url: str) -> bool:
    """Whether the URL's host and port can be read (a port past 65535 or an unclosed bracket cannot)."""
    try:
        parts = urllib.parse.urlsplit(url)
        return bool(parts.hostname) and (parts.port is None or parts.port > 0)
    except ValueError:
        return False


def shown_url(text: str) -> str:
    """A URL as a message may show it: credentials, query and fragment (where tokens live) replaced by '…'."""
    try:
        parts = urllib.parse.urlsplit(text)
    except ValueError:  # brackets that are not an IPv6 address: nothing past the scheme is shown
        return text.split("://", 1)[0] + "://…" if "://" in text else "…"
    host = parts.netloc.rsplit("@", 1)[-1]
    netloc = f"…@{host}" if "@" in parts.netloc else host
    hidden = ("…" if parts.query else "", "…" if parts.fragment else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, *hidden))
