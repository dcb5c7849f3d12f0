#!/usr/bin/env bash
# Stage: conda environments. Installs each locked environment from the shipped payload with
# the rattler installer; nothing is solved or downloaded here. It runs on the build host, in
# a chroot of the image at native speed, before the build VM boots (factory/assemble.py).
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
echo "factory-step: conda environments"

rattler_dir=/opt/factory/installer
rm -rf "$rattler_dir"
install -d -m 755 "$rattler_dir"
for wheel in "$FACTORY_PAYLOAD"/installer/*.whl; do
    python3 -m zipfile -e "$wheel" "$rattler_dir"
done
if [ "$INSTALLER" = rattler ]; then
    install -d -m 755 "$FACTORY_CONDA_ENVS"
    for env in $ENVIRONMENTS; do
        echo "factory-step: conda environment $env"
        PYTHONPATH="$rattler_dir" python3 "$FACTORY_PAYLOAD/install_env.py" \
            "$FACTORY_PAYLOAD" "$env" "$FACTORY_CONDA_ENVS/$env"
    done
else
    # Miniconda or Miniforge, checked against the profile's sha256 on the build host. The
    # environments come from the same locks and the same shipped channel, offline.
    echo "factory-step: $INSTALLER into $FACTORY_CONDA_PREFIX"
    rm -rf "$FACTORY_CONDA_PREFIX"
    bash "$FACTORY_PAYLOAD/conda-installer/installer.sh" -b -p "$FACTORY_CONDA_PREFIX"
    for env in $ENVIRONMENTS; do
        echo "factory-step: conda environment $env"
        "$FACTORY_CONDA_PREFIX/bin/conda" create --yes --quiet --offline \
            --prefix "$FACTORY_CONDA_ENVS/$env" \
            --file "$FACTORY_PAYLOAD/envs/$env/explicit.local.txt"
        if grep -q -- '--hash' "$FACTORY_PAYLOAD/envs/$env/pip.txt"; then
            "$FACTORY_CONDA_ENVS/$env/bin/python" -m pip install --no-index --no-deps \
                --require-hashes --disable-pip-version-check \
                --find-links "$FACTORY_PAYLOAD/wheels" -r "$FACTORY_PAYLOAD/envs/$env/pip.txt"
        fi
    done
    "$FACTORY_CONDA_PREFIX/bin/conda" clean --all --yes --quiet
    # `conda activate <env>` from a login shell.
    ln -sf "$FACTORY_CONDA_PREFIX/etc/profile.d/conda.sh" /etc/profile.d/conda.sh
fi
# The installer stays in the image: factory-env uses it to create environments offline.
install -m 755 "$FACTORY_PAYLOAD/factory-env" /usr/local/bin/factory-env

if [ "${OFFLINE:-0}" = 1 ]; then
    echo "factory-step: private channel and wheelhouse"
    rm -rf /opt/factory/channel /opt/factory/wheelhouse
    cp -r "$FACTORY_PAYLOAD/channel" /opt/factory/channel
    cp -r "$FACTORY_PAYLOAD/wheels" /opt/factory/wheelhouse
    cat > "$FACTORY_CONDA_PREFIX/.condarc" <<'CONDARC'
# Installed by factory: this image is air-gapped; only its private channel is used.
channels:
  - file:///opt/factory/channel
default_channels: []
offline: true
CONDARC
    cat > /etc/pip.conf <<'PIPCONF'
# Installed by factory: this image is air-gapped; pip installs only from its wheelhouse.
[global]
no-index = true
find-links = /opt/factory/wheelhouse
PIPCONF
fi

# The installer writes some metadata owner-only; every user must be able to read the envs.
chmod -R a+rX "$FACTORY_CONDA_PREFIX" /opt/factory

cat > /etc/profile.d/factory-conda.sh <<PROFILE
# Installed by factory: 'factory-activate ENV' puts an environment first on PATH.
factory-activate() {
    if [ ! -x "$FACTORY_CONDA_ENVS/\$1/bin/python" ]; then
        echo "no environment '\$1' in $FACTORY_CONDA_ENVS" >&2
        return 1
    fi
    export CONDA_PREFIX="$FACTORY_CONDA_ENVS/\$1" CONDA_DEFAULT_ENV="\$1"
    export PATH="$FACTORY_CONDA_ENVS/\$1/bin:\$PATH"
}
PROFILE
