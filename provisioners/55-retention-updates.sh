#!/usr/bin/env bash
# Stage: the profile's log retention and automatic security updates. Runs in the client layer
# (a chroot of the image, factory/chain.py) or in the build VM, so that profiles that differ
# only in these settings share one system layer.
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: log retention and automatic updates"

# journald: persistent, kept for the retention period. Its size caps are explicit (a quarter of
# the root file system, keeping 10% free) so that the default 4 GiB cap does not cut it short.
root_mib=$(df --output=size -BM / | tail -1 | tr -dc 0-9)
install -d -m 755 /etc/systemd/journald.conf.d
cat > /etc/systemd/journald.conf.d/50-factory.conf <<CONF
# Installed by factory: logins, sudo and service logs survive reboots for the review period.
[Journal]
Storage=persistent
MaxRetentionSec=${AUDIT_RETENTION_DAYS}day
SystemMaxUse=$(( root_mib / 4 ))M
SystemKeepFree=$(( root_mib / 10 ))M
CONF
install -d -m 2755 -g systemd-journal /var/log/journal

# Automatic security updates: on or off as the profile says (always off when air-gapped).
if [ "$UNATTENDED_UPGRADES" = 1 ]; then
    value=1
else
    value=0
fi
cat > /etc/apt/apt.conf.d/20auto-upgrades <<CONF
// Installed by factory: automatic security updates are $([ "$value" = 1 ] && echo on || echo off).
APT::Periodic::Update-Package-Lists "$value";
APT::Periodic::Unattended-Upgrade "$value";
CONF
if [ "$value" = 1 ]; then
    systemctl enable apt-daily.timer apt-daily-upgrade.timer
else
    systemctl disable apt-daily.timer apt-daily-upgrade.timer 2>/dev/null || true
fi
