#!/usr/bin/env bash
# Stage: the client's services (profile `services`). Each runs as the systemd unit
# factory-service-<name> under its own user svc-<name>, from /srv/services/<name>, listening on
# 127.0.0.1 only; nginx serves it at https://HOST/<name>/ with the image's TLS. Secrets are
# made on first boot, never here. Runs in the client layer (a chroot of the image).
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
[ -d "$FACTORY_PAYLOAD/services" ] || exit 0
echo "factory-step: client services"

install -d -m 755 "$FACTORY_SERVICES_DIR" "$FACTORY_NGINX_SERVICES_DIR"
install -d -m 700 "$FACTORY_SERVICES_CONFIG_DIR"
cat > /usr/local/sbin/factory-service-secrets <<SCRIPT
#!/bin/sh
# Installed by factory: give each secret a service names a random value, once per machine.
set -eu
name=\$1
list="$FACTORY_SERVICES_CONFIG_DIR/\$name.secrets"
env_file="$FACTORY_SERVICES_CONFIG_DIR/\$name.env"
[ -s "\$env_file" ] && exit 0
umask 077
while read -r variable; do
    [ -n "\$variable" ] || continue
    printf '%s=%s\n' "\$variable" "\$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')"
done < "\$list" > "\$env_file.new"
mv "\$env_file.new" "\$env_file"
SCRIPT
chmod 700 /usr/local/sbin/factory-service-secrets

for source in "$FACTORY_PAYLOAD"/services/*/; do
    name=$(basename "$source")
    user=$(cat "$source/user")
    folder="$FACTORY_SERVICES_DIR/$name"
    if ! id "$user" >/dev/null 2>&1; then
        useradd --system --home-dir "$folder" --no-create-home --shell /usr/sbin/nologin "$user"
    fi
    # The service reads its files; it cannot change them.
    install -d -m 755 -o root -g root "$folder"
    for file in "$source"/files/*; do
        [ -e "$file" ] || continue
        install -m 644 -o root -g root "$file" "$folder/"
    done
    install -m 600 "$source/secrets" "$FACTORY_SERVICES_CONFIG_DIR/$name.secrets"
    install -m 644 "$source"/factory-service-*.service /etc/systemd/system/
    install -m 644 "$source/nginx.conf" "$FACTORY_NGINX_SERVICES_DIR/$name.conf"
    systemctl enable "factory-service-$name.service"
done
