"""Prepare the Python environment on a target (stdlib only: run with the target's own interpreter, before
anything else of edgesmith can be imported there).

    python3 remote_env.py --venv DIR --require numpy pytest onnxruntime

Creates DIR as a virtual environment with --system-site-packages (so it finds what the system has); when the
interpreter is itself a virtual environment, its site-packages are added too (a .pth file), because a venv
made from a venv would otherwise not see them. Prints one JSON line: the venv's python, versions, what is
missing. Never installs anything: the target may have no network."""

from __future__ import annotations

import argparse
import json
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

PROBE = ("import importlib, json, sys\n"
         "out = {'python': sys.version.split()[0], 'versions': {}, 'missing': {}}\n"
         "for name in sys.argv[1:]:\n"
         "    try:\n"
         "        m = importlib.import_module(name)\n"
         "        v = getattr(m, '__version__', None) or getattr(m, 'get_version', lambda: '?')()\n"
         "        out['versions'][name] = str(v)\n"
         "    except Exception as exc:\n"
         "        out['missing'][name] = f'{type(exc).__name__}: {exc}'\n"
         "print(json.dumps(out))\n")


def ensure_venv(path: Path) -> Path:
    python = path / "bin" / "python"
    if not python.exists():
        venv.EnvBuilder(system_site_packages=True, symlinks=True, with_pip=False, clear=True).create(path)
    if sys.prefix != sys.base_prefix:  # this interpreter is a venv: layer its packages under the new one
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        paths = list(dict.fromkeys(site.getsitepackages() + [sysconfig.get_paths()["purelib"]]))
        Path(purelib, "_edgesmith_base.pth").write_text("\n".join(paths) + "\n")
    return python


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--venv", type=Path, required=True)
    p.add_argument("--require", nargs="*", default=[])
    args = p.parse_args()
    python = ensure_venv(args.venv)
    probe = subprocess.run([str(python), "-c", PROBE, *args.require], capture_output=True, text=True)
    if probe.returncode != 0:
        print(json.dumps({"venv_python": str(python), "error": probe.stderr.strip()[-2000:]}))
        return 1
    print(json.dumps({"venv_python": str(python), **json.loads(probe.stdout)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
