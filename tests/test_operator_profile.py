"""The operator profile, and the operator commands over mutual TLS against a real Mosquitto.

Resolution (flag, then ``EDGEFLEET_*`` variable, then profile file, then default) is checked
on ``resolve_profile`` and through ``edgefleet profile show``; refusals and warnings through
``edgefleet`` in this process (``main``). The TLS tests run the console script against a
broker in the production shape (client certificates required, CN as username, the
generated ACL, no anonymous clients), with certificates made here by ``provisioning.pki``.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import yaml
from broker import ClientTls, Mosquitto, MqttProbe
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import ValidationError

from edgefleet.agent.protocol import CommandReply, CommandRequest, EventMessage, ModelRef, Topics
from edgefleet.ops.cli import main
from edgefleet.ops.errors import exit_code
from edgefleet.ops.profile import (
    ENV_VARIABLES,
    PROFILE_ENV,
    OperatorProfile,
    ProfileError,
    resolve_profile,
)
from edgefleet.provisioning import TlsFiles, render_acl
from edgefleet.provisioning.pki import (
    Issued,
    create_ca,
    generate_key,
    issue_certificate,
    write_certificate,
    write_private_key,
)

EDGEFLEET = Path(sys.executable).with_name("edgefleet")
ROOT = "edgefleet/v1"
BAD_INPUT, FAILED = 2, 1
NO_FLAGS: dict[str, object] = {}


@pytest.fixture(autouse=True)
def no_operator_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No EDGEFLEET_* variable and no profile file in the default place, unless a test sets one."""
    for variable in (*ENV_VARIABLES.values(), PROFILE_ENV):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def write_profile(path: Path, **fields: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in fields.items()})
    )
    return path


# -- resolution ---------------------------------------------------------------------------


def test_a_flag_beats_a_variable_which_beats_the_file_which_beats_the_default(
    tmp_path: Path,
) -> None:
    profile = write_profile(
        tmp_path / "operator.yaml", host="file-host", port=1111, topic_root="file/v1"
    )
    environ = {"EDGEFLEET_HOST": "env-host", "EDGEFLEET_PORT": "2222"}

    resolved = resolve_profile({"host": "flag-host"}, profile_file=profile, environ=environ)

    p = resolved.profile
    assert (p.host, p.port, p.topic_root, p.insecure) == ("flag-host", 2222, "file/v1", False)
    assert resolved.source("host") == "--host"
    assert resolved.source("port") == "EDGEFLEET_PORT"
    assert resolved.source("topic_root") == str(profile)
    assert resolved.source("insecure") == "default"


def test_without_any_source_the_defaults_are_localhost_8883_and_the_fleet_root(
    tmp_path: Path,
) -> None:
    resolved = resolve_profile(NO_FLAGS, environ={"XDG_CONFIG_HOME": str(tmp_path)})

    p = resolved.profile
    assert (p.host, p.broker_port, p.topic_root, p.cafile) == ("localhost", 8883, ROOT, None)
    assert resolved.file is None


def test_insecure_without_a_port_means_the_plain_port(tmp_path: Path) -> None:
    resolved = resolve_profile({"insecure": True}, environ={"XDG_CONFIG_HOME": str(tmp_path)})

    assert resolved.profile.broker_port == 1883


def test_the_profile_in_the_config_directory_is_read_and_its_relative_paths_resolve_there(
    tmp_path: Path,
) -> None:
    profile = write_profile(
        tmp_path / "config" / "edgefleet" / "operator.yaml",
        cafile="ca/ca.crt", certfile="operators/controller.crt", keyfile="/abs/controller.key",
    )  # fmt: skip

    resolved = resolve_profile(NO_FLAGS, environ={"XDG_CONFIG_HOME": str(tmp_path / "config")})

    assert resolved.file == profile
    assert resolved.profile.cafile == profile.parent / "ca" / "ca.crt"
    assert resolved.profile.certfile == profile.parent / "operators" / "controller.crt"
    assert resolved.profile.keyfile == Path("/abs/controller.key")


