"""The real ``ekms server`` with two worker processes: unseal and seal reach every worker, a
restart comes up sealed and decrypts what was wrapped before it, and the CLI drives it."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hvac
import hvac.exceptions
import pytest
import requests

from tests.support.ports import free_port

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[2]


class ServerProcess:
    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"}
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "api.cli", "server", "-config", str(self.config)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # The supervisor listens before its spawned workers have imported the app, so an early
        # health check may connect and then wait: that is "not ready yet", not a failure.
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                code = requests.get(f"{self.url}/v1/sys/health", timeout=5).status_code
                if code in (200, 501, 503):
                    return self
            except requests.RequestException:
                pass
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        log = self.log.read_text()[-3000:]
        self.stop()
        raise AssertionError("server did not start: " + log)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@pytest.fixture
def server_config(tmp_path: Path) -> tuple[Path, int]:
    port = free_port()
    config = tmp_path / "ekms.toml"
    config.write_text(
        f'data_dir = "{tmp_path / "data"}"\nlisten = "127.0.0.1:{port}"\nworkers = 2\n'
        'node_name = "home-1"\n'
    )
    (tmp_path / "data").mkdir()
    return config, port


@pytest.fixture
def ekms(server_config: tuple[Path, int], tmp_path: Path) -> Iterator[ServerProcess]:
    config, port = server_config
    server = ServerProcess(config, port, tmp_path / "server.log").start()
    yield server
    server.stop()


def cli(
    server: ServerProcess, *args: str, token: str | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VAULT_ADDR": server.url}
    if token:
        env["VAULT_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "api.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        check=False,
    )


def test_restart_unseal_with_another_subset_and_decrypt(
    ekms: ServerProcess, tmp_path: Path
) -> None:
    client = hvac.Client(url=ekms.url)
    assert requests.get(f"{ekms.url}/v1/sys/health", timeout=5).status_code == 501
    init = client.sys.initialize(secret_shares=5, secret_threshold=3)
    client.token, shares = init["root_token"], init["keys"]
    client.sys.submit_unseal_keys(shares[:3])
    client.secrets.transit.create_key("registry")
    context = base64.b64encode(b"dataset=land-register").decode()
    wrapped = [
        client.secrets.transit.generate_data_key("registry", "plaintext", context=context)["data"]
        for _ in range(12)  # spread over both workers
    ]
    status = cli(ekms, "operator", "status")
    assert status.returncode == 0, status.stderr
    assert "Sealed          false" in status.stdout
    listing = cli(ekms, "key", "list", token=client.token)
    assert listing.stdout.split() == ["registry"]
    client.adapter.close()

    ekms.stop()
    ekms.start()
    client = hvac.Client(url=ekms.url, token=init["root_token"])
    assert client.sys.is_sealed()
    for _ in range(6):
        with pytest.raises(hvac.exceptions.VaultDown):
            client.secrets.transit.read_key("registry")
    for index, share in enumerate(shares[2:]):
        share_file = tmp_path / f"share-{index}.txt"
        share_file.write_text(share + "\n")
        result = cli(ekms, "operator", "unseal", "--file", str(share_file))
        assert result.returncode == 0, result.stderr
    assert "Sealed          false" in result.stdout
    for item in wrapped:
        out = client.secrets.transit.decrypt_data(
            "registry", ciphertext=item["ciphertext"], context=context
        )
        assert out["data"]["plaintext"] == item["plaintext"]

    client.sys.seal()
    for _ in range(8):  # every worker is sealed, not just the one that took the request
        with pytest.raises(hvac.exceptions.VaultDown):
            client.secrets.transit.decrypt_data(
                "registry", ciphertext=wrapped[0]["ciphertext"], context=context
            )
    client.adapter.close()
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_generate_root_with_the_cli_and_revoke_self_on_every_worker(
    ekms: ServerProcess, tmp_path: Path
) -> None:
    client = hvac.Client(url=ekms.url)
    init = client.sys.initialize(secret_shares=5, secret_threshold=3)
    old, shares = init["root_token"], init["keys"]
    client.sys.submit_unseal_keys(shares[:3])
    client.adapter.close()
    generate = ("operator", "generate-root")

    start = cli(ekms, *generate, "-init", "-format", "json")
    assert start.returncode == 0, start.stderr
    attempt = json.loads(start.stdout)
    nonce, otp = attempt["nonce"], attempt["otp"]
    assert len(otp) == attempt["otp_length"]
    again = cli(ekms, *generate, "-init")
    assert again.returncode == 2
    assert "already in progress" in again.stderr
    # Each CLI run is a new connection, so the shares reach the supervisor's one attempt
    # through whichever worker accepts it.
    share_file = tmp_path / "share.txt"
    share_file.write_text(shares[3] + "\n")
    first = cli(ekms, *generate, "-nonce", nonce, "--file", str(share_file))
    assert first.returncode == 0, first.stderr
    assert "Progress        1/3" in first.stdout
    no_nonce = cli(ekms, *generate, "--file", str(share_file))
    assert no_nonce.returncode == 2
    assert "-nonce" in no_nonce.stderr
    duplicate = cli(ekms, *generate, "-nonce", nonce, "--file", "-", stdin=shares[3] + "\n")
    assert duplicate.returncode == 2
    assert "already submitted" in duplicate.stderr
    status = cli(ekms, *generate, "-status")
    assert "Progress        1/3" in status.stdout
    assert cli(ekms, *generate, "-nonce", nonce, "--file", "-", stdin=shares[4]).returncode == 0
    last = cli(ekms, *generate, "-nonce", nonce, "-format", "json", "--file", "-", stdin=shares[0])
    assert last.returncode == 0, last.stderr
    encoded = json.loads(last.stdout)["encoded_token"]
    wrong = cli(ekms, *generate, "-decode", encoded, "-otp", otp[:-1])
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("Error: the otp has")
    decoded = cli(ekms, *generate, "-decode", encoded, "-otp", otp)
    assert decoded.returncode == 0, decoded.stderr
    new = decoded.stdout.strip()
    assert new.startswith("ekms.")
    assert cli(ekms, *generate, "-cancel").stdout.startswith("Success!")

    def read(token: str) -> int:  # a fresh connection per request spreads them over workers
        return requests.get(
            f"{ekms.url}/v1/transit/keys/registry", headers={"X-Vault-Token": token}, timeout=10
        ).status_code

    created = requests.post(
        f"{ekms.url}/v1/transit/keys/registry", headers={"X-Vault-Token": new}, timeout=10
    )
    assert created.status_code == 200, created.text
    assert {read(old) for _ in range(12)} == {200}
    revoked = requests.post(
        f"{ekms.url}/v1/auth/token/revoke-self", headers={"X-Vault-Token": old}, timeout=10
    )
    assert revoked.status_code == 204
    assert {read(old) for _ in range(12)} == {403}
    assert {read(new) for _ in range(12)} == {200}
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def test_cli_errors_are_one_clear_line(ekms: ServerProcess) -> None:
    result = cli(ekms, "operator", "unseal", "no such share")
    assert result.returncode == 2
    assert result.stderr.startswith("Error: ")
    assert "Traceback" not in result.stderr
    result = cli(ekms, "operator", "unseal", "--file", "-", stdin="not a share either\n")
    assert result.returncode == 2
    assert result.stderr.startswith("Error: ")  # the share was read from stdin and sent
    result = cli(ekms, "operator", "unseal", stdin="")
    assert result.returncode == 2
    assert "no share given" in result.stderr
    result = cli(ekms, "key", "create", "x", token="ekms.nope")
    assert result.returncode == 2
    assert "permission denied" in result.stderr or "sealed" in result.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "api.cli", "operator", "status", "-address", "http://127.0.0.1:9"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert unreachable.returncode == 2
    assert "cannot reach" in unreachable.stderr


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ('listen = "127.0.0.1:8200"\nwokers = 2\n', "unknown setting(s): wokers"),
        ('listen = "0.0.0.0:8200"\n', "tls_disable"),
        ('listen = "127.0.0.1:8200"\nworkers = 0\n', "workers must be between"),
        ('listen = "127.0.0.1:8200"\nworkers = [\n', "not valid TOML"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(
    tmp_path: Path, config_text: str, message: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'data_dir = "{tmp_path}"\n' + config_text)
    result = subprocess.run(
        [sys.executable, "-m", "api.cli", "server", "-config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
