"""The example service (profiles/services/credit_score_api.py) run for real on this host, as
its unit runs it: from its folder, PORT and API_KEY in the environment, on loopback."""

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

from tests.conftest import REPO, wait_until

SERVICE = REPO / "profiles" / "services"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict, key: str | None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"X-API-Key": key} if key else {})}
    request = urllib.request.Request(url, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_credit_score_api_answers_health_and_wants_its_key():
    port = _free_port()
    env = {**os.environ, "PORT": str(port), "API_KEY": "k" * 48, "MODEL_FILE": "credit_model.json"}
    process = subprocess.Popen(
        [sys.executable, "credit_score_api.py"],
        cwd=SERVICE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False

        assert wait_until(healthy, timeout=20), process.stderr
        features = {"income": 52000, "debt_ratio": 0.31, "late_payments": 1}
        assert _post(f"{base}/score", features, None)[0] == 401
        assert _post(f"{base}/score", features, "wrong")[0] == 401
        status, body = _post(f"{base}/score", features, "k" * 48)
        assert status == 200 and 0 < body["probability_of_default"] < 1
        riskier = {**features, "late_payments": 6}
        riskier_score = _post(f"{base}/score", riskier, "k" * 48)[1]
        assert riskier_score["probability_of_default"] > body["probability_of_default"]
        assert _post(f"{base}/score", {"income": 1}, "k" * 48)[0] == 400
    finally:
        process.terminate()
        process.wait(timeout=10)
