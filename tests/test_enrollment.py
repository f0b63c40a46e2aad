"""Zero-touch enrollment: the token decision (pure, injected clock), and the enrollment service
against a real Mosquitto running the fleet's listeners, asked by the agent's own claim client.

A used, an expired and a forged token are refused with their code; a good one gets a
certificate from the fleet CA under the name the token binds (not the CSR's); one claim
session cannot read another's answer; a device renews under its own name, without a token.
"""

from __future__ import annotations

import json
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from broker import ClientTls, Mosquitto, MqttProbe
from cryptography import x509
from fleetbroker import make_fleet_pki, run_fleet_broker
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgefleet.agent.identity import ClaimUnavailable, _Claim, request_certificate
from edgefleet.agent.protocol import (
    EnrollAnswer,
    EnrollRequest,
    RenewRequest,
    Topics,
    enroll_answer_topic,
    enroll_request_topic,
)
from edgefleet.ops.enroll import EnrollmentService, parse_duration, serve
from edgefleet.ops.profile import OperatorProfile
from edgefleet.provisioning import pki
from edgefleet.provisioning.enrollment import (
    Enrollment,
    Grant,
    RateLimit,
    Refusal,
    RefusalCode,
    TokenFile,
    TokenStore,
    mark_used,
    new_token,
    parse_token,
)
from edgefleet.runtime import InputError

ROOT = "edgefleet/v1"
NOW = 1_800_000_000.0
KEY = "ab" * 32
OTHER_KEY = "cd" * 32


# -- the decision, pure ------------------------------------------------------------------


def _one_token(device: str = "shop-1", lifetime_s: float = 3600) -> tuple[str, TokenFile]:
    made = new_token(device, lifetime_s=lifetime_s, now=NOW)
    return made.token, TokenFile(tokens={made.token_id: made.record})


def _decide(tokens: TokenFile, token: str, *, now: float = NOW, key: str = KEY) -> object:
    return Enrollment(RateLimit(100, 60)).decide(tokens, "claim", token, key, now)


def test_a_fresh_token_is_granted_under_the_name_it_binds() -> None:
    token, tokens = _one_token("shop-1")

    decision = _decide(tokens, token)

    assert isinstance(decision, Grant)
    assert decision.device_id == "shop-1"
    assert decision.certificate is None


def test_a_used_token_is_refused_as_used() -> None:
    token, tokens = _one_token()
    grant = _decide(tokens, token)
    assert isinstance(grant, Grant)
    used = mark_used(tokens, grant.token_id, key_sha256=KEY, certificate="PEM", now=NOW + 1)

    decision = _decide(used, token, now=NOW + 2, key=OTHER_KEY)

    assert isinstance(decision, Refusal)
    assert decision.code is RefusalCode.TOKEN_USED


def test_a_used_token_presented_again_with_the_same_key_gets_the_same_certificate() -> None:
    token, tokens = _one_token()
    grant = _decide(tokens, token)
    assert isinstance(grant, Grant)
    used = mark_used(tokens, grant.token_id, key_sha256=KEY, certificate="PEM", now=NOW + 1)

    decision = _decide(used, token, now=NOW + 2, key=KEY)

    assert decision == Grant(grant.token_id, "shop-1", "PEM")


def test_an_expired_token_is_refused_as_expired() -> None:
    token, tokens = _one_token(lifetime_s=3600)

    assert isinstance(_decide(tokens, token, now=NOW + 3599), Grant)
    decision = _decide(tokens, token, now=NOW + 3600)

    assert isinstance(decision, Refusal)
    assert decision.code is RefusalCode.TOKEN_EXPIRED


@pytest.mark.parametrize(
    "forge",
    [
        lambda t: t[: t.rindex(".") + 1] + "A" * 43,  # the right id, a wrong secret
        lambda t: "ef1.AAAAAAAAAAAA." + t.split(".")[2],  # the right secret, an unknown id
        lambda t: "not a token",
        lambda t: "",
    ],
    ids=["wrong-secret", "unknown-id", "garbage", "empty"],
)
def test_a_forged_token_is_refused_as_unknown(forge: object) -> None:
    token, tokens = _one_token()

    decision = _decide(tokens, forge(token))  # type: ignore[operator]

    assert isinstance(decision, Refusal)
    assert decision.code is RefusalCode.TOKEN_UNKNOWN


