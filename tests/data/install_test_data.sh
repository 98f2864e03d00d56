#!/usr/bin/env bash
# Real validation data that Debian packages ship (no download at test time), unpacked without installing
# them (the HSMM package would pull in R, ~90 packages):
#   r-bioc-hsmmsinglecell  HSMM myoblast time course (Trapnell et al. 2014): stemness must not run backwards
# Prints `export METASTEM_HSMM_DATA=...` for the caller to eval. Tests that need the data skip with a
# reason on a developer machine and fail under CI=true when it is absent.
set -euo pipefail
DEST=${METASTEM_TEST_DATA:-/var/cache/metastem-test-data}
HSMM=/usr/lib/R/site-library/HSMMSingleCell/data
if [ -d "$HSMM" ]; then echo "export METASTEM_HSMM_DATA=$HSMM"; exit 0; fi
if [ ! -d "$DEST/hsmm$HSMM" ]; then
    mkdir -p "$DEST/debs"
    ( cd "$DEST/debs" && { apt-get download r-bioc-hsmmsinglecell >/dev/null 2>&1 || \
        { apt-get update -qq >/dev/null && apt-get download r-bioc-hsmmsinglecell >/dev/null; }; } )
    dpkg -x "$DEST"/debs/r-bioc-hsmmsinglecell_*.deb "$DEST/hsmm"
fi
[ -f "$DEST/hsmm$HSMM/HSMM_expr_matrix.rda" ] || { echo "install_test_data.sh: HSMM data not found after unpacking" >&2; exit 1; }
echo "export METASTEM_HSMM_DATA=$DEST/hsmm$HSMM"
