#!/usr/bin/env bash
# Stage: monitoring. The node exporter always runs; it is open on 9100 only when monitoring is
# on. An optional Prometheus server scrapes the node, Jupyter and (on GPU images) the GPU.
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: monitoring"

if [ "$MONITORING_ENABLED" = 1 ]; then
    listen=":9100"
else
    listen="127.0.0.1:9100"
fi
cat > /etc/default/prometheus-node-exporter <<CONF
# Installed by factory.
ARGS="--web.listen-address=$listen --collector.systemd"
CONF
systemctl enable prometheus-node-exporter.service

if [ "$PROMETHEUS" = 1 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
    install -m 644 "$FACTORY_PAYLOAD/prometheus.yml" /etc/prometheus/prometheus.yml
    cat > /etc/default/prometheus <<'CONF'
# Installed by factory: the server answers on this machine only.
ARGS="--web.listen-address=127.0.0.1:9090"
CONF
    systemctl enable prometheus.service
fi
