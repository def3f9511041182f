"""Where the suite runs: `local`, or `ssh://user@host[:port][?python=/path/to/python]`."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs, urlsplit

_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_HOST = re.compile(r"^[A-Za-z0-9.:-]+$")
FORMS = "'local' or 'ssh://user@host[:port]' (optionally '?python=/path/to/python')"


@dataclass(frozen=True)
class Target:
    spec: str
    kind: str                      # "local" | "ssh"
    user: Optional[str] = None
    host: Optional[str] = None
    port: int = 22
    python: Optional[str] = None   # overrides validate.ssh.python for this target

    @property
    def slug(self) -> str:
        """A file-name-safe name, e.g. results-ssh-pi@10.0.0.5-22.json."""
        return "local" if self.kind == "local" else f"ssh-{self.user}@{self.host.replace(':', '_')}-{self.port}"


def parse_target(spec: str) -> Target:
    if spec == "local":
        return Target(spec, "local")
    parts = urlsplit(spec)
    if parts.scheme != "ssh" or not parts.hostname or parts.path not in ("", "/"):
        raise ValueError(f"target '{spec}' is not {FORMS}")
    try:
        port = parts.port or 22
    except ValueError:
        raise ValueError(f"target '{spec}' has an invalid port (1-65535)") from None
    user, host = parts.username, parts.hostname
    if not user or not _USER.match(user) or not _HOST.match(host) or parts.password:
        raise ValueError(f"target '{spec}' needs a user and a host without password, as {FORMS}")
    query = parse_qs(parts.query)
    if set(query) - {"python"}:
        raise ValueError(f"target '{spec}': the only option is ?python=..., got {sorted(query)}")
    python = query.get("python", [None])[0]
    return Target(spec, "ssh", user, host, port, python)
