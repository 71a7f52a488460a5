#!/usr/bin/env bash
# Installs the host packages that building the guest images, running the
# nested test lane and the metrics tests (Prometheus, promtool) need, on a
# Debian bookworm machine. Idempotent: it does nothing when everything is
# already present.
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
    # The guest's ext4 root disk (mke2fs -d).
    [mke2fs]=e2fsprogs
    # The metrics tests: promtool checks the scrape text, a real Prometheus scrapes tidevm.
    [prometheus]=prometheus
    [promtool]=prometheus
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

# The archive that serves bookworm itself, read from the machine's own apt sources (one-line
# `deb URI bookworm ...` or deb822 `URIs:` with `Suites: bookworm`): backports come from the same
# place, so no mirror's host name is written here.
bookworm_archive() {
    local file
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$file" ] || continue
        awk '$1 == "deb" { i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
             if ($(i + 1) == "bookworm") { print $i; exit } }' "$file"
    done
    for file in /etc/apt/sources.list.d/*.sources; do
        [ -r "$file" ] || continue
        # deb822 stanzas are separated by blank lines; pick the one whose Suites has bookworm.
        awk 'BEGIN { RS = ""; FS = "\n" }
             { uri = ""; suite = 0
               for (n = 1; n <= NF; n++) {
                   if ($n ~ /^URIs:/) { split($n, f, /[ \t]+/); uri = f[2] }
                   if ($n ~ /^Suites:/ && $n ~ /[ \t]bookworm([ \t]|$)/) suite = 1
               }
               if (suite && uri != "") { print uri; exit } }' "$file"
    done
}

if [ "$need_qemu" -eq 1 ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    archive="$(bookworm_archive | head -1)"
    if [ -z "$archive" ]; then
        echo "deps: no apt source serves bookworm on this machine, so bookworm-backports (for QEMU 10) cannot be derived; add it by hand" >&2
        exit 1
    fi
    echo "deps: adding the bookworm-backports apt source from $archive"
    $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<SRC
Types: deb
URIs: $archive
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
