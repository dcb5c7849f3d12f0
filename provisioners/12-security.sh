#!/usr/bin/env bash
# Stage: system hardening. Firewall and audit; the journal's retention and automatic updates
# are the client layer's (55-retention-updates.sh).
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: security"

# nftables: drop every inbound port the profile does not name.
if [ "$FIREWALL" = 1 ]; then
    ports=$(echo "$OPEN_PORTS" | tr ' ' ',')
    cat > /etc/nftables.conf <<NFT
#!/usr/sbin/nft -f
# Installed by factory: inbound traffic is dropped unless it goes to a port the profile names.
flush ruleset
table inet factory {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iif "lo" accept
        meta l4proto { 1, 58 } accept comment "ICMP and ICMPv6"
        udp dport { 68, 546 } accept comment "DHCP replies"
        tcp dport { $ports } accept comment "ports the profile opens"
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
    }
}
NFT
    nft -c -f /etc/nftables.conf
    systemctl enable nftables.service
else
    systemctl disable nftables.service 2>/dev/null || true
fi

# Name resolution answers nobody on the network (no LLMNR or mDNS listeners).
install -d -m 755 /etc/systemd/resolved.conf.d
cat > /etc/systemd/resolved.conf.d/50-factory.conf <<'CONF'
# Installed by factory: no multicast name service listening on the network.
[Resolve]
LLMNR=no
MulticastDNS=no
CONF

# auditd: logins, sudo, accounts, sshd, PAM, time, kernel modules, commands people run as
# root, and reads of the Jupyter token. The rules are locked until the next boot (-e 2).
cat > /etc/audit/rules.d/50-factory.rules <<'RULES'
## Installed by factory: what a compliance review asks for.
-w /var/log/wtmp -p wa -k factory-login
-w /var/log/btmp -p wa -k factory-login
-w /var/log/lastlog -p wa -k factory-login
-w /usr/bin/sudo -p x -k factory-sudo
-w /etc/sudoers -p wa -k factory-privileges
-w /etc/sudoers.d/ -p wa -k factory-privileges
-w /etc/passwd -p wa -k factory-accounts
-w /etc/shadow -p wa -k factory-accounts
-w /etc/group -p wa -k factory-accounts
-w /etc/ssh/sshd_config -p wa -k factory-sshd
-w /etc/ssh/sshd_config.d/ -p wa -k factory-sshd
-w /etc/pam.d/ -p wa -k factory-pam
-a always,exit -F arch=b64 -S adjtimex,settimeofday,clock_settime -k factory-time
-w /etc/localtime -p wa -k factory-time
-a always,exit -F arch=b64 -S init_module,finit_module,delete_module -k factory-modules
-a always,exit -F arch=b64 -S execve -F euid=0 -F auid>=1000 -F auid!=unset -k factory-root-commands
RULES
# Reads of the Jupyter token (its path comes from settings.sh).
echo "-w $FACTORY_JUPYTER_TOKEN_FILE -p r -k factory-jupyter-token" >> /etc/audit/rules.d/50-factory.rules
cat > /etc/audit/rules.d/99-factory-lock.rules <<'RULES'
## Installed by factory: no rule changes until the next boot.
-e 2
RULES
# Audit logs rotate at 50 MB and are never deleted, so the retention the profile asks for holds
# until the disk runs short: then auditd warns in syslog, and at the last 50 MB it takes the
# machine to single-user mode rather than stop recording (Debian's default is to suspend).
sed -i -e "s/^max_log_file_action = .*/max_log_file_action = KEEP_LOGS/" \
    -e "s/^max_log_file = .*/max_log_file = 50/" \
    -e "s/^space_left_action = .*/space_left_action = SYSLOG/" \
    -e "s/^admin_space_left_action = .*/admin_space_left_action = SINGLE/" \
    -e "s/^disk_full_action = .*/disk_full_action = SINGLE/" \
    -e "s/^disk_error_action = .*/disk_error_action = SYSLOG/" /etc/audit/auditd.conf
systemctl enable auditd.service

# Automatic updates stay off while the image is built, so that no apt run holds the package
# lock under a later stage; the client layer (55-retention-updates.sh) turns them on when the
# profile asks.
cat > /etc/apt/apt.conf.d/20auto-upgrades <<CONF
// Installed by factory: automatic security updates are off.
APT::Periodic::Update-Package-Lists "0";
APT::Periodic::Unattended-Upgrade "0";
CONF
systemctl disable apt-daily.timer apt-daily-upgrade.timer 2>/dev/null || true
