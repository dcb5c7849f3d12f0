#!/usr/bin/env bash
# Stage: the client's part of Jupyter, once the environments are in: a kernel for each
# environment that has ipykernel, how long nginx keeps its access logs, and the client's TLS
# files when the profile supplies them (otherwise the first boot makes a certificate). Runs on
# the build host, in a chroot of the image (factory/chain.py), or in the build VM.
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: jupyter kernels"

for env in $ENVIRONMENTS; do
    python="$FACTORY_CONDA_ENVS/$env/bin/python"
    if [ "$env" != jupyter ] && "$python" -c 'import ipykernel' 2>/dev/null; then
        "$python" -m ipykernel install --prefix "$FACTORY_CONDA_ENVS/jupyter" \
            --name "$env" --display-name "Python ($env)"
    fi
done

# nginx's access logs are kept as long as the audit logs.
sed -i -e "s/^\trotate .*/\trotate ${AUDIT_RETENTION_DAYS}/" -e "s/^\tweekly/\tdaily/" \
    /etc/logrotate.d/nginx

install -d -m 755 "$FACTORY_TLS_DIR"
if [ -s "$FACTORY_PAYLOAD/tls/jupyter.crt" ]; then
    install -m 644 "$FACTORY_PAYLOAD/tls/jupyter.crt" "$FACTORY_TLS_CERTIFICATE"
    install -m 600 "$FACTORY_PAYLOAD/tls/jupyter.key" "$FACTORY_TLS_KEY"
    touch "$FACTORY_TLS_CLIENT_SUPPLIED"
fi
