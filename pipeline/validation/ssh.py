"""SSH targets for real: key authentication, host keys checked against known_hosts (unknown hosts refused),
timeouts, and clear errors. Commands are argument lists, quoted one by one for the remote shell; no user
string is ever pasted into a command line unquoted."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import socket
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from ..errors import DeviceError
from .config import SshConfig, ValidateConfig
from .suite import DEVICE_TESTS, TargetRun, _finish, bundle_files, device_files, load_results, suite_args
from .targets import Target

REQUIRED = ("numpy", "pytest")


def runtime_module(runtime: str) -> str:
    """What the target must import to have a runtime (litert: ai_edge_litert.interpreter, ...)."""
    from device_tests.runners import RUNNERS

    runner = RUNNERS.get(runtime)
    return (runner.module if runner else None) or runtime


def _pip_name(module: str) -> str:
    from device_tests.runners import RUNNERS

    return next((r.distribution or r.name for r in RUNNERS.values() if (r.module or r.name) == module), module)


class SshSession:
    """A connection to one target; a context manager (connect on enter, close on exit)."""

    def __init__(self, target: Target, cfg: SshConfig):
        self.target = target
        self.cfg = cfg
        self._client = None
        self._sftp = None

    def __enter__(self) -> "SshSession":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- connection ------------------------------------------------------------------------------------
    def connect(self) -> None:
        import paramiko

        t, cfg = self.target, self.cfg
        known_hosts = Path(os.path.expanduser(cfg.known_hosts or "~/.ssh/known_hosts"))
        client = paramiko.SSHClient()
        if known_hosts.is_file():
            client.load_host_keys(str(known_hosts))
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key_file = os.path.expanduser(cfg.key_file) if cfg.key_file else None
        if key_file and not Path(key_file).is_file():
            raise DeviceError(f"validate.ssh.key_file {key_file} does not exist.",
                              "Point it at the private key whose public half is in the target's authorized_keys.")
        try:
            client.connect(t.host, t.port, t.user, key_filename=key_file, timeout=cfg.connect_timeout_s,
                           banner_timeout=cfg.connect_timeout_s, auth_timeout=cfg.connect_timeout_s,
                           allow_agent=key_file is None, look_for_keys=key_file is None)
        except paramiko.BadHostKeyException:
            raise DeviceError(f"The host key of {t.host}:{t.port} does not match the one in {known_hosts}: the target "
                              "was reinstalled, or someone is in the middle.",
                              f"Check the target's fingerprint; if the change is expected, remove the old line "
                              f"(ssh-keygen -R '[{t.host}]:{t.port}' -f {known_hosts}).") from None
        except paramiko.AuthenticationException as exc:
            raise DeviceError(f"{t.user}@{t.host}:{t.port} refused the key ({exc}).",
                              "Add your public key to the target's ~/.ssh/authorized_keys, or set "
                              "validate.ssh.key_file.") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise DeviceError(f"{t.host}:{t.port} is not in {known_hosts}; edgesmith does not trust unknown hosts.",
                                  f"Verify the target's fingerprint, then add it: ssh-keyscan -p {t.port} {t.host} >> "
                                  f"{known_hosts} (or set validate.ssh.known_hosts).") from None
            raise DeviceError(f"SSH to {t.host}:{t.port} failed: {exc}.", "Check that an SSH server runs there.") from None
        except (socket.timeout, TimeoutError):
            raise DeviceError(f"{t.host}:{t.port} did not answer within {cfg.connect_timeout_s:.0f} s.",
                              "Check that the target is on and reachable, or raise validate.ssh.connect_timeout_s.") from None
        except OSError as exc:  # refused, no route, unknown host name (NoValidConnectionsError is one)
            raise DeviceError(f"Cannot reach {t.host}:{t.port} ({exc.strerror or exc}).",
                              "Check the target's address and port and that sshd runs there.") from None
        self._client = client

    def close(self) -> None:
        try:
            if self._sftp is not None:
                self._sftp.close()
            if self._client is not None:
                self._client.close()
        except Exception:  # noqa: BLE001 (a dead connection cannot be closed cleanly)
            pass
        self._client = self._sftp = None

    @contextmanager
    def step(self, what: str):
        """Turn a failure of the connection or of the target's filesystem while doing `what` into a DeviceError
        naming the target and the step (paramiko raises SSHException, sftp OSError/IOError, a lost link EOFError)."""
        import paramiko

        try:
            yield
        except (paramiko.SSHException, OSError, EOFError) as exc:
            detail = str(exc) or type(exc).__name__
            raise DeviceError(f"SSH to {self.target.spec} failed after connecting, while {what}: {detail}.",
                              "Check the target's disk space and the permissions of validate.ssh.workdir, and that "
                              "the connection stays up; the other targets' results are kept.") from None

    @property
    def sftp(self):
        if self._sftp is None:
            self._sftp = self._client.open_sftp()
        return self._sftp

    # -- commands and files ----------------------------------------------------------------------------
    def run(self, args: list[str], timeout: float) -> tuple[int, str]:
        """Run an argument list on the target; returns (exit code, stdout and stderr combined)."""
        channel = self._client.get_transport().open_session(timeout=self.cfg.connect_timeout_s)
        channel.set_combine_stderr(True)  # one stream: read continuously, so the remote side never blocks
        channel.exec_command(shlex.join(str(a) for a in args))
        chunks, deadline = [], time.monotonic() + timeout
        while not (channel.exit_status_ready() and not channel.recv_ready()):
            if channel.recv_ready():
                chunks.append(channel.recv(1 << 16))
            elif time.monotonic() > deadline:
                channel.close()
                raise DeviceError(f"`{args[0]} ...` on {self.target.spec} did not finish within {timeout:.0f} s.",
                                  "Raise validate.ssh.command_timeout_s or shorten validate.latency.")
            else:
                time.sleep(0.02)
        channel.settimeout(self.cfg.connect_timeout_s)
        try:
            while data := channel.recv(1 << 16):
                chunks.append(data)
        except socket.timeout:
            pass
        code = channel.recv_exit_status()
        channel.close()
        if code == -1 and not self._client.get_transport().is_active():
            # paramiko closes the channel of a dropped connection without an exit status: the target rebooted,
            # lost power or network, or its sshd was killed while the command ran.
            import paramiko

            raise paramiko.SSHException(f"the connection was lost while `{args[0]} ...` ran "
                                        f"(output so far: {b''.join(chunks).decode(errors='replace')[-300:]!r})")
        return code, b"".join(chunks).decode(errors="replace")

    def home(self) -> PurePosixPath:
        return PurePosixPath(self.sftp.normalize("."))

    def makedirs(self, path: PurePosixPath) -> None:
        for parent in reversed([path, *path.parents]):
            if str(parent) in ("/", "."):
                continue
            try:
                self.sftp.stat(str(parent))
            except FileNotFoundError:
                self.sftp.mkdir(str(parent))

    def upload(self, files: list[tuple[Path, PurePosixPath]]) -> None:
        for local, remote in files:
            self.makedirs(remote.parent)
            tmp = f"{remote}.part"
            self.sftp.put(str(local), tmp)
            self.sftp.posix_rename(tmp, str(remote))

    def remove(self, remote: PurePosixPath) -> None:
        try:
            self.sftp.remove(str(remote))
        except FileNotFoundError:
            pass

    def download(self, remote: PurePosixPath, local: Path) -> bool:
        tmp = local.with_name(f".{local.name}.part")
        try:
            self.sftp.get(str(remote), str(tmp))
        except FileNotFoundError:
            return False
        os.replace(tmp, local)
        return True


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(str(f).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def prepare(session: SshSession, python: str, requires: list[str], workdir: PurePosixPath,
            venv_dir: PurePosixPath, some_of: tuple[str, ...] = ()) -> dict:
    """Make (or reuse) the venv on the target and check that it has every package in `requires` and at least
    one runtime of `some_of`. The runtimes it lacks are left to the suite, which reports each artifact it
    could not run with them as a failed row (a board without a wheel for one runtime still runs the others)."""
    modules = [*requires, *(runtime_module(r) for r in some_of)]
    code, out = session.run([python, str(workdir / "device_tests" / "remote_env.py"), "--venv",
                             str(venv_dir), "--require", *modules],
                            timeout=session.cfg.command_timeout_s)
    if code == 127:
        raise DeviceError(f"The target {session.target.spec} has no Python at '{python}' ({out.strip()[-300:]}).",
                          "Set validate.ssh.python (or ?python=... in the target) to the target's Python 3 interpreter.")
    try:
        info = json.loads(out.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise DeviceError(f"Preparing the environment on {session.target.spec} failed: {out.strip()[-500:]}",
                          "Check that the target's Python is 3.9 or newer and has the venv module "
                          "(Debian: python3-venv).") from None
    if info.get("error"):
        raise DeviceError(f"The virtual environment on {session.target.spec} does not start: {info['error']}",
                          "Remove it on the target and retry, or set validate.ssh.python to another interpreter.")
    missing = dict(info["missing"])
    runtimes = [runtime_module(r) for r in some_of]
    if runtimes and all(m in missing for m in runtimes):
        fatal = missing
    else:  # a runtime that is absent while others are present is the suite's to report
        fatal = {m: why for m, why in missing.items() if m not in runtimes}
    if fatal:
        names = ", ".join(_pip_name(m) for m in fatal)
        why = "; ".join(fatal.values())
        raise DeviceError(f"The target {session.target.spec} lacks {names} for {python} ({why}).",
                          f"Install them on the target (e.g. {python} -m pip install {' '.join(_pip_name(m) for m in fatal)}), "
                          "or set validate.ssh.python to a Python that has them, or remove the runtime from "
                          "validate.runtimes.")
    info["missing_runtimes"] = sorted(r for r in some_of if runtime_module(r) in missing)
    return info


def stage_files(session: SshSession, cfg: ValidateConfig, files: list[tuple[Path, PurePosixPath]],
                python: str, requires: list[str], some_of: tuple[str, ...] = ()) -> tuple[PurePosixPath, dict]:
    """Upload files (plus device_tests/) into a run folder named by their content; prepare the venv."""
    base = PurePosixPath(cfg.ssh.workdir)
    with session.step("finding the home folder"):
        base = base if base.is_absolute() else session.home() / base
    devices = [(f, PurePosixPath("device_tests", *f.relative_to(DEVICE_TESTS).parts)) for f in device_files()]
    run_dir = base / "runs" / _digest([local for local, _ in files + devices])
    with session.step(f"copying the bundle and device_tests to {run_dir}"):
        session.upload([(local, run_dir / rel) for local, rel in files + devices])
    venv_dir = base / f"venv-{hashlib.sha256(python.encode()).hexdigest()[:8]}"  # one per interpreter
    with session.step(f"preparing the virtual environment {venv_dir}"):
        return run_dir, prepare(session, python, requires, run_dir, venv_dir, some_of)


def run_ssh(target: Target, bundle: Path, cfg: ValidateConfig, results: Path) -> TargetRun:
    """Copy bundle + device_tests, prepare the venv, run the suite, fetch results.json."""
    python = target.python or cfg.ssh.python
    files = [(bundle / f, PurePosixPath("bundle", *f.parts)) for f in bundle_files(bundle)]
    with SshSession(target, cfg.ssh) as session:
        run_dir, info = stage_files(session, cfg, files, python, list(REQUIRED), tuple(cfg.runtimes))
        remote_results = run_dir / "results.json"
        args = suite_args(info["venv_python"], str(run_dir / "device_tests"), str(run_dir / "bundle"),
                          str(remote_results), cfg) + (["--emulated"] if target.emulated else [])
        with session.step("running the device suite"):
            session.remove(remote_results)  # never fetch the results of an earlier run
            code, out = session.run(args, timeout=cfg.ssh.command_timeout_s)
        with session.step(f"fetching {remote_results}"):
            fetched = session.download(remote_results, results)
    run = _finish(target.spec, code, out, load_results(results) if fetched else None)
    run.setup = {"python": python, "venv_python": info["venv_python"], "versions": info["versions"],
                 "missing_runtimes": info["missing_runtimes"], "run_dir": str(run_dir), "emulated": target.emulated}
    return run


def run_measure_ssh(target: Target, cfg: ValidateConfig, files: list[tuple[Path, PurePosixPath]],
                    measure_args: list[str], runtime: str, out: Path) -> tuple[int, str]:
    """`edgesmith profile --target ssh://...`: one device_tests.measure run on the target. Paths in
    measure_args that start with '@/' are made relative to the remote run folder."""
    return run_module_ssh(target, cfg, files, "device_tests.measure", measure_args, runtime, out, "the measurement")


def run_module_ssh(target: Target, cfg: ValidateConfig, files: list[tuple[Path, PurePosixPath]], module: str,
                   module_args: list[str], runtime: str, out: Path, what: str) -> tuple[int, str]:
    """One connection: copy `files` and device_tests/, run `python -m module ... --out FILE` in the target's venv
    (which must have numpy and `runtime`), fetch FILE to `out`. Paths in module_args that start with '@/' are
    made relative to the remote run folder. Returns (exit code, output); raises DeviceError when nothing came back."""
    python = target.python or cfg.ssh.python
    with SshSession(target, cfg.ssh) as session:
        run_dir, info = stage_files(session, cfg, files, python, ["numpy", runtime_module(runtime)])
        remote_out = run_dir / out.name
        args = [str(run_dir / a[2:]) if a.startswith("@/") else a for a in module_args]
        with session.step(f"running {what}"):
            session.remove(remote_out)
            # `env PYTHONPATH=...` instead of `cd dir && ...`: still an argument list, no shell syntax.
            code, log = session.run(["env", f"PYTHONPATH={run_dir}", info["venv_python"], "-m",
                                     module, *args, "--out", str(remote_out)],
                                    timeout=cfg.ssh.command_timeout_s)
        with session.step(f"fetching {remote_out}"):
            fetched = session.download(remote_out, out)
        if not fetched:
            raise DeviceError(f"{what[0].upper()}{what[1:]} on {target.spec} wrote no result (exit {code}): "
                              f"{log.strip()[-800:]}", "Run the same command by hand on the target to see what fails.")
        return code, log
