#!/usr/bin/env bash
# Stage: Jupyter Lab as a systemd service of the unprivileged user `jupyter`, bound to 127.0.0.1.
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: jupyter"

if ! id jupyter >/dev/null 2>&1; then
    useradd --system --create-home --home-dir /srv/jupyter --shell /usr/sbin/nologin jupyter
fi
install -d -m 750 -o jupyter -g jupyter /srv/jupyter/notebooks

for env in $ENVIRONMENTS; do
    python="/opt/conda/envs/$env/bin/python"
    if [ "$env" != jupyter ] && "$python" -c 'import ipykernel' 2>/dev/null; then
        "$python" -m ipykernel install --prefix /opt/conda/envs/jupyter \
            --name "$env" --display-name "Python ($env)"
    fi
done

cat > /etc/systemd/system/jupyter.service <<UNIT
[Unit]
Description=Jupyter Lab (factory)
After=network.target factory-firstboot.service
Requires=factory-firstboot.service

[Service]
User=jupyter
Group=jupyter
WorkingDirectory=/srv/jupyter/notebooks
# JUPYTER_TOKEN is generated on first boot; it is never baked into the image.
EnvironmentFile=/etc/factory/jupyter.env
ExecStart=/opt/conda/envs/jupyter/bin/jupyter lab --no-browser --ip=127.0.0.1 --port=${JUPYTER_PORT}
Restart=on-failure
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full

[Install]
WantedBy=multi-user.target
UNIT
systemctl enable jupyter.service
