#!/bin/bash
# Builds the image's root filesystem from Debian packages alone, with
# mmdebstrap (no registry, no container engine): the essential set plus
# the packages listed in ./packages, merged /usr (without the hook, usrmerge
# pulls in perl), no docs, man pages or locales.
# Usage: rootfs.sh <packages-file> <out.tar>
set -euo pipefail
list=$1 out=$2
include=$(grep -v '^[[:space:]]*\(#\|$\)' "$list" | paste -sd, -)
# A fixed SOURCE_DATE_EPOCH makes mmdebstrap's own timestamps fixed, so the
# same package versions give the same tar.
export SOURCE_DATE_EPOCH=0
mmdebstrap --quiet --variant=essential --format=tar \
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
  --include="$include" \
  --dpkgopt='path-exclude=/usr/share/doc/*' \
  --dpkgopt='path-exclude=/usr/share/man/*' \
  --dpkgopt='path-exclude=/usr/share/locale/*' \
  --dpkgopt='path-include=/usr/share/doc/*/copyright' \
  bookworm "$out.tmp" \
  "deb http://deb.debian.org/debian bookworm main" \
  "deb http://deb.debian.org/debian bookworm-updates main" \
  "deb http://deb.debian.org/debian-security bookworm-security main"
mv "$out.tmp" "$out"