def test_the_rate_limit_refuses_past_its_count_in_the_window_and_says_when() -> None:
    token, tokens = _one_token()
    enrollment = Enrollment(RateLimit(3, 60))

    first = [enrollment.decide(tokens, "claim", "forged", KEY, NOW + i) for i in range(3)]
    limited = enrollment.decide(tokens, "claim", token, KEY, NOW + 10)
    later = enrollment.decide(tokens, "claim", token, KEY, NOW + 60)

    assert all(isinstance(d, Refusal) and d.code is RefusalCode.TOKEN_UNKNOWN for d in first)
    assert isinstance(limited, Refusal)
    assert limited.code is RefusalCode.RATE_LIMITED
    assert limited.retry_after_s == pytest.approx(50)
    assert isinstance(later, Grant)


def test_the_rate_limit_is_per_claim_identity() -> None:
    token, tokens = _one_token()
    enrollment = Enrollment(RateLimit(1, 60))

    enrollment.decide(tokens, "claim-factory-a", "forged", KEY, NOW)
    other = enrollment.decide(tokens, "claim-factory-b", token, KEY, NOW)

    assert isinstance(other, Grant)


@pytest.mark.parametrize("name", ["a/b", "dev+1", "#", "$SYS", "x" * 65, "controller", ""])
def test_a_token_for_a_name_that_must_never_be_signed_is_refused(name: str) -> None:
    with pytest.raises(pki.InvalidIdentity):
        new_token(name, lifetime_s=60, now=NOW)


def test_the_token_file_is_0600_and_holds_no_secret(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")

    made = store.add("shop-1", lifetime_s=60, now=NOW)

    text = store.path.read_text()
    assert stat.S_IMODE(store.path.stat().st_mode) == 0o600
    assert made.token.split(".")[2] not in text
    assert store.load().tokens[made.token_id].device_id == "shop-1"


@pytest.mark.parametrize(("text", "seconds"), [("30m", 1800), ("24h", 86400), ("7d", 604800)])
def test_durations_read_as_seconds(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_a_duration_that_is_not_one_is_bad_input() -> None:
    with pytest.raises(InputError):
        parse_duration("soon")


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=2048) | st.text(max_size=512).map(str.encode))
def test_any_request_payload_gets_a_refusal_not_an_exception(
    tmp_path: Path, payload: bytes
) -> None:
    def never(csr: bytes, name: str) -> x509.Certificate:
        raise AssertionError("nothing may be signed")

    service = EnrollmentService(
        TokenStore(tmp_path / "tokens.json"), never, topic_root=ROOT, rate=RateLimit(10**6, 60)
    )

    for topic in (enroll_request_topic(ROOT, "claim", "a" * 32), f"{ROOT}/dev1/renew/request"):
        answer = service.handle(topic, payload)
        assert answer is not None
        assert (answer.answer.ok, answer.answer.code) == (False, "bad_request")


@given(text=st.text(max_size=300))
def test_parsing_a_token_never_raises(text: str) -> None:
    parsed = parse_token(text)

    assert parsed is None or text.strip() == f"ef1.{parsed[0]}.{parsed[1]}"


# -- the service against a real broker -----------------------------------------------


@dataclass(frozen=True)
class Fleet:
    """The fleet's CAs and certificates in a directory, and a running broker."""

    directory: Path
    device_ca: pki.Issued
    broker: Mosquitto
    device_port: int
    claim_port: int
    operator_port: int

    def claim(self, timeout_s: float = 10) -> _Claim:
        """How the agent's claim client connects."""
        return _Claim(
            host="127.0.0.1",
            port=self.claim_port,
            cafile=self.directory / "device-ca.crt",
            certfile=self.directory / "claim.crt",
            keyfile=self.directory / "claim.key",
            topic_root=ROOT,
            timeout_s=timeout_s,
        )

    def tls(self, name: str) -> ClientTls:
        """A probe presenting ``name``'s certificate."""
        d = self.directory
        return ClientTls(d / "device-ca.crt", d / f"{name}.crt", d / f"{name}.key")


