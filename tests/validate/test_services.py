"""monitoring and services: node exporter metrics are scraped from outside; the services the
image adds run as their own users."""

from factory.validate.services import check_monitoring, check_services_unprivileged
from tests.validate.conftest import failed

METRICS = "9100 /metrics"
JUPYTER_USER = "ps -o user= -p $(systemctl show -p MainPID --value jupyter.service)"
NGINX_WORKERS = "ps -C nginx -o user=,args= | grep 'worker process'"


def test_the_recorded_metrics_are_scraped_from_outside(ctx):
    (result,) = check_monitoring(ctx)
    assert result.status == "passed" and result.detail.endswith("from outside on port 9100")


def test_metrics_without_the_cpu_series_fail(ctx, target):
    body = target.requests[METRICS]["body"]
    kept = "".join(
        line for line in body.splitlines(keepends=True) if "node_cpu_seconds_total" not in line
    )
    target.requests[METRICS] = {**target.requests[METRICS], "body": kept}
    (result,) = check_monitoring(ctx)
    assert result.status == "failed", result.detail


def test_an_exporter_unreachable_from_outside_fails(ctx, target):
    target.requests[METRICS] = target.requests["7777 /"]  # the firewall's recorded timeout
    (result,) = check_monitoring(ctx)
    assert (result.status, result.detail) == ("failed", "0 node_* samples failed: timed out")


def test_the_recorded_services_run_unprivileged(ctx):
    (result,) = check_services_unprivileged(ctx)
    assert (result.status, result.detail) == (
        "passed",
        "prometheus-node-exporter as prometheus; jupyter as jupyter; nginx workers as www-data",
    )


def test_jupyter_as_root_fails(ctx, target):
    target.answer(JUPYTER_USER, stdout="root\n")
    assert list(failed(check_services_unprivileged(ctx))) == ["services: run unprivileged"]


def test_nginx_workers_as_root_fail(ctx, target):
    workers = target.commands[NGINX_WORKERS].stdout.replace("www-data", "root")
    target.answer(NGINX_WORKERS, stdout=workers)
    (result,) = check_services_unprivileged(ctx)
    assert result.status == "failed" and "nginx workers as root" in result.detail


def test_a_service_that_is_not_running_fails(ctx, target):
    target.answer(JUPYTER_USER, stdout="", exit_code=1)
    (result,) = check_services_unprivileged(ctx)
    assert result.status == "failed" and "jupyter as not running" in result.detail
