"""The fleet broker's configuration against a real Mosquitto: each attack tried and refused.

The broker runs the project's generated fleet config (three TLS listeners, one CA each,
per-listener ACLs: provisioning.mosquitto.fleet_listeners); the certificates come from
provisioning.pki. Every test makes the attempt a hostile device (or stranger) would make and
checks the broker refused it, with a control message showing the path itself works.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import ClientTls, MqttProbe
from fleetbroker import ROOT, FleetBroker, FleetPki, make_fleet_pki, run_fleet_broker

from edgefleet.agent.mqtt import close_client
from edgefleet.agent.protocol import enroll_answer_topic, enroll_request_topic, key_set_topic
from edgefleet.provisioning import pki


@pytest.fixture(scope="module")
def fleet_pki(tmp_path_factory: pytest.TempPathFactory) -> FleetPki:
    """The fleet's CAs and certificates (devices dev1, dev2, dev3; see fleetbroker)."""
    return make_fleet_pki(tmp_path_factory.mktemp("fleet-pki"))


@pytest.fixture
def fleet_broker(
    tmp_path: Path, mosquitto_binary: Path, fleet_pki: FleetPki
) -> Iterator[FleetBroker]:
    """The fleet broker in its production shape, on free loopback ports."""
    with run_fleet_broker(tmp_path / "broker", fleet_pki) as broker:
        yield broker


def _device(broker: FleetBroker, pki_: FleetPki, name: str, client_id: str = "") -> MqttProbe:
    return MqttProbe(broker.mosquitto, client_id, port=broker.device_port, tls=pki_.client(name))


def _controller(broker: FleetBroker, pki_: FleetPki) -> MqttProbe:
    tls = pki_.client("controller")
    return MqttProbe(broker.mosquitto, port=broker.operator_port, tls=tls)


def _claim(broker: FleetBroker, pki_: FleetPki, session: str) -> MqttProbe:
    return MqttProbe(broker.mosquitto, session, port=broker.claim_port, tls=pki_.client("claim"))


def _marker(probe: MqttProbe, name: str) -> None:
    """Publish a marker on the device's own events: once the listener has it, earlier
    messages from ``probe`` were delivered or dropped (one client's messages stay in order)."""
    assert not probe.publish(f"{ROOT}/{name}/events/marker", b"after").is_failure


