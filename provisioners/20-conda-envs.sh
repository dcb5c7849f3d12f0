#!/usr/bin/env bash
# Stage: conda environments. Installs each locked environment from the shipped payload with
# the rattler installer; nothing is solved or downloaded here.
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: conda environments"

installer=/opt/factory/installer
rm -rf "$installer"
install -d -m 755 "$installer"
for wheel in "$FACTORY_PAYLOAD"/installer/*.whl; do
    python3 -m zipfile -e "$wheel" "$installer"
done
install -d -m 755 /opt/conda/envs
for env in $ENVIRONMENTS; do
    echo "factory-step: conda environment $env"
    PYTHONPATH="$installer" python3 "$FACTORY_PAYLOAD/install_env.py" \
        "$FACTORY_PAYLOAD" "$env" "/opt/conda/envs/$env"
done
# The installer writes some metadata owner-only; every user must be able to read the envs.
chmod -R a+rX /opt/conda

cat > /etc/profile.d/factory-conda.sh <<'PROFILE'
# Installed by factory: `factory-activate ENV` puts an environment first on PATH.
factory-activate() {
    if [ ! -x "/opt/conda/envs/$1/bin/python" ]; then
        echo "no environment '$1' in /opt/conda/envs" >&2
        return 1
    fi
    export CONDA_PREFIX="/opt/conda/envs/$1" CONDA_DEFAULT_ENV="$1"
    export PATH="/opt/conda/envs/$1/bin:$PATH"
}
PROFILE
