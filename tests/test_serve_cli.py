"""`spatialrl serve` as users run it: its own process and local Ray, loopback only, answering
over HTTP until SIGINT stops it cleanly; a missing token variable fails before Ray starts."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import yaml

from spatialrl.cli import main
from spatialrl.ports import free_port
from spatialrl.service.client import ServiceError, SpatialScoreClient

SPATIALRL = str(Path(sys.executable).parent / "spatialrl")
PROMPT = "a red circle to the left of a blue square"


def outward_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = sock.getsockname()[0]
    return None if address.startswith("127.") else address


@pytest.mark.ray
@pytest.mark.slow
def test_serve_answers_on_loopback_only_and_stops_on_sigint(tmp_path):
    config = tmp_path / "serve.yaml"
    port = free_port()
    config.write_text(yaml.safe_dump({
        "port": port, "ingress": {"cpus_per_replica": 0.25},
        "reward": {"kind": "shapes_rule", "serving": {
            "gpus_per_replica": 0, "cpus_per_replica": 0.25}},
    }))
    server = subprocess.Popen([SPATIALRL, "serve", "--config", str(config)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    client = SpatialScoreClient(f"http://127.0.0.1:{port}", timeout_s=30)
    try:
        for _ in range(150):
            try:
                assert client.ready()["model_version"] == "shapes_rule"
                break
            except (OSError, ServiceError):
                assert server.poll() is None, server.stdout.read()
                time.sleep(2)
        else:
            pytest.fail("the service did not get ready")
        image = np.full((64, 64, 3), 255, np.uint8)
        assert client.score_one(PROMPT, image).mu == 0.0  # nothing drawn: no relation holds

        if (address := outward_address()) is not None:
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((address, port), timeout=5).close()
    finally:
        server.send_signal(signal.SIGINT)
        output = server.communicate(timeout=120)[0]
    assert server.returncode == 0, output
    assert f"SpatialScore service at http://127.0.0.1:{port}" in output


def test_serve_without_its_token_variable_fails_naming_it(capsys, monkeypatch):
    monkeypatch.delenv("SPATIALRL_NO_SUCH_TOKEN", raising=False)
    code = main(["serve", "--set", "auth_token_env=SPATIALRL_NO_SUCH_TOKEN",
                 "--set", "reward.kind=shapes_rule"])
    assert code == 2
    assert "SPATIALRL_NO_SUCH_TOKEN is unset or empty" in capsys.readouterr().err
    assert not ray.is_initialized()