def test_profile_flag_beats_the_profile_variable_which_beats_the_config_directory(
    tmp_path: Path,
) -> None:
    write_profile(tmp_path / "config" / "edgefleet" / "operator.yaml", host="config-dir")
    named = write_profile(tmp_path / "named.yaml", host="named")
    flagged = write_profile(tmp_path / "flagged.yaml", host="flagged")
    environ = {"XDG_CONFIG_HOME": str(tmp_path / "config"), PROFILE_ENV: str(named)}

    assert resolve_profile(NO_FLAGS, environ=environ).profile.host == "named"
    assert resolve_profile(NO_FLAGS, profile_file=flagged, environ=environ).profile.host == (
        "flagged"
    )


def test_insecure_comes_from_the_variable_too(tmp_path: Path) -> None:
    environ = {"EDGEFLEET_INSECURE": "1", "XDG_CONFIG_HOME": str(tmp_path)}

    resolved = resolve_profile(NO_FLAGS, environ=environ)

    assert resolved.profile.insecure is True
    assert resolved.source("insecure") == "EDGEFLEET_INSECURE"


def test_profile_show_says_where_each_value_came_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = write_profile(tmp_path / "operator.yaml", host="broker.lan", topic_root="shop/v1")
    monkeypatch.setenv("EDGEFLEET_PORT", "9883")

    code = main(["profile", "show", "--profile", str(profile), "--topic-root", "lab/v1"])

    shown = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()}
    assert code == 0
    assert shown["host"] == ["broker.lan", str(profile)]
    assert shown["port"] == ["9883", "EDGEFLEET_PORT"]
    assert shown["topic_root"] == ["lab/v1", "--topic-root"]
    assert shown["insecure"] == ["false", "default"]
    assert shown["connects"][:2] == ["not", "at"]  # no TLS files: it would refuse


# -- what does not hold -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("hots: broker.lan\n", "hots: unknown field"),
        ("port: eighty\n", "port: Input should be a valid integer"),
        ("topic_root: 'shop/#'\n", "topic_root: Value error, a topic root has no wildcards"),
        ("host: [broker\n", "not valid YAML"),
        ("- host\n", "a profile is a mapping of fields"),
    ],
)
def test_a_malformed_profile_exits_2_naming_the_file_and_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, phrase: str
) -> None:
    profile = tmp_path / "operator.yaml"
    profile.write_text(text)

    code = main(["cmd", "dev1", "ping", "--profile", str(profile)])

    err = capsys.readouterr().err
    assert code == BAD_INPUT
    assert f"edgefleet: error: {profile}: " in err
    assert phrase in err


def test_a_profile_asked_for_that_is_not_there_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["watch", "--profile", str(tmp_path / "nowhere.yaml")])

    err = capsys.readouterr().err
    assert code == BAD_INPUT
    assert f"{tmp_path / 'nowhere.yaml'}: no such profile file" in err


def test_a_bad_variable_exits_2_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEFLEET_PORT", "https")

    code = main(["cmd", "dev1", "ping", "--insecure"])

    assert code == BAD_INPUT
    assert "environment: EDGEFLEET_PORT: Input should be a valid integer" in capsys.readouterr().err


def test_a_bad_flag_value_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["cmd", "dev1", "ping", "--insecure", "--port", "70000"])

    assert code == BAD_INPUT
    assert "--port: Input should be less than or equal to 65535" in capsys.readouterr().err


def test_without_tls_files_or_insecure_every_broker_command_refuses_and_says_how_to_get_a_profile(
    capsys: pytest.CaptureFixture[str],
) -> None:
    commands = [
        ["cmd", "dev1", "ping"],
        ["watch", "--seconds", "1"],
        ["transfer", "clear", "0" * 64],
        ["undeploy", "dev1", "door"],
    ]
    for command in commands:
        code = main(command)

        err = capsys.readouterr().err
        assert code == BAD_INPUT, command
        assert "no TLS certificates to connect to the broker with" in err
        assert "'edgefleet provision init DIR' writes DIR/operator.yaml" in err
        assert "~/.config/edgefleet/operator.yaml or pass --profile" in err
        assert "pass --insecure" in err


def test_some_tls_files_without_the_others_exit_2_naming_the_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["cmd", "dev1", "ping", "--cafile", str(tmp_path / "ca.crt")])

    err = capsys.readouterr().err
    assert code == BAD_INPUT
    assert "certfile, keyfile missing (given: cafile (from --cafile))" in err