@pytest.fixture
def fleet(tmp_path: Path, mosquitto_binary: Path) -> Iterator[Fleet]:
    """Device, operator and claim CAs; broker, controller, claim and dev1 certificates; the
    broker on the fleet's three listeners (fleetbroker)."""
    made = make_fleet_pki(tmp_path / "pki", devices=["dev1"])
    with run_fleet_broker(tmp_path / "broker", made) as running:
        yield Fleet(
            made.directory,
            made.device_ca,
            running.mosquitto,
            running.device_port,
            running.claim_port,
            running.operator_port,
        )


class Running:
    """The enrollment service, serving in a thread once started, and its token store."""

    def __init__(self, fleet: Fleet, tokens: Path) -> None:
        self.store = TokenStore(tokens)
        self.signed: list[str] = []
        self._service = EnrollmentService(
            self.store, self._sign, topic_root=ROOT, rate=RateLimit(50, 60)
        )
        self._device_ca = fleet.device_ca
        self._profile = OperatorProfile(
            host="127.0.0.1",
            port=fleet.operator_port,
            cafile=fleet.directory / "device-ca.crt",
            certfile=fleet.directory / "controller.crt",
            keyfile=fleet.directory / "controller.key",
        )
        self._stop, self._ready = threading.Event(), threading.Event()
        self._problems: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="enroll-serve", daemon=True)

    def _sign(self, csr: bytes, name: str) -> x509.Certificate:
        self.signed.append(name)
        return pki.sign_csr(self._device_ca, csr, name, days=30)

    def _run(self) -> None:
        try:
            serve(self._service, self._profile, self._stop, self._ready)
        except BaseException as exc:  # the test fails on it in stop()
            self._problems.append(exc)

    def start(self) -> None:
        """Serve; returns once subscribed to the requests."""
        self._thread.start()
        assert self._ready.wait(15), self._problems

    def stop(self) -> None:
        """Stop serving; fail on anything the service raised."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        assert not self._problems, self._problems


@pytest.fixture
def idle_service(fleet: Fleet, tmp_path: Path) -> Iterator[Running]:
    """``EnrollmentService`` as the controller, signing with the device CA; not started."""
    running = Running(fleet, tmp_path / "tokens.json")
    yield running
    running.stop()


@pytest.fixture
def service(idle_service: Running) -> Running:
    """The enrollment service, serving."""
    idle_service.start()
    return idle_service


def _request(
    token: str, key: pki.CertificateKey | None = None, cn: str = "evil/name"
) -> tuple[EnrollRequest, pki.CertificateKey]:
    key = key or pki.generate_key()
    return EnrollRequest(token=token, csr=pki.make_csr(key, cn).decode()), key


def test_a_good_token_gets_a_certificate_from_the_fleet_ca_under_the_bound_name(
    fleet: Fleet, service: Running
) -> None:
    made = service.store.add("shop-1", lifetime_s=600, now=time.time())
    request, key = _request(made.token, cn="dev1")  # the CSR asks for another name

    answer = request_certificate(fleet.claim(), request)

    assert answer.ok, answer
    cert = x509.load_pem_x509_certificate((answer.certificate or "").encode())
    assert pki.common_name(cert) == "shop-1" == answer.device_id
    assert pki.is_issued_by(cert, fleet.device_ca.certificate)
    assert cert.public_key() == key.public_key()
    assert service.store.load().tokens[made.token_id].used_at is not None


def test_a_used_token_is_refused_with_its_code(fleet: Fleet, service: Running) -> None:
    made = service.store.add("shop-2", lifetime_s=600, now=time.time())
    first = request_certificate(fleet.claim(), _request(made.token)[0])

    again = request_certificate(fleet.claim(), _request(made.token)[0])  # another key

    assert first.ok
    assert (again.ok, again.code) == (False, "token_used")
    assert again.reason
    assert service.signed == ["shop-2"]


def test_a_retry_with_the_same_key_after_a_lost_answer_gets_the_same_certificate(
    fleet: Fleet, service: Running
) -> None:
    made = service.store.add("shop-3", lifetime_s=600, now=time.time())
    request, _ = _request(made.token)

    first = request_certificate(fleet.claim(), request)
    again = request_certificate(fleet.claim(), request)

    assert first.ok
    assert again.ok
    assert first.certificate == again.certificate
    assert service.signed == ["shop-3"]


def test_an_expired_token_is_refused_with_its_code(fleet: Fleet, service: Running) -> None:
    made = service.store.add("shop-4", lifetime_s=60, now=time.time() - 61)

    answer = request_certificate(fleet.claim(), _request(made.token)[0])

    assert (answer.ok, answer.code) == (False, "token_expired")
    assert answer.certificate is None


def test_a_forged_token_is_refused_with_its_code(fleet: Fleet, service: Running) -> None:
    made = service.store.add("shop-5", lifetime_s=600, now=time.time())
    forged = made.token[: made.token.rindex(".") + 1] + "B" * 43

    answer = request_certificate(fleet.claim(), _request(forged)[0])

    assert (answer.ok, answer.code) == (False, "token_unknown")
    assert service.store.load().tokens[made.token_id].used_at is None


def test_a_malformed_request_is_refused_as_bad_request(fleet: Fleet, service: Running) -> None:
    made = service.store.add("shop-6", lifetime_s=600, now=time.time())

    answer = request_certificate(
        fleet.claim(), EnrollRequest(token=made.token, csr="-----BEGIN nothing-----")
    )

    assert (answer.ok, answer.code) == (False, "bad_request")
    assert service.store.load().tokens[made.token_id].used_at is None


def test_a_claim_session_cannot_read_another_claim_sessions_answer(
    fleet: Fleet, service: Running
) -> None:
    victim = "0" * 31 + "1"
    made = service.store.add("shop-7", lifetime_s=600, now=time.time())
    with (
        MqttProbe(fleet.broker, victim, port=fleet.claim_port, tls=fleet.tls("claim")) as own,
        MqttProbe(fleet.broker, "f" * 32, port=fleet.claim_port, tls=fleet.tls("claim")) as spy,
    ):
        answer_topic = enroll_answer_topic(ROOT, "claim", victim)
        spy.subscribe(answer_topic)
        spy.subscribe(f"{ROOT}/_enroll/#")
        spy.subscribe("#")
        own.subscribe(answer_topic)

        own.publish(
            enroll_request_topic(ROOT, "claim", victim),
            _request(made.token)[0].model_dump_json(),
        )
        received = own.wait_for_message(answer_topic)
        # The spy's own request and answer come after the victim's: once it has its own
        # answer, anything the broker would have delivered of the victim's has arrived.
        spy.subscribe(enroll_answer_topic(ROOT, "claim", "f" * 32))
        spy.publish(enroll_request_topic(ROOT, "claim", "f" * 32), b"{}")
        spy.wait_for_message(enroll_answer_topic(ROOT, "claim", "f" * 32))

        assert EnrollAnswer.model_validate_json(received.payload).ok
        # Its own answer matches several of its subscriptions: it may come more than once.
        assert {m.topic for m in spy.messages()} == {enroll_answer_topic(ROOT, "claim", "f" * 32)}
        assert spy.messages(answer_topic) == []


def test_a_device_renews_under_its_own_name_without_a_token(fleet: Fleet, service: Running) -> None:
    topics = Topics("dev1", ROOT)
    key = pki.generate_key()
    with MqttProbe(fleet.broker, port=fleet.device_port, tls=fleet.tls("dev1")) as dev1:
        dev1.subscribe(topics.renew_answer)

        dev1.publish(
            topics.renew_request,
            RenewRequest(csr=pki.make_csr(key, "someone-else").decode()).model_dump_json(),
        )
        received = dev1.wait_for_message(topics.renew_answer)

    answer = EnrollAnswer.model_validate_json(received.payload)
    assert answer.ok, answer
    cert = x509.load_pem_x509_certificate((answer.certificate or "").encode())
    assert pki.common_name(cert) == "dev1"
    assert cert.public_key() == key.public_key()
    assert json.loads(received.payload)["device_id"] == "dev1"


def test_a_damaged_token_file_leaves_requests_unanswered_and_the_service_running(
    fleet: Fleet, service: Running
) -> None:
    service.store.path.write_text("{not json")

    with pytest.raises(ClaimUnavailable, match="no enrollment answer"):
        request_certificate(fleet.claim(timeout_s=2), _request("ef1.x.y")[0])
    service.store.path.unlink()  # the operator restores it
    made = service.store.add("shop-11", lifetime_s=600, now=time.time())
    answer = request_certificate(fleet.claim(), _request(made.token)[0])

    assert answer.ok
