#!/usr/bin/env bash
# Stage: conda environments. Installs each locked environment from the shipped payload with
# the rattler installer (or Miniconda/Miniforge); nothing is solved or downloaded here. It runs
# on the build host, in a chroot of the image at native speed, one part per layer
# (factory/chain.py):
#   20-conda-envs.sh installer     the installer itself
#   20-conda-envs.sh env NAME      one environment
#   20-conda-envs.sh finish        the offline channel and wheelhouse, shell helpers
# Without an argument it runs every part in order (everything in the build VM).
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
rattler_dir=/opt/factory/installer

install_installer() {
    echo "factory-step: conda installer ($INSTALLER)"
    rm -rf "$rattler_dir"
    install -d -m 755 "$rattler_dir"
    for wheel in "$FACTORY_PAYLOAD"/installer/*.whl; do
        python3 -m zipfile -e "$wheel" "$rattler_dir"
    done
    if [ "$INSTALLER" = rattler ]; then
        install -d -m 755 "$FACTORY_CONDA_ENVS"
    else
        # Miniconda or Miniforge, checked against the profile's sha256 on the build host.
        rm -rf "$FACTORY_CONDA_PREFIX"
        bash "$FACTORY_PAYLOAD/conda-installer/installer.sh" -b -p "$FACTORY_CONDA_PREFIX"
    fi
    # The installer stays in the image: factory-env uses it to create environments offline.
    install -m 755 "$FACTORY_PAYLOAD/factory-env" /usr/local/bin/factory-env
}

install_env() {
    local env=$1
    echo "factory-step: conda environment $env"
    if [ "$INSTALLER" = rattler ]; then
        PYTHONPATH="$rattler_dir" python3 "$FACTORY_PAYLOAD/install_env.py" \
            "$FACTORY_PAYLOAD" "$env" "$FACTORY_CONDA_ENVS/$env"
        return
    fi
    # The environments come from the same locks and the same shipped channel, offline.
    "$FACTORY_CONDA_PREFIX/bin/conda" create --yes --quiet --offline \
        --prefix "$FACTORY_CONDA_ENVS/$env" \
        --file "$FACTORY_PAYLOAD/envs/$env/explicit.local.txt"
    if grep -q -- '--hash' "$FACTORY_PAYLOAD/envs/$env/pip.txt"; then
        "$FACTORY_CONDA_ENVS/$env/bin/python" -m pip install --no-index --no-deps \
            --require-hashes --disable-pip-version-check \
            --find-links "$FACTORY_PAYLOAD/wheels" -r "$FACTORY_PAYLOAD/envs/$env/pip.txt"
    fi
    "$FACTORY_CONDA_PREFIX/bin/conda" clean --all --yes --quiet
}

finish() {
    echo "factory-step: conda finish"
    if [ "$INSTALLER" != rattler ]; then
        # `conda activate <env>` from a login shell.
        ln -sf "$FACTORY_CONDA_PREFIX/etc/profile.d/conda.sh" /etc/profile.d/conda.sh
    fi
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
}

case "${1:-all}" in
installer) install_installer ;;
env) install_env "${2:?20-conda-envs.sh env NAME}" ;;
finish) finish ;;
all)
    install_installer
    for env in $ENVIRONMENTS; do
        install_env "$env"
    done
    finish
    ;;
*)
    echo "20-conda-envs.sh: unknown part '$1' (installer, env NAME, finish)" >&2
    exit 2
    ;;
esac