def test_insecure_connects_plain_with_one_warning_line(
    broker: Mosquitto, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["watch", "--insecure", "--port", str(broker.port), "--seconds", "0.5"])

    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert code == 0, err
    assert warnings == [
        f"edgefleet: warning: insecure (--insecure): plain MQTT to localhost:{broker.port}, no "
        "TLS, no client certificate; anyone on the network can read and forge this traffic"
    ]


def test_insecure_from_the_variable_warns_naming_it(
    broker: Mosquitto, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEFLEET_INSECURE", "1")
    monkeypatch.setenv("EDGEFLEET_PORT", str(broker.port))

    code = main(["cmd", "dev1", "ping", "--timeout", "0.2"])

    err = capsys.readouterr().err
    assert code == FAILED  # nobody answers: the connection itself worked
    assert "no reply from dev1" in err
    assert err.count("edgefleet: warning: insecure (EDGEFLEET_INSECURE)") == 1


# -- over mutual TLS, against a real broker -----------------------------------------------


@dataclass(frozen=True)
class FleetPki:
    """The fleet CA, the broker's certificate, the controller's and dev1's, and a stranger CA."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def stranger_ca(self) -> Path:
        return self.directory / "stranger-ca.crt"

    def files(self, name: str) -> tuple[Path, Path]:
        return self.directory / f"{name}.crt", self.directory / f"{name}.key"

    def broker_tls(self) -> TlsFiles:
        cert, key = self.files("broker")
        return TlsFiles(cafile=self.ca, certfile=cert, keyfile=key)

    def client(self, name: str) -> ClientTls:
        cert, key = self.files(name)
        return ClientTls(self.ca, cert, key)

    def profile(
        self, path: Path, broker: Mosquitto, *, name: str = "controller", **fields: object
    ) -> Path:
        """An operator profile as ``provision init`` writes one: absolute paths."""
        cert, key = self.files(name)
        values: dict[str, object] = {
            "host": broker.host, "port": broker.port, "cafile": self.ca, "certfile": cert,
            "keyfile": key,
        }  # fmt: skip
        return write_profile(path, **{**values, **fields})


def _issue(
    directory: Path, ca: Issued, name: str, *, server_names: Sequence[str] = (), client: bool = True
) -> None:
    key = generate_key()
    certificate = issue_certificate(
        ca, key.public_key(), name, days=2, server_names=server_names, client=client
    )
    write_private_key(directory / f"{name}.key", key)
    write_certificate(directory / f"{name}.crt", certificate)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    directory = tmp_path_factory.mktemp("pki")
    ca = create_ca("edgefleet test CA", days=2)
    write_certificate(directory / "ca.crt", ca.certificate)
    _issue(directory, ca, "broker", server_names=["127.0.0.1", "localhost"], client=False)
    _issue(directory, ca, "controller")
    _issue(directory, ca, "dev1")
    stranger = create_ca("another fleet's CA", days=2)
    write_certificate(directory / "stranger-ca.crt", stranger.certificate)
    _issue(directory, stranger, "intruder")
    return FleetPki(directory)


@pytest.fixture
def tls_broker(tmp_path: Path, mosquitto_binary: Path, pki: FleetPki) -> Iterator[Mosquitto]:
    """The production shape: TLS, client certificates, CN as username, the ACL, no anonymous."""
    (tmp_path / "acl").write_text(render_acl())
    overrides = {"acl_file": tmp_path / "acl", "allow_anonymous": False}
    with Mosquitto(
        tmp_path / "broker", tls=pki.broker_tls(), settings_overrides=overrides
    ) as broker:
        yield broker


def edgefleet(*args: object, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EDGEFLEET), *map(str, args)],
        capture_output=True, text=True, timeout=timeout_s, check=False,
    )  # fmt: skip


class Answering:
    """dev1 over TLS, answering every command addressed to it (paho's network thread)."""

    def __init__(self, broker: Mosquitto, pki: FleetPki) -> None:
        self.topics = Topics("dev1")
        self.probe = MqttProbe(broker, "dev1", tls=pki.client("dev1"))
        self.probe.client.on_message = self._on_message

    def __enter__(self) -> Answering:
        self.probe.connect()
        self.probe.subscribe(self.topics.commands)
        return self

    def __exit__(self, *exc: object) -> None:
        self.probe.disconnect()

    def _on_message(self, client: object, userdata: object, message: object) -> None:
        request = CommandRequest.model_validate_json(message.payload)  # type: ignore[attr-defined]
        properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        properties.CorrelationData = request.id.encode()
        reply = CommandReply(
            id=request.id, command="ping", ok=True, message="pong over TLS", ts=time.time()
        )
        assert request.reply_to is not None
        self.probe.client.publish(
            request.reply_to, reply.model_dump_json(), qos=1, properties=properties
        )


def test_private_keys_made_for_these_tests_are_0600(pki: FleetPki) -> None:
    for name in ("broker", "controller", "dev1", "intruder"):
        _, key = pki.files(name)
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key


def test_cmd_with_the_profile_reaches_a_device_over_mutual_tls(
    tls_broker: Mosquitto, pki: FleetPki, tmp_path: Path
) -> None:
    profile = pki.profile(tmp_path / "operator.yaml", tls_broker)

    with Answering(tls_broker, pki):
        result = edgefleet("cmd", "dev1", "ping", "--profile", profile, "--json")

    assert result.returncode == 0, result.stderr
    assert CommandReply.model_validate_json(result.stdout).message == "pong over TLS"
    assert "warning" not in result.stderr


def test_cmd_takes_the_profile_from_the_config_directory_and_variables(
    tls_broker: Mosquitto, pki: FleetPki, tmp_path: Path
) -> None:
    config = tmp_path / "config"
    # A wrong port in the profile, which the variable overrides.
    pki.profile(config / "edgefleet" / "operator.yaml", tls_broker, port=1)
    env = {**os.environ, "XDG_CONFIG_HOME": str(config), "EDGEFLEET_PORT": str(tls_broker.port)}

    with Answering(tls_broker, pki):
        result = subprocess.run(
            [str(EDGEFLEET), "cmd", "dev1", "ping"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=env,
        )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert "pong over TLS" in result.stdout


def test_watch_with_the_profile_prints_a_devices_event_over_mutual_tls(
    tls_broker: Mosquitto, pki: FleetPki, tmp_path: Path
) -> None:
    profile = pki.profile(tmp_path / "operator.yaml", tls_broker)
    command = [str(EDGEFLEET), "watch", "--profile", str(profile), "--count", "1"]

    with (
        Lines(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ) as watch,
        MqttProbe(tls_broker, "dev1", tls=pki.client("dev1")) as device,
    ):
        watch.wait_for("err", "watching")
        device.publish(f"{ROOT}/dev1/events/door", _event())
        code = watch.finish()

    assert code == 0, watch.err
    assert any("dev1/door event" in line and "person 0.81" in line for line in watch.out)
    assert "1 event(s)" in watch.err


def test_a_wrong_ca_fails_saying_the_broker_does_not_verify_against_it(
    tls_broker: Mosquitto, pki: FleetPki, tmp_path: Path
) -> None:
    profile = pki.profile(tmp_path / "operator.yaml", tls_broker, cafile=pki.stranger_ca)

    for command in (["cmd", "dev1", "ping"], ["watch", "--seconds", "5"]):
        result = edgefleet(*command, "--profile", profile)

        assert result.returncode == FAILED, result.stderr
        assert (
            f"presented a certificate that does not verify against {pki.stranger_ca}"
            in result.stderr
        )
        assert f"cafile (from {profile})" in result.stderr
        assert "check that cafile is the fleet's CA" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_certificate_from_another_ca_is_turned_away_with_what_to_check(
    tls_broker: Mosquitto, pki: FleetPki, tmp_path: Path
) -> None:
    profile = pki.profile(tmp_path / "operator.yaml", tls_broker, name="intruder")

    for command in (["cmd", "dev1", "ping"], ["watch", "--seconds", "30"]):
        result = edgefleet(*command, "--profile", profile)

        assert result.returncode == FAILED, result.stderr
        assert "closed the TLS connection before accepting it" in result.stderr
        assert "is issued by the broker's CA, has not expired and is not revoked" in result.stderr
        assert "Traceback" not in result.stderr


def test_a_plain_connection_to_the_tls_port_fails_clearly(
    tls_broker: Mosquitto, pki: FleetPki
) -> None:
    options = ["--insecure", "--host", tls_broker.host, "--port", str(tls_broker.port)]

    for command in (["cmd", "dev1", "ping"], ["watch", "--seconds", "30"]):
        result = edgefleet(*command, *options)

        assert result.returncode == FAILED, result.stderr
        assert "closed the plain connection before accepting it" in result.stderr
        assert "a TLS listener drops plain clients" in result.stderr
        assert result.stderr.count("edgefleet: warning: insecure") == 1


def test_tls_to_a_plain_port_fails_in_the_handshake(
    broker: Mosquitto, pki: FleetPki, tmp_path: Path
) -> None:
    profile = pki.profile(tmp_path / "operator.yaml", broker)

    result = edgefleet("cmd", "dev1", "ping", "--profile", profile)

    assert result.returncode == FAILED, result.stderr
    assert "the TLS handshake with the broker at" in result.stderr
    assert "and not a plain one" in result.stderr


def test_a_next_step_printed_repeats_the_profile_option(
    tls_broker: Mosquitto, pki: FleetPki, tmp_path: Path
) -> None:
    profile = pki.profile(tmp_path / "operator.yaml", tls_broker)

    result = edgefleet("cmd", "dev1", "ping", "--timeout", "0.2", "--profile", profile)

    assert result.returncode == FAILED
    assert f"edgefleet watch --device dev1 --profile {profile}" in result.stderr


def test_a_key_that_is_not_the_certificates_exits_2(
    tls_broker: Mosquitto, pki: FleetPki, tmp_path: Path
) -> None:
    _, other_key = pki.files("dev1")
    profile = pki.profile(tmp_path / "operator.yaml", tls_broker, keyfile=other_key)

    result = edgefleet("cmd", "dev1", "ping", "--profile", profile)

    assert result.returncode == BAD_INPUT, result.stderr
    assert "cannot load the client certificate" in result.stderr


def test_every_profile_field_is_described_and_unknown_ones_are_refused() -> None:
    schema = OperatorProfile.model_json_schema()

    assert all("description" in field for field in schema["properties"].values())
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        OperatorProfile.model_validate({"hostname": "x"})


def test_a_profile_error_is_bad_input() -> None:
    assert exit_code(ProfileError("x")) == BAD_INPUT


# -- helpers ------------------------------------------------------------------------------


def _event() -> bytes:
    model = ModelRef(
        id="ssd", version="3", sha256="0" * 64, task="detection", backend="litert 2.3.0",
        delegate="cpu",
    )  # fmt: skip
    now = time.time()
    message = EventMessage(
        id="a" * 32, device_id="dev1", stream="door", seq=1, kind="detection", lifecycle="start",
        track_id=7, label="person", score=0.81, model=model, capture_ts=now - 0.02,
        inference_ts=now, latency_ms=20.0, inference_ms=8.0,
    )  # fmt: skip
    return message.model_dump_json().encode()


class Lines:
    """A child process's stdout and stderr, read line by line as they come (reader threads)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(
                target=self._read, args=(pipe, lines), name=f"read-{name}", daemon=True
            )
            for name, pipe, lines in (
                ("out", process.stdout, self.out),
                ("err", process.stderr, self.err),
            )
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, pipe: IO[str] | None, lines: list[str]) -> None:
        assert pipe is not None
        for line in pipe:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def wait_for(self, which: str, text: str, timeout_s: float = 30) -> None:
        lines = self.out if which == "out" else self.err
        with self._changed:
            found = self._changed.wait_for(lambda: any(text in line for line in lines), timeout_s)
        assert found, f"no {text!r} on std{which} within {timeout_s} s: {self.out} {self.err}"

    def finish(self, timeout_s: float = 30) -> int:
        code = self.process.wait(timeout=timeout_s)
        for reader in self._readers:
            reader.join(timeout=timeout_s)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        return code

    def __enter__(self) -> Lines:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.finish()


def test_an_operator_key_others_can_read_exits_2_naming_the_chmod(
    tls_broker: Mosquitto, pki: FleetPki, tmp_path: Path
) -> None:
    _, key = pki.files("controller")
    exposed = tmp_path / "controller.key"
    exposed.write_bytes(key.read_bytes())
    exposed.chmod(0o644)
    profile = pki.profile(tmp_path / "operator.yaml", tls_broker, keyfile=exposed)

    result = edgefleet("cmd", "dev1", "ping", "--profile", profile)

    assert result.returncode == BAD_INPUT, result.stderr
    assert f"chmod 600 {exposed}" in result.stderr
