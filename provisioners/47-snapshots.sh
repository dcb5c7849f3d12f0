#!/usr/bin/env bash
# Stage: the environments' locks as built, kept in the image, and with profile `snapshots`
# the timer that exports every environment and the user-facing configuration to
# $FACTORY_SNAPSHOTS_DIR (`factory-env snapshot`; `factory-env rollback ENV SNAPSHOT`).
# Runs in the client layer (a chroot of the image).
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: locks and snapshots"

rm -rf "$FACTORY_LOCKS_DIR"
for env in $ENVIRONMENTS; do
    install -d -m 755 "$FACTORY_LOCKS_DIR/$env"
    for file in explicit.txt pip.txt; do
        if [ -e "$FACTORY_PAYLOAD/envs/$env/$file" ]; then
            install -m 644 "$FACTORY_PAYLOAD/envs/$env/$file" "$FACTORY_LOCKS_DIR/$env/"
        fi
    done
done

[ -d "$FACTORY_PAYLOAD/snapshots" ] || exit 0
install -d -m 700 "$FACTORY_SNAPSHOTS_DIR"
install -m 644 "$FACTORY_PAYLOAD"/snapshots/factory-snapshot.* /etc/systemd/system/
systemctl enable factory-snapshot.timer
