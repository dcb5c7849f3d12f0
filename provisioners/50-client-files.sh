#!/usr/bin/env bash
# Stage: client files. The profile's sample notebooks go into Jupyter's home.
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: client files"

samples=$FACTORY_SAMPLES_DIR
install -d -m 750 -o jupyter -g jupyter "$samples"
for notebook in "$FACTORY_PAYLOAD"/notebooks/*.ipynb; do
    [ -e "$notebook" ] || continue
    install -m 640 -o jupyter -g jupyter "$notebook" "$samples/"
done
