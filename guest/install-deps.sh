#!/usr/bin/env bash
# Installs the host packages that building the guest images and running the
# nested test lane need, on a Debian bookworm machine. Idempotent: it does
# nothing when everything is already present.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive

# Tools needed from bookworm itself (command -> package).
declare -A NEEDED=(
    [zstd]=zstd
    [xz]=xz-utils
    [cpio]=cpio
    [gzip]=gzip
    [modinfo]=kmod
    [file]=file
    [make]=make
)
missing=()
for tool in "${!NEEDED[@]}"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("${NEEDED[$tool]}")
done

# QEMU must be 10.x from bookworm-backports: it emulates AMD SVM with nested
# paging under TCG, which the nested lane depends on.
need_qemu=0
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    need_qemu=1
elif ! qemu-system-x86_64 --version | head -1 | grep -Eq 'version (9|[1-9][0-9])\.'; then
    need_qemu=1
fi

if [ "${#missing[@]}" -eq 0 ] && [ "$need_qemu" -eq 0 ]; then
    exit 0
fi

if [ "$need_qemu" -eq 1 ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    echo "deps: adding the bookworm-backports apt source"
    $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

$SUDO apt-get update -qq
if [ "${#missing[@]}" -gt 0 ]; then
    echo "deps: installing ${missing[*]}"
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ "$need_qemu" -eq 1 ]; then
    echo "deps: installing qemu-system-x86 from bookworm-backports"
    $SUDO apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
fi
