#!/usr/bin/env bash
# Installs the Debian tools the test suite drives (real NBD clients, fio, filesystem tools).
# Idempotent: only calls apt-get when something is missing.
set -euo pipefail

PACKAGES=(
  libnbd-bin      # nbdinfo, nbdcopy, nbdfuse
  python3-libnbd  # nbdsh and `import nbd` (with /usr/bin/python3)
  qemu-utils      # qemu-io, qemu-img, qemu-nbd
  fio             # fio --ioengine=nbd
  nbdkit          # peer server used by some tests and the benchmarks
  fuse3           # fusermount3 for nbdfuse
  e2fsprogs       # mkfs.ext4, e2fsck
  gnutls-bin      # certtool, for TLS test certificates in the GnuTLS layout
  openssl
  util-linux      # losetup, mount
  nftables        # wire-byte counters in tests and benchmarks
  csync2          # comparison peer for filed
  iproute2
  resource-agents # ocf-tester for the Pacemaker agents
  libxml2-utils   # xmllint (ocf-tester)
  curl            # the user guide's commands (metrics scrape)
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]})); then
  echo "installing: ${missing[*]}" >&2
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
