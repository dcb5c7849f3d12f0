"""A small credit-scoring API: a logistic model whose coefficients come from MODEL_FILE.

    GET  /health   200 when the model is loaded
    POST /score    {"income": 52000, "debt_ratio": 0.31, "late_payments": 1}
                   -> {"probability_of_default": 0.12}; needs the X-API-Key header

It listens on 127.0.0.1:$PORT; nginx serves it at https://HOST/score/. API_KEY is made on the
machine's first boot (`sudo cat /etc/factory/services/score.env`).
"""

import hmac
import json
import math
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL = json.loads(Path(os.environ.get("MODEL_FILE", "credit_model.json")).read_text())
API_KEY = os.environ.get("API_KEY", "")


def probability_of_default(features: dict) -> float:
    score = MODEL["intercept"]
    for name, weight in MODEL["weights"].items():
        score += weight * float(features[name])
    return 1 / (1 + math.exp(-score))


class Handler(BaseHTTPRequestHandler):
    def _answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/health":
            self._answer(200, {"status": "ok", "model": MODEL["name"]})
        else:
            self._answer(404, {"error": "GET /health or POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/score":
            return self._answer(404, {"error": "POST /score"})
        key = self.headers.get("X-API-Key", "")
        if not API_KEY or not hmac.compare_digest(key, API_KEY):
            return self._answer(401, {"error": "missing or wrong X-API-Key"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            features = json.loads(self.rfile.read(length))
            self._answer(200, {"probability_of_default": probability_of_default(features)})
        except (ValueError, KeyError, TypeError) as error:
            self._answer(400, {"error": f"bad request: {error}"})

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        print(f"{self.command} {self.path.split('?')[0]} -> {args[1] if len(args) > 1 else ''}")


if __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), Handler).serve_forever()
