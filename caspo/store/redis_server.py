"""A ``redis-server`` child process that the mesh starts itself when no ``CASPO_REDIS_URL`` is given.

    with LocalRedis("runs/mesh/redis") as r:
        store = PairStore(r.url)

The data directory holds an append-only file written with ``appendfsync always``; restarting on the
same directory (after a clean stop or a SIGKILL) replays it, so every acknowledged pair is back.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import redis

from caspo.netutil import free_port

REDIS_URL_ENV = "CASPO_REDIS_URL"
LOG_NAME = "redis-server.log"


class LocalRedis:
    """Starts and owns one ``redis-server`` process bound to 127.0.0.1 with its data in ``data_dir``."""

    HOST = "127.0.0.1"

    # what the ACL user (``username``) may do: the pair store's and the loop's keys, no admin commands
    ACL_RULES = ("~caspo:*", "resetchannels", "+@all", "-@dangerous")

    def __init__(self, data_dir: str | os.PathLike, port: int = 0, password: str | None = None, username: str | None = None):
        """``password`` alone protects the default user (``requirepass``); with ``username`` too, the
        default user is off and that ACL user (``ACL_RULES``) is the only way in, as in k8s/base/redis.yaml."""
        if username and not password:
            raise ValueError("a Redis ACL user needs a password")
        self.data_dir = Path(data_dir)
        self.requested_port = int(port)
        self.port: int | None = None
        self.password = password
        self.username = username
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def log_path(self) -> Path:
        return self.data_dir / LOG_NAME

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("LocalRedis is not started")
        user = quote(self.username, safe="") if self.username else ""
        auth = f"{user}:{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.HOST}:{self.port}/0"

    def _command(self, binary: str, port: int) -> list[str]:
        cmd = [
            binary,
            "--port", str(port),
            "--bind", self.HOST,
            "--dir", str(self.data_dir.resolve()),
            # Durability: with appendfsync always, Redis fsyncs the AOF before it replies to a write,
            # so a put that got its reply survives a SIGKILL of redis-server (or of the whole mesh).
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",  # no RDB snapshots: the AOF is the only (and complete) record
            "--daemonize", "no",
        ]
        if self.username:
            cmd += ["--user", "default", "off", "--user", self.username, "on", f">{self.password}", *self.ACL_RULES]
        elif self.password:
            cmd += ["--requirepass", self.password]
        return cmd

    def start(self, timeout: float = 20.0) -> "LocalRedis":
        if self.proc is not None and self.proc.poll() is None:
            return self
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "redis-server is not on PATH: install it (`apt-get install -y redis-server`) "
                f"or point the mesh at a running Redis with {REDIS_URL_ENV}=redis://host:port/0"
            )
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # A restart keeps the port it had, so URLs handed out stay valid. A picked free port can be taken
        # by someone else before redis binds it: then try another.
        fixed = self.requested_port or self.port
        attempts = 1 if fixed else 3
        for attempt in range(attempts):
            port = fixed or free_port(self.HOST)
            self._log = open(self.log_path, "ab")
            # own session: a Ctrl-C meant for the mesh must not stop Redis before the mesh is done with it
            self.proc = subprocess.Popen(
                self._command(binary, port),
                stdout=self._log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            self.port = port
            try:
                self._wait_ready(timeout)
                break
            except RuntimeError:
                exited = self.proc.poll() is not None
                self.stop()
                if not exited or attempt == attempts - 1 or "in use" not in self._log_tail():
                    raise
        atexit.register(self.stop)
        return self

    def _client(self) -> redis.Redis:
        return redis.Redis(
            host=self.HOST, port=self.port, username=self.username, password=self.password,
            socket_connect_timeout=0.5, socket_timeout=2.0, retry=None,
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        client = self._client()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self.proc.returncode} during start; "
                        f"log {self.log_path}:\n{self._log_tail()}"
                    )
                try:
                    if client.ping():
                        return
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass  # not listening yet, or still loading the AOF (BusyLoadingError)
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not answer PING within {timeout:.0f} s; "
                        f"log {self.log_path}:\n{self._log_tail()}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis's graceful SHUTDOWN: it flushes the AOF) and wait; SIGKILL if it hangs."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        elif proc is not None:
            proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "LocalRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def redis_url_or_start(run_dir: str | os.PathLike) -> tuple[str, LocalRedis | None]:
    """``$CASPO_REDIS_URL`` if set (nothing started), else a LocalRedis with its data in ``run_dir/redis``.

    The caller owns the returned LocalRedis and stops it."""
    url = os.environ.get(REDIS_URL_ENV)
    if url:
        return url, None
    local = LocalRedis(Path(run_dir) / "redis").start()
    return local.url, local
