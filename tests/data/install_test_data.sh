#!/usr/bin/env bash
# Real validation data that Debian packages ship (no download at test time): installed once, as root.
#   r-bioc-hsmmsinglecell  HSMM myoblast time course (Trapnell et al. 2014): stemness must not run backwards
# Tests that need these skip with a reason on a developer machine and fail under CI=true when absent.
set -euo pipefail
PACKAGES=(r-bioc-hsmmsinglecell)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
[ ${#missing[@]} -eq 0 ] && { echo "install_test_data.sh: ${PACKAGES[*]} present"; exit 0; }
if [ "$(id -u)" != 0 ]; then
    echo "install_test_data.sh: run as root to apt-get install ${missing[*]}" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install_test_data.sh: installed ${missing[*]}"
