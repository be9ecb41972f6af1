"""Run the load balancer's own directives (deploy/nginx.conf) against local processes.

No Docker engine runs in the tests, so the compose topology is reproduced with real
processes on 127.0.0.1. :func:`render_local_nginx_conf` turns ``deploy/nginx.conf`` into a
config for them by rewriting only the lines that name Docker things, as documented at the
top of that file:

==========================================  ===============================================
``deploy/nginx.conf``                       rendered
==========================================  ===============================================
``resolver 127.0.0.11 ...;``                ``upstream broker_local { zone ...; server
                                            127.0.0.1:PORT max_fails=0; ... }``
``set $broker_backend broker:3004;``        ``set $broker_backend broker_local;``
``listen 3004;``                            ``listen 127.0.0.1:LISTEN_PORT;``
``pid``, ``error_log``, ``access_log``,     files under ``workdir``
``*_temp_path``
==========================================  ===============================================

Every other directive (upgrade headers, timeouts, buffering, retries) is kept verbatim.
``max_fails=0`` keeps nginx from benching a node after one refused connection, as in
Docker where every DNS answer starts afresh; the shared ``zone`` makes the round-robin
exact across worker processes.

Typical use (the cluster builder, :mod:`tests.support.cluster`, does this)::

    binary = ensure_nginx()  # raises NginxUnavailable: pytest.skip(str(exc))
    with NginxProcess(binary, backend_ports=[p1, p2, p3], workdir=tmp) as nginx:
        ...  # clients connect to nginx.url
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.support.nodes import http_get
from tests.support.polling import wait_until_serving
from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO_ROOT / "deploy" / "nginx.conf"

#: The upstream group that replaces Docker's DNS name ``broker``.
LOCAL_UPSTREAM = "broker_local"

_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")

_Rewrite = Callable[[str], str]


class NginxUnavailable(RuntimeError):
    """nginx is not installed and this process cannot install it (the reason is the message)."""


def render_local_nginx_conf(
    *,
    backend_ports: Sequence[int],
    listen_port: int,
    workdir: Path,
    source: Path = NGINX_CONF,
) -> str:
    """``source`` with its Docker-specific lines rewritten for local processes.

    ``backend_ports``: the broker nodes, each listening on 127.0.0.1. ``listen_port``: where
    nginx listens (127.0.0.1). ``workdir``: an existing directory that receives the pid
    file, ``error.log``, ``access.log`` and the temp folders, so that nginx runs without
    privileges. Raises ``ValueError`` if a line to rewrite is missing from ``source`` or
    appears more than once (the file changed shape: update this module with it).
    """
    if not backend_ports:
        raise ValueError("at least one backend port is needed")
    work = workdir.resolve()

    def upstream(indent: str) -> str:
        inner = indent + "    "
        servers = "".join(
            f"{inner}server 127.0.0.1:{port} max_fails=0;\n" for port in backend_ports
        )
        return (
            f"{indent}upstream {LOCAL_UPSTREAM} {{\n"
            f"{inner}zone {LOCAL_UPSTREAM} 64k;\n"
            f"{servers}"
            f"{indent}}}"
        )

    rewrites: list[tuple[str, re.Pattern[str], _Rewrite]] = [
        ("resolver", _directive("resolver"), upstream),
        (
            "set $broker_backend",
            _directive(r"set\s+\$broker_backend"),
            lambda i: f"{i}set $broker_backend {LOCAL_UPSTREAM};",
        ),
        ("listen", _directive("listen"), lambda i: f"{i}listen 127.0.0.1:{listen_port};"),
        ("pid", _directive("pid"), lambda i: f"{i}pid {work / 'nginx.pid'};"),
        ("error_log", _directive("error_log"), lambda i: f"{i}error_log {work / 'error.log'};"),
        (
            "access_log",
            # `access_log off;` (the /lb-health location) is not a path: keep it.
            _directive(r"access_log(?!\s+off\s*;)"),
            lambda i: f"{i}access_log {work / 'access.log'};",
        ),
    ]
    for kind in _TEMP_KINDS:
        directive = f"{kind}_temp_path"
        rewrites.append((directive, _directive(directive), _put(directive, work / f"{kind}_temp")))

    lines = source.read_text(encoding="utf-8").splitlines()
    for name, pattern, rewrite in rewrites:
        hits = [n for n, line in enumerate(lines) if pattern.match(line)]
        if len(hits) != 1:
            raise ValueError(
                f"{source}: expected exactly one `{name}` line to rewrite, found {len(hits)}"
            )
        match = pattern.match(lines[hits[0]])
        assert match is not None
        lines[hits[0]] = rewrite(match.group("indent"))
    return "\n".join(lines) + "\n"


def write_local_nginx_conf(
    *,
    backend_ports: Sequence[int],
    listen_port: int,
    workdir: Path,
    source: Path = NGINX_CONF,
) -> Path:
    """Render (see :func:`render_local_nginx_conf`) into ``workdir/nginx.conf``; its path."""
    conf = workdir / "nginx.conf"
    conf.write_text(
        render_local_nginx_conf(
            backend_ports=backend_ports, listen_port=listen_port, workdir=workdir, source=source
        ),
        encoding="utf-8",
    )
    return conf


def nginx_command(nginx: Path, conf: Path) -> list[str]:
    """The argv that runs nginx in the foreground on ``conf`` (stop it with SIGTERM/SIGQUIT)."""
    return [str(nginx), "-p", str(conf.parent), "-c", str(conf), "-g", "daemon off;"]


class NginxProcess:
    """nginx running ``deploy/nginx.conf`` (rendered) in front of backends on 127.0.0.1.

    Its files (the rendered conf, logs, pid, temp folders) go to ``workdir``.
    """

    def __init__(
        self,
        binary: Path,
        *,
        backend_ports: Sequence[int],
        workdir: Path,
        listen_port: int | None = None,
    ) -> None:
        self.binary = binary
        self.backend_ports = list(backend_ports)
        self.workdir = workdir
        self.port = listen_port if listen_port is not None else free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The WebSocket URL clients are given."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> NginxProcess:
        """Start nginx and wait until it answers ``/lb-health``."""
        conf = write_local_nginx_conf(
            backend_ports=self.backend_ports, listen_port=self.port, workdir=self.workdir
        )
        with (self.workdir / "nginx.out").open("ab") as out:
            self.process = subprocess.Popen(
                nginx_command(self.binary, conf), stdout=out, stderr=subprocess.STDOUT
            )
        wait_until_serving(
            self.process,
            lambda: http_get(self.http + "/lb-health", timeout=0.5)[0] == 200,
            timeout=timeout,
            message=f"nginx on port {self.port} to answer /lb-health",
            output=self.log,
        )
        return self

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a fast shutdown), SIGKILL if it takes longer than ``timeout``."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout)

    def log(self) -> str:
        """What nginx wrote: its output and its error log."""
        parts = []
        for name in ("nginx.out", "error.log"):
            path = self.workdir / name
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    def __enter__(self) -> NginxProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def find_nginx() -> Path | None:
    """The nginx binary on PATH or in /usr/sbin (not on a non-root PATH), if any."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    return Path(found) if found else None


