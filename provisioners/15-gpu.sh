#!/usr/bin/env bash
# Stage: NVIDIA driver (and CUDA toolkit if asked). On a Debian base built by factory the
# driver is already in the base layer, built by DKMS for the image's kernel; elsewhere it is
# installed here, before any kernel change. Then every kernel in /boot must have the module.
set -euo pipefail
# shellcheck source=/dev/null
. "$FACTORY_PAYLOAD/settings.sh"
# shellcheck source=/dev/null
. /etc/os-release
echo "factory-step: gpu driver $GPU_DRIVER ($ID)"
export DEBIAN_FRONTEND=noninteractive

installed() { dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q 'install ok installed'; }

case "$ID" in
debian)
    module=nvidia-current
    packages=$DEBIAN_GPU_PACKAGES
    [ "$GPU_TOOLKIT" = 1 ] && packages="$packages nvidia-cuda-toolkit"
    missing=""
    for package in $packages; do installed "$package" || missing="$missing $package"; done
    if [ -n "$missing" ]; then
        sed -i -E '/^(deb|Types:)/ s/\bmain\b( contrib)?( non-free)?( non-free-firmware)?$/main contrib non-free non-free-firmware/' \
            /etc/apt/sources.list /etc/apt/sources.list.d/*.sources 2>/dev/null || true
        apt-get update -qq
        # shellcheck disable=SC2086
        apt-get install -y -qq --no-install-recommends $missing
    fi
    ;;
ubuntu)
    module=nvidia
    apt-get update -qq
    flavour=$(uname -r | sed 's/^[0-9.-]*-//')
    # Canonical's precompiled, signed modules where they exist; DKMS otherwise.
    if apt-cache show "linux-modules-nvidia-${GPU_DRIVER}-${flavour}" >/dev/null 2>&1; then
        apt-get install -y -qq "linux-modules-nvidia-${GPU_DRIVER}-${flavour}"
    else
        apt-get install -y -qq --no-install-recommends "nvidia-dkms-${GPU_DRIVER}"
    fi
    apt-get install -y -qq --no-install-recommends "nvidia-utils-${GPU_DRIVER}"
    [ "$GPU_TOOLKIT" = 1 ] && apt-get install -y -qq --no-install-recommends nvidia-cuda-toolkit
    ;;
*)
    echo "factory: no NVIDIA driver recipe for $ID" >&2
    exit 1
    ;;
esac

# The module must exist for every kernel the image can boot.
for image in /boot/vmlinuz-*; do
    kernel=${image#/boot/vmlinuz-}
    if ! modinfo -k "$kernel" "$module" >/dev/null 2>&1; then
        dkms autoinstall -k "$kernel" 2>&1 | tail -n 5 || true
    fi
    vermagic=$(modinfo -k "$kernel" -F vermagic "$module" 2>/dev/null || true)
    case "$vermagic" in
    "$kernel "*) echo "factory: $module built for $kernel" ;;
    *)
        echo "factory: no $module module for kernel $kernel" >&2
        exit 1
        ;;
    esac
done
