#!/usr/bin/env bash
# Stage: the client's admin user, with only the profile's SSH keys and sudo. Runs in the
# client layer, on the build host in a chroot of the image (factory/chain.py), or in the VM.
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: admin user $ADMIN_USER"

if ! id "$ADMIN_USER" >/dev/null 2>&1; then
    useradd --create-home --shell /bin/bash --groups sudo "$ADMIN_USER"
fi
passwd --lock "$ADMIN_USER" >/dev/null
admin_home=$(getent passwd "$ADMIN_USER" | cut -d: -f6)
install -d -m 700 -o "$ADMIN_USER" -g "$ADMIN_USER" "$admin_home/.ssh"
install -m 600 -o "$ADMIN_USER" -g "$ADMIN_USER" \
    "$FACTORY_PAYLOAD/admin_authorized_keys" "$admin_home/.ssh/authorized_keys"
printf '%s ALL=(ALL) NOPASSWD:ALL\n' "$ADMIN_USER" > /etc/sudoers.d/50-factory-admin
chmod 440 /etc/sudoers.d/50-factory-admin
visudo -c >/dev/null
