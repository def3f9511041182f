"""Where the suite runs: `local`, or `ssh://user@host[:port][?python=/path/to/python][&emulated=true]`.

`emulated=true` declares a target whose CPU is emulated (an arm64 root filesystem under qemu, see
scripts/arm64_target.sh): its accuracies are real, its times are not, so the report marks its latency figures
and the latency budgets are not applied to it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional
from urllib.parse import parse_qs, urlsplit

_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_HOST = re.compile(r"^[A-Za-z0-9.:-]+$")
FORMS = "'local' or 'ssh://user@host[:port]' (optionally '?python=/path/to/python' and/or '?emulated=true')"
OPTIONS = ("python", "emulated")
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


@dataclass(frozen=True)
class Target:
    spec: str
    kind: str                      # "local" | "ssh"
    user: Optional[str] = None
    host: Optional[str] = None
    port: int = 22
    python: Optional[str] = None   # overrides validate.ssh.python for this target
    emulated: bool = False         # the CPU is emulated: latency is not a measure of the device

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
    if set(query) - set(OPTIONS) or any(len(v) > 1 for v in query.values()):
        raise ValueError(f"target '{spec}': the options are ?python=... and ?emulated=true, each once; got "
                         f"{sorted(query)}")
    python = query.get("python", [None])[0]
    emulated = query.get("emulated", ["false"])[0].lower()
    if emulated not in _BOOL:
        raise ValueError(f"target '{spec}': emulated= takes true or false, got '{emulated}'")
    return Target(spec, "ssh", user, host, port, python, _BOOL[emulated])


def timed_label(spec: str) -> str:
    """A target's name where its times are shown: an emulated CPU's times are marked as such."""
    return f"{spec} (emulated)" if is_emulated(spec) else spec


def is_emulated(spec: str) -> bool:
    """Whether a validate.targets entry (already validated) declares an emulated CPU."""
    try:
        return parse_target(spec).emulated
    except ValueError:
        return False
