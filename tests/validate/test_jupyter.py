"""jupyter and kernels: the service is up, unprivileged, on loopback, wants the first-boot
token; each environment is a kernel and each sample notebook runs."""

import json

from factory.validate.jupyter import check_jupyter, check_kernels_and_samples
from tests.validate.conftest import command_with, failed

WITHOUT_TOKEN = "curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8888/api/status"
LISTENING = "ss -Htln 'sport = :8888'"
KERNELS = "/opt/conda/envs/jupyter/bin/jupyter kernelspec list --json"


def test_the_recorded_jupyter_passes(ctx):
    results = check_jupyter(ctx)
    assert len(results) == 5 and failed(results) == {}


def test_jupyter_that_answers_without_a_token_fails(ctx, target):
    target.answer(WITHOUT_TOKEN, stdout="200")
    assert list(failed(check_jupyter(ctx))) == ["jupyter: answers on 127.0.0.1 and wants a token"]


def test_jupyter_listening_beyond_loopback_fails(ctx, target):
    recorded = target.commands[LISTENING].stdout
    target.answer(LISTENING, stdout=recorded.replace("127.0.0.1:8888", "0.0.0.0:8888"))
    assert failed(check_jupyter(ctx)) == {
        "jupyter: bound to 127.0.0.1 only": "listening on ['0.0.0.0']"
    }


def test_jupyter_running_as_root_fails(ctx, target):
    target.answer(
        "ps -o user= -p $(systemctl show -p MainPID --value jupyter.service)", stdout="root\n"
    )
    assert list(failed(check_jupyter(ctx))) == ["jupyter: runs as a non-root user"]


def test_the_recorded_kernels_and_sample_notebook_pass(ctx):
    results = check_kernels_and_samples(ctx)
    assert [r.name for r in results] == [
        "jupyter: each environment is a kernel",
        "notebooks: demo-credit-score.ipynb runs headless",
    ]
    assert failed(results) == {}


def test_an_environment_without_a_kernel_fails(ctx, target):
    listing = json.loads(target.commands[KERNELS].stdout)
    del listing["kernelspecs"]["demo"]
    target.answer(KERNELS, stdout=json.dumps(listing))
    assert list(failed(check_kernels_and_samples(ctx))) == ["jupyter: each environment is a kernel"]


def test_a_sample_notebook_that_raises_fails(ctx, target):
    command = command_with(target, "sudo -u jupyter -H sh -c")
    stderr = target.commands[command].stderr + "nbclient.exceptions.CellExecutionError: boom\n"
    target.answer(command, exit_code=1, stdout="", stderr=stderr)
    assert failed(check_kernels_and_samples(ctx)) == {
        "notebooks: demo-credit-score.ipynb runs headless": (
            "kernel demo: nbclient.exceptions.CellExecutionError: boom"
        )
    }