def test_a_device_reusing_another_devices_client_id_does_not_disconnect_it(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    with _device(fleet_broker, fleet_pki, "dev2", "edgefleet-dev2") as dev2:
        with _device(fleet_broker, fleet_pki, "dev1", "edgefleet-dev2") as dev1:
            assert not dev1.publish(f"{ROOT}/dev1/events/x", b"own").is_failure
            # dev2 still holds its connection: a publish of its own goes through.
            assert not dev2.publish(f"{ROOT}/dev2/events/x", b"still here").is_failure

        assert dev2.disconnections == 0


def test_a_device_can_neither_read_nor_write_another_devices_topics(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    with (
        _controller(fleet_broker, fleet_pki) as controller,
        _device(fleet_broker, fleet_pki, "dev1") as dev1,
        _device(fleet_broker, fleet_pki, "dev2") as dev2,
    ):
        controller.subscribe(f"{ROOT}/#")
        dev1.subscribe(f"{ROOT}/dev2/#")
        dev1.subscribe(f"{ROOT}/+/cmd/#")

        forged = dev1.publish(f"{ROOT}/dev2/events/x", b"forged")
        own = controller.publish(f"{ROOT}/dev2/cmd/reboot", b"{}")
        dev2.publish(f"{ROOT}/dev2/events/x", b"real")
        _marker(dev1, "dev1")
        controller.wait_for_message(f"{ROOT}/dev1/events/marker")
        controller.publish(f"{ROOT}/dev1/cmd/marker", b"{}")
        dev1.wait_for_message(f"{ROOT}/dev1/cmd/marker")

        assert forged.getName() == "Not authorized"
        assert not own.is_failure
        assert [m.payload for m in controller.messages(f"{ROOT}/dev2/events/x")] == [b"real"]
        assert dev1.messages(f"{ROOT}/dev2/cmd/reboot") == []
        assert dev1.messages(f"{ROOT}/dev2/events/x") == []


@pytest.mark.parametrize(
    "suffix",
    ["dev1/cmd/reboot", "dev2/cmd/reboot", "dev1/desired", "_models/abc/0", "_trust/keyset",
     "dev1/renew/answer"],
)  # fmt: skip
def test_a_device_cannot_write_what_only_the_controller_writes(
    fleet_broker: FleetBroker, fleet_pki: FleetPki, suffix: str
) -> None:
    with (
        _controller(fleet_broker, fleet_pki) as controller,
        _device(fleet_broker, fleet_pki, "dev1") as dev1,
    ):
        controller.subscribe(f"{ROOT}/#")

        refused = dev1.publish(f"{ROOT}/{suffix}", b"forged", retain=True)
        _marker(dev1, "dev1")
        controller.wait_for_message(f"{ROOT}/dev1/events/marker")

        assert refused.getName() == "Not authorized"
        assert controller.messages(f"{ROOT}/{suffix}") == []


def test_every_device_reads_the_trust_data_the_controller_publishes(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    with _controller(fleet_broker, fleet_pki) as controller:
        ack = controller.publish(key_set_topic(ROOT), b'{"set": 1}', retain=True)
    with _device(fleet_broker, fleet_pki, "dev3") as dev3:
        dev3.subscribe(key_set_topic(ROOT))

        assert not ack.is_failure
        assert dev3.wait_for_message(key_set_topic(ROOT)).payload == b'{"set": 1}'


def test_an_anonymous_client_is_refused_on_every_listener(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    ca_only = ClientTls(fleet_pki.cafile)
    for port in (fleet_broker.device_port, fleet_broker.claim_port, fleet_broker.operator_port):
        probe = MqttProbe(fleet_broker.mosquitto, port=port, tls=ca_only)
        assert probe.connect_refused()


def test_plain_mqtt_on_a_tls_listener_is_refused(fleet_broker: FleetBroker) -> None:
    probe = MqttProbe(fleet_broker.mosquitto, port=fleet_broker.device_port, timeout_s=3)
    with pytest.raises(AssertionError, match="CONNACK"):  # the broker waits for a handshake
        probe.connect()
    close_client(probe.client)


def test_a_certificate_from_another_ca_is_refused(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    stranger = fleet_pki.directory / "stranger"
    tls = ClientTls(fleet_pki.cafile, stranger / "dev1.crt", stranger / "dev1.key")
    probe = MqttProbe(fleet_broker.mosquitto, port=fleet_broker.device_port, tls=tls)

    assert probe.connect_refused()


@pytest.mark.parametrize("who", ["dev1", "claim"])
def test_a_device_or_claim_certificate_does_not_open_the_operators_listener(
    fleet_broker: FleetBroker, fleet_pki: FleetPki, who: str
) -> None:
    probe = MqttProbe(
        fleet_broker.mosquitto, port=fleet_broker.operator_port, tls=fleet_pki.client(who)
    )
    assert probe.connect_refused()


def test_the_claim_certificate_does_not_open_the_devices_listener(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    probe = MqttProbe(
        fleet_broker.mosquitto, port=fleet_broker.device_port, tls=fleet_pki.client("claim")
    )
    assert probe.connect_refused()


def test_a_claim_session_reads_its_own_answer_and_no_other(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    mine, theirs = uuid.uuid4().hex, uuid.uuid4().hex
    with (
        _controller(fleet_broker, fleet_pki) as service,
        _claim(fleet_broker, fleet_pki, mine) as claim,
        _claim(fleet_broker, fleet_pki, theirs) as other,
    ):
        service.subscribe(f"{ROOT}/_enroll/+/+/request")
        # The other session tries every way to see answers that are not its own.
        for topic_filter in (f"{ROOT}/_enroll/#", f"{ROOT}/_enroll/claim/{mine}/answer", "#"):
            other.subscribe(topic_filter)
        claim.subscribe(enroll_answer_topic(ROOT, "claim", mine))
        forged = other.publish(enroll_request_topic(ROOT, "claim", mine), b"as someone else")
        sent = claim.publish(enroll_request_topic(ROOT, "claim", mine), b"request")
        service.wait_for_message(enroll_request_topic(ROOT, "claim", mine))

        service.publish(enroll_answer_topic(ROOT, "claim", mine), b"certificate", retain=True)
        service.publish(enroll_answer_topic(ROOT, "claim", theirs), b"theirs")
        other.wait_for_message(enroll_answer_topic(ROOT, "claim", theirs))

        assert forged.getName() == "Not authorized"
        assert not sent.is_failure
        assert claim.wait_for_message(enroll_answer_topic(ROOT, "claim", mine)).payload == (
            b"certificate"
        )
        # Its own answer matches two of its subscriptions: it may come twice.
        assert {m.topic for m in other.messages()} == {enroll_answer_topic(ROOT, "claim", theirs)}
        assert [m.payload for m in service.messages()] == [b"request"]


def test_a_claim_session_reaches_no_device_topic(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    with (
        _controller(fleet_broker, fleet_pki) as controller,
        _claim(fleet_broker, fleet_pki, uuid.uuid4().hex) as claim,
    ):
        controller.publish(key_set_topic(ROOT), b"set", retain=True)
        claim.subscribe(f"{ROOT}/#")
        refused = claim.publish(f"{ROOT}/dev1/events/x", b"forged")
        controller.subscribe(f"{ROOT}/#")
        controller.publish(f"{ROOT}/dev1/cmd/marker", b"{}")
        controller.wait_for_message(f"{ROOT}/dev1/cmd/marker")

        assert refused.getName() == "Not authorized"
        assert claim.messages() == []
        assert controller.messages(f"{ROOT}/dev1/events/x") == []


def test_a_revoked_device_is_refused_after_the_broker_reloads(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    revoked = pki.load_certificate(fleet_pki.directory / "dev3.crt")
    with _device(fleet_broker, fleet_pki, "dev3") as before:
        assert not before.publish(f"{ROOT}/dev3/events/x", b"ok").is_failure

    fleet_pki.write_crl([revoked])
    try:
        fleet_broker.mosquitto.reload()

        assert _device(fleet_broker, fleet_pki, "dev3").connect_refused()
        with _device(fleet_broker, fleet_pki, "dev2") as dev2:
            assert not dev2.publish(f"{ROOT}/dev2/events/x", b"still fine").is_failure
    finally:
        fleet_pki.write_crl([])


def test_a_device_announces_itself_to_home_assistant_only_as_itself(
    fleet_broker: FleetBroker, fleet_pki: FleetPki
) -> None:
    with _device(fleet_broker, fleet_pki, "dev1") as dev1:
        own = dev1.publish("homeassistant/binary_sensor/dev1/kite_person/config", b"{}", qos=1)
        state = dev1.publish("homeassistant/binary_sensor/dev1/kite_person/state", b"ON", qos=1)
        forged = dev1.publish("homeassistant/binary_sensor/dev2/kite_person/config", b"{}", qos=1)
        elsewhere = dev1.publish("homeassistant/status", b"offline", qos=1)

    assert not own.is_failure
    assert not state.is_failure
    assert forged.getName() == "Not authorized"
    assert elsewhere.getName() == "Not authorized"
