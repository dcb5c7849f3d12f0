#!/usr/bin/env bash
# Last step before export: remove the build user, host keys, identities, caches and logs,
# then power off. Runs as packer's shutdown command.
set -uo pipefail
# shellcheck source=/dev/null
. /etc/factory/settings.sh
echo "factory-step: seal"
systemctl stop jupyter.service nginx.service 2>/dev/null || true

rm -f /etc/factory/jupyter.env
if [ ! -e /etc/factory/tls/client-supplied ]; then
    rm -f /etc/factory/tls/jupyter.key /etc/factory/tls/jupyter.crt
fi
admin_home=$(getent passwd "$ADMIN_USER" | cut -d: -f6)
rm -f "$admin_home/jupyter-token"
rm -rf /srv/jupyter/.local/share/jupyter/runtime
rm -rf /var/cache/factory-rattler

rm -f /etc/ssh/ssh_host_*
# DKMS's module-signing key was made with the base layer, so every image would share it.
rm -f /var/lib/dkms/mok.key
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
cloud-init clean --logs --seed >/dev/null 2>&1 || true
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
rm -f /root/.bash_history
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -rf /var/log/journal/*

rm -f /etc/sudoers.d/90-cloud-init-users
userdel --force --remove "$BUILD_USER" 2>/dev/null || true
rm -rf "/home/${BUILD_USER:?}"
rm -rf /tmp/factory-payload /tmp/* /var/tmp/*
sync
systemctl poweroff --no-block