def ensure_nginx(*, timeout: float = 600.0) -> Path:
    """The nginx binary, installed with apt-get first if it is missing and we are root.

    Raises :class:`NginxUnavailable` (its message says why) when nginx is missing and
    cannot be installed here.
    """
    found = find_nginx()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise NginxUnavailable("nginx is not installed and installing it needs root")
    apt_get = shutil.which("apt-get")
    if apt_get is None:
        raise NginxUnavailable("nginx is not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Debian's postinst would start a system nginx on port 80; policy-rc.d vetoes that
    # (many images already ship one; add it only for the install if not).
    policy = Path("/usr/sbin/policy-rc.d")
    added_policy = not policy.exists()
    if added_policy:
        policy.write_text("#!/bin/sh\nexit 101\n", encoding="utf-8")
        policy.chmod(0o755)
    try:
        for argv in (
            [apt_get, "update"],
            [apt_get, "install", "-y", "--no-install-recommends", "nginx"],
        ):
            result = subprocess.run(
                argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
            if result.returncode != 0:
                raise NginxUnavailable(
                    f"`{' '.join(argv)}` failed ({result.returncode}): {result.stderr[-2000:]}"
                )
    finally:
        if added_policy:
            policy.unlink(missing_ok=True)
    found = find_nginx()
    if found is None:
        raise NginxUnavailable("apt-get installed nginx but no nginx binary was found")
    return found


def _put(directive: str, path: Path) -> _Rewrite:
    """A rewrite to ``directive path;`` at the original indentation."""
    return lambda indent: f"{indent}{directive} {path};"


def _directive(name: str) -> re.Pattern[str]:
    """A whole line holding one ``name ...;`` directive (comments never match)."""
    return re.compile(rf"^(?P<indent>[ \t]*){name}(?:\s+[^;#]*)?;[ \t]*(?:#.*)?$")
