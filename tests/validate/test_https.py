"""https: nginx serves the machine's certificate, wants the token, upgrades websockets and
redirects plain HTTP. The TLS context is built from the recorded certificate for real."""

from dataclasses import replace

from factory.validate.https import check_https
from factory.validate.target import ScriptedTarget
from tests.validate.conftest import failed, recording, statuses

WITHOUT_TOKEN = "443 /api/status"
WITH_TOKEN = "443 /api/status [Authorization]"
PLAIN = "80 /lab"


def test_the_recorded_nginx_passes(ctx):
    results = check_https(ctx)
    assert list(statuses(results)) == [
        "https: valid certificate chain for the machine's name",
        "https: a request without the token is refused",
        "https: the first-boot token opens Jupyter",
        "https: websockets pass through nginx",
        "https: plain HTTP redirects to HTTPS",
    ]
    assert failed(results) == {}


def test_nginx_serving_another_certificate_fails(ctx, target):
    # The importer boot made its own first-boot certificate: a real one, but not this VM's.
    other = recording()["importer"]["requests"]["443 /"]["peer_cert"]
    target.requests[WITHOUT_TOKEN] = {**target.requests[WITHOUT_TOKEN], "peer_cert": other}
    assert failed(check_https(ctx)) == {
        "https: valid certificate chain for the machine's name": (
            "TLS to validate verified against /etc/factory/tls/jupyter.crt; but nginx served "
            "another certificate"
        )
    }


def test_nginx_that_lets_requests_without_the_token_through_fails(ctx, target):
    target.requests[WITHOUT_TOKEN] = target.requests[WITH_TOKEN]
    assert list(failed(check_https(ctx))) == ["https: a request without the token is refused"]


def test_a_machine_without_a_token_fails_even_when_nginx_answers(ctx, target):
    token = "sudo sed -n 's/^JUPYTER_TOKEN=//p' /etc/factory/jupyter.env 2>/dev/null"
    target.answer(token, stdout="")
    assert list(failed(check_https(ctx))) == ["https: the first-boot token opens Jupyter"]


def test_a_proxy_that_drops_the_websocket_upgrade_fails(ctx, target):
    key = next(k for k in target.requests if k.startswith("443 /api/events/subscribe"))
    target.requests[key] = {**target.requests[key], "status": 400}
    assert list(failed(check_https(ctx))) == ["https: websockets pass through nginx"]


def test_plain_http_served_without_a_redirect_fails(ctx, target):
    answer = target.requests[PLAIN]
    target.requests[PLAIN] = {**answer, "status": 200, "headers": {"server": "nginx/1.22.1"}}
    assert failed(check_https(ctx)) == {
        "https: plain HTTP redirects to HTTPS": "GET http://validate/lab -> HTTP 200 "
    }


def test_a_refused_port_443_fails_the_certificate_check(ctx, target):
    target.requests[WITHOUT_TOKEN] = {"error": ["ConnectionRefusedError", "connection refused"]}
    assert failed(check_https(ctx)) == {
        "https: valid certificate chain for the machine's name": (
            "ConnectionRefusedError: connection refused"
        )
    }


def test_a_target_that_cannot_reach_ports_skips(ctx):
    class CommandsOnly:  # a backend with run() alone, like a vagrant ssh session
        run = ScriptedTarget(recording()).run

    ctx.target = CommandsOnly()
    (result,) = check_https(ctx)
    assert (result.status, result.detail) == ("skipped", "ports not reachable")


def _nginx_before_jupyter(target, monkeypatch, not_ready: int) -> list[float]:
    """nginx answers 502 to the first `not_ready` requests (Jupyter still starting); returns
    the list the check's sleeps are recorded in."""
    slept, recorded = [], target.request

    def request(port, path, headers=None, **options):
        if port == 443 and len(slept) < not_ready:
            return replace(recorded(port, path, headers, **options), status=502)
        return recorded(port, path, headers, **options)

    monkeypatch.setattr(target, "request", request)
    monkeypatch.setattr("factory.validate.https.time.sleep", slept.append)
    return slept


def test_a_jupyter_still_starting_is_waited_for(ctx, target, monkeypatch):
    """`--only https` right after boot: nginx answers 502 until Jupyter listens."""
    slept = _nginx_before_jupyter(target, monkeypatch, not_ready=2)
    assert failed(check_https(ctx)) == {}
    assert slept == [5, 5]


def test_a_jupyter_that_never_starts_fails_at_the_deadline(ctx, target, monkeypatch):
    monkeypatch.setattr("factory.validate.https.START_SECONDS", -1)
    slept = _nginx_before_jupyter(target, monkeypatch, not_ready=10**6)
    assert failed(check_https(ctx))["https: a request without the token is refused"] == (
        "GET /api/status without token -> HTTP 502"
    )
    assert slept == []
