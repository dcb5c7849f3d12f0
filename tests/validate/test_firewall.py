"""firewall: input dropped except the profile's ports, only those listen, and a port
listening inside but not listed is unreachable from outside."""

import json

from factory.validate import firewall
from factory.validate.firewall import accepted_tcp_ports, check_firewall
from tests.validate.conftest import failed, statuses

RULESET = "sudo nft -j list ruleset"
LISTENING = "ss -Htln"
INSIDE = "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:7777/"


def test_the_recorded_ruleset_accepts_exactly_the_demo_ports(target):
    policy, ports = accepted_tcp_ports(json.loads(target.commands[RULESET].stdout))
    assert (policy, ports) == ("drop", {22, 80, 443, 9100})


def test_the_recorded_firewall_passes(ctx):
    results = check_firewall(ctx)
    assert list(statuses(results)) == [
        "firewall: inbound dropped except the profile's ports",
        "firewall: only the listed ports listen",
        "firewall: port 7777 (not listed) is unreachable from outside",
    ]
    assert failed(results) == {}


def test_an_accepting_input_policy_fails(ctx, target):
    ruleset = target.commands[RULESET].stdout.replace('"policy": "drop"', '"policy": "accept"', 1)
    target.answer(RULESET, stdout=ruleset)
    assert list(failed(check_firewall(ctx))) == [
        "firewall: inbound dropped except the profile's ports"
    ]


def test_a_rule_opening_an_unlisted_port_fails(ctx, target):
    ruleset = json.loads(target.commands[RULESET].stdout)
    for item in ruleset["nftables"]:
        for expr in item.get("rule", {}).get("expr", []):
            ports = expr.get("match", {}).get("right")
            if isinstance(ports, dict) and 22 in ports.get("set", []):
                ports["set"].append(8888)  # the Jupyter port, opened past nginx
    target.answer(RULESET, stdout=json.dumps(ruleset))
    assert list(failed(check_firewall(ctx))) == [
        "firewall: inbound dropped except the profile's ports"
    ]


def test_a_service_listening_on_an_unlisted_port_fails(ctx, target):
    listening = target.commands[LISTENING].stdout
    target.answer(LISTENING, stdout=listening.replace("127.0.0.1:8888", "0.0.0.0:8888"))
    assert failed(check_firewall(ctx)) == {
        "firewall: only the listed ports listen": (
            "listening beyond loopback: [22, 80, 443, 8888, 9100]; not in the profile: [8888]"
        )
    }


def test_an_unlisted_port_that_answers_from_outside_fails(ctx, target):
    # The listener answered inside (HTTP 200); here it answers from outside too.
    target.requests["7777 /"] = {**target.requests["80 /lab"], "status": 200}
    assert failed(check_firewall(ctx)) == {
        "firewall: port 7777 (not listed) is unreachable from outside": (
            "answered HTTP 200 from outside"
        )
    }


def test_a_probe_listener_that_never_starts_fails_rather_than_passes(ctx, target, monkeypatch):
    monkeypatch.setattr(firewall.time, "sleep", lambda seconds: None)
    target.answer(INSIDE, stdout="000", exit_code=7)
    assert failed(check_firewall(ctx)) == {
        "firewall: port 7777 (not listed) is unreachable from outside": (
            "the probe listener did not start"
        )
    }
    assert target.ran[-1] == "sudo systemctl stop factory-probe-7777"
