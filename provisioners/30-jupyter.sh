#!/usr/bin/env bash
# Stage: Jupyter Lab as a systemd service of the unprivileged user `jupyter`, bound to 127.0.0.1,
# with nginx in front serving HTTPS on 443 (and redirecting HTTP). Part of the system layer: the
# kernels and the client's TLS files come later, with the environments (40-jupyter-client.sh).
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: jupyter"

if ! id jupyter >/dev/null 2>&1; then
    useradd --system --create-home --home-dir "$FACTORY_JUPYTER_HOME" --shell /usr/sbin/nologin jupyter
fi
install -d -m 750 -o jupyter -g jupyter "$FACTORY_NOTEBOOKS_DIR"

cat > /etc/systemd/system/jupyter.service <<UNIT
[Unit]
Description=Jupyter Lab (factory)
After=network.target factory-firstboot.service
Requires=factory-firstboot.service

[Service]
User=jupyter
Group=jupyter
WorkingDirectory=${FACTORY_NOTEBOOKS_DIR}
# JUPYTER_TOKEN is generated on first boot; it is never baked into the image.
EnvironmentFile=${FACTORY_JUPYTER_TOKEN_FILE}
ExecStart=${FACTORY_CONDA_ENVS}/jupyter/bin/jupyter lab --no-browser --ip=127.0.0.1 --port=${JUPYTER_PORT} \\
    --ServerApp.allow_remote_access=True --ServerApp.trust_xheaders=True \\
    --ServerApp.authenticate_prometheus=False
Restart=on-failure
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=full

[Install]
WantedBy=multi-user.target
UNIT
systemctl enable jupyter.service
# A new token on demand, made as on first boot (root only).
install -m 700 "$FACTORY_PAYLOAD/factory-rotate-token" /usr/local/sbin/factory-rotate-token

# nginx: HTTPS on 443 with the first-boot (or the client's) certificate, HTTP redirects.
rm -f /etc/nginx/sites-enabled/default
cat > /etc/nginx/sites-available/jupyter <<NGINX
# Installed by factory.
# The access log names the path without its query string (\$uri, not \$request) and no
# referer: Jupyter links carry ?token=..., which must never reach a log.
log_format factory_no_query '\$remote_addr - \$remote_user [\$time_local] '
                            '"\$request_method \$uri \$server_protocol" \$status '
                            '\$body_bytes_sent "\$http_user_agent"';
map \$http_upgrade \$connection_upgrade {
    default upgrade;
    ''      close;
}
server {
    listen 80 default_server;
    listen [::]:80 default_server;
    return 301 https://\$host\$request_uri;
}
server {
    listen 443 ssl default_server;
    listen [::]:443 ssl default_server;
    ssl_certificate ${FACTORY_TLS_CERTIFICATE};
    ssl_certificate_key ${FACTORY_TLS_KEY};
    ssl_protocols TLSv1.2 TLSv1.3;
    server_tokens off;
    client_max_body_size 512m;
    access_log /var/log/nginx/jupyter-access.log factory_no_query;
    add_header Strict-Transport-Security "max-age=31536000" always;
    # Jupyter's metrics are for the local Prometheus only.
    location = /metrics { return 403; }
    # The client's services (the profile's services), each at /<name>/.
    include ${FACTORY_NGINX_SERVICES_DIR}/*.conf;
    location / {
        proxy_pass http://127.0.0.1:${JUPYTER_PORT};
        proxy_http_version 1.1;
        proxy_set_header Host \$host;
        proxy_set_header X-Real-IP \$remote_addr;
        proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto \$scheme;
        proxy_set_header Upgrade \$http_upgrade;
        proxy_set_header Connection \$connection_upgrade;
        proxy_read_timeout 86400s;
        proxy_send_timeout 86400s;
        proxy_buffering off;
    }
}
NGINX
ln -sf /etc/nginx/sites-available/jupyter /etc/nginx/sites-enabled/jupyter
install -d -m 755 "$FACTORY_NGINX_SERVICES_DIR"
install -d -m 755 /etc/systemd/system/nginx.service.d
cat > /etc/systemd/system/nginx.service.d/50-factory.conf <<'UNIT'
# The certificate is made on first boot.
[Unit]
After=factory-firstboot.service
Requires=factory-firstboot.service
UNIT
install -d -m 755 "$FACTORY_TLS_DIR"
systemctl enable nginx.service
