#!/usr/bin/env bash
# Last step before export: remove the build user, host keys, identities, caches, crash dumps
# and logs, then power off. Runs as packer's shutdown command. Any failure stops here, with
# the failed line in the build log, and the VM does not power off: packer then fails the
# build instead of exporting a half-sealed image.
set -euo pipefail
trap 'echo "seal: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
# shellcheck source=/dev/null
. /etc/factory/settings.sh
echo "factory-step: seal"
# apt's timers too: they would hold apt's lock or fetch package lists again behind us.
for unit in jupyter.service nginx.service apt-daily.timer apt-daily-upgrade.timer \
    apt-daily.service apt-daily-upgrade.service; do
    if systemctl cat "$unit" >/dev/null 2>&1; then
        systemctl stop "$unit"
    fi
done

rm -f "$FACTORY_JUPYTER_TOKEN_FILE"
if [ ! -e "$FACTORY_TLS_CLIENT_SUPPLIED" ]; then
    rm -f "$FACTORY_TLS_KEY" "$FACTORY_TLS_CERTIFICATE"
fi
# The first boot copies the token to the admin's home (the admin may come in a later layer).
rm -f /home/*/jupyter-token /root/jupyter-token
rm -rf "$FACTORY_JUPYTER_HOME/.local/share/jupyter/runtime"
rm -rf /var/cache/factory-rattler

rm -f /etc/ssh/ssh_host_*
# DKMS's module-signing key was made with the base layer, so every image would share it.
rm -f /var/lib/dkms/mok.key
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
# Every clone would start from the same entropy seed.
rm -f /var/lib/systemd/random-seed
cloud-init clean --logs --seed
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# Crash dumps hold process memory from the build.
rm -rf /var/crash/* /var/lib/systemd/coredump/*
rm -rf /root/.bash_history /root/.python_history /root/.cache /root/.conda
find /var/log -type f \( -name '*.gz' -o -name '*.[0-9]' \) -delete
find /var/log -type f -exec truncate -s 0 {} +
rm -rf /var/log/journal/*

rm -f /etc/sudoers.d/90-cloud-init-users
# --force: packer is still logged in as the build user, running this script.
userdel --force --remove "$BUILD_USER" 2>/dev/null || echo "seal: userdel $BUILD_USER exit $?" >&2
if getent passwd "$BUILD_USER" >/dev/null; then
    echo "seal: the build user $BUILD_USER is still there" >&2
    exit 1
fi
rm -rf "/home/${BUILD_USER:?}"
# Dotfiles too, which a plain /tmp/* misses.
find /tmp /var/tmp -mindepth 1 -maxdepth 1 -exec rm -rf -- {} +
sync
# A cluster that stops the VM through its own API (Proxmox) asks for no power-off here.
if [ "${FACTORY_SEAL_POWEROFF:-1}" = 1 ]; then
    systemctl poweroff --no-block
fi
