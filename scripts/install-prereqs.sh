#!/usr/bin/env bash
# Installs what building and testing lb needs on a Debian machine, and nothing that is
# already there: running it twice installs nothing the second time.
#
#   - rust-src for the nightly toolchain (lb-ebpf is built with -Z build-std)
#   - llvm-22-dev (bpf-linker links against it)
#   - bpf-linker built against LLVM 22
#   - llvm-tools for the stable toolchain (llvm-profdata: `cargo xtask build --pgo`; Debian's
#     llvm-22, which llvm-22-dev brings, is the fall-back)
#   - iproute2 and ethtool (tests and the demo build topologies with them)
#   - promtool (Debian's prometheus package: a test checks the /metrics output with it)
#   - BOLT for LLVM 22 (llvm-bolt, merge-fdata: the last step of `cargo xtask build --pgo`)
#   - a bpffs mount at /sys/fs/bpf (lb pins its maps there)
#
# Needs root for apt and mount. xtask calls this when a check fails and we are root;
# otherwise it prints the command to run.
set -euo pipefail

log() { printf 'install-prereqs: %s\n' "$*" >&2; }

need_apt=()
dpkg -s llvm-22-dev >/dev/null 2>&1 || need_apt+=(llvm-22-dev)
command -v ip >/dev/null 2>&1 || need_apt+=(iproute2)
command -v ethtool >/dev/null 2>&1 || need_apt+=(ethtool)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
{ [ -x /usr/lib/llvm-22/bin/llvm-bolt ] && [ -x /usr/lib/llvm-22/bin/merge-fdata ]; } || need_apt+=(bolt-22)

if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi

if ! rustup toolchain list | grep -q '^nightly'; then
  log "rustup toolchain install nightly"
  rustup toolchain install nightly --profile minimal
fi
if ! rustup component list --toolchain nightly --installed 2>/dev/null | grep -q '^rust-src'; then
  log "rustup component add rust-src --toolchain nightly"
  rustup component add rust-src --toolchain nightly
fi

if ! rustup component list --installed 2>/dev/null | grep -q '^llvm-tools'; then
  log "rustup component add llvm-tools"
  rustup component add llvm-tools || log "llvm-tools not installed; Debian's llvm-profdata will do if its LLVM matches rustc's"
fi

if ! command -v bpf-linker >/dev/null 2>&1 && [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/bpf-linker" ]; then
  log "cargo install bpf-linker (against LLVM 22, about a minute)"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo +stable install bpf-linker --locked \
    --no-default-features --features llvm-22
fi

if ! mount | grep -q ' on /sys/fs/bpf type bpf'; then
  log "mount -t bpf bpffs /sys/fs/bpf"
  mkdir -p /sys/fs/bpf
  mount -t bpf bpffs /sys/fs/bpf
fi

log "all prerequisites present"
