"""A ``dagster-webserver`` over this repository's workspace in a child process, for the UI test and the screenshot
script (bench/ui_screenshots.py): started on 127.0.0.1 on a free port, ready once ``/server_info`` answers and the
code location has loaded, queried through ``/graphql``, stopped (with its code server) on exit.

Choices:
- The child gets its own process group so that stopping it also stops the gRPC code server it spawns; SIGTERM
  first (the webserver shuts its code server down), SIGKILL after a grace period.
- Ready means the location is LOADED in the workspace, not only that HTTP answers: the first GraphQL query after
  start would otherwise race the code server's import of the definitions.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Mapping

REPO = Path(__file__).resolve().parents[1]
LOCATION = "anomaly_forge"

_LOCATION_STATUS = """
{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UIServer:
    def __init__(self, dagster_home: Path, env: Mapping[str, str] | None = None, port: int | None = None,
                 log: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DAGSTER_HOME": str(dagster_home), **(env or {})}
        self.log = log or Path(dagster_home) / "webserver.log"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "UIServer":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self, timeout: float = 180.0) -> None:
        cmd = [sys.executable, "-m", "dagster_webserver", "-w", str(REPO / "workspace.yaml"),
               "-h", "127.0.0.1", "-p", str(self.port)]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited with {self.proc.returncode}; see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.url}/server_info", timeout=5):
                    pass
                entries = self.graphql(_LOCATION_STATUS)["workspaceOrError"]["locationEntries"]
                entry = next((e for e in entries if e["name"] == LOCATION), None)
                if entry and entry["loadStatus"] == "LOADED":
                    loaded = entry["locationOrLoadError"]
                    if loaded["__typename"] == "PythonError":
                        raise RuntimeError(f"code location {LOCATION} failed to load: {loaded['message']}")
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"dagster-webserver did not serve {LOCATION} within {timeout:.0f} s; see {self.log}")

    def graphql(self, query: str, variables: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body = json.dumps({"query": query, "variables": dict(variables or {})}).encode()
        req = urllib.request.Request(f"{self.url}/graphql", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())
        if answer.get("errors"):
            raise RuntimeError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def stop(self, grace: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait(10)
        try:  # the code server may outlive the webserver by a moment
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
