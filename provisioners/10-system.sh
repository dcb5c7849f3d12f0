#!/usr/bin/env bash
# Stage: system. sshd hardening and the first-boot unit. The client's admin user comes
# later, in the client layer (60-admin.sh), so that clients on one preset share this layer.
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: system"

install -d -m 755 /etc/ssh/sshd_config.d
# sshd keeps the first value it reads: 00- sorts before any drop-in cloud-init or a package
# adds. TCP forwarding stays on: the validator reaches Jupyter through it.
rm -f /etc/ssh/sshd_config.d/50-factory.conf
cat > /etc/ssh/sshd_config.d/00-factory.conf <<'CONF'
# Installed by factory: keys only, no root.
PermitRootLogin no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitEmptyPasswords no
X11Forwarding no
MaxAuthTries 3
LoginGraceTime 30
CONF
sshd -t
passwd --lock root >/dev/null

# Installed, so that first boot, token rotation and sealing read the same settings.
install -d -m 755 "$FACTORY_CONFIG_DIR"
install -m 644 "$FACTORY_PAYLOAD/settings.sh" "$FACTORY_CONFIG_DIR/settings.sh"
install -m 755 "$FACTORY_PAYLOAD/factory-firstboot" /usr/local/sbin/factory-firstboot
install -m 644 "$FACTORY_PAYLOAD/factory-firstboot.service" /etc/systemd/system/
systemctl enable factory-firstboot.service

# The base image's grub.cfg was written by hand; regenerate it on a real disk.
update-grub 2>&1 | tail -n 2
