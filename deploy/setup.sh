#!/usr/bin/env bash
# kvmscope host set-up: everything `make run` and `make test` need on a fresh
# Debian machine, run as root. Safe to re-run: every step checks first and
# only does what is missing.
#
#   deploy/setup.sh            Debian packages, kernel headers link, tracefs,
#                              the venv with kvmscope installed, /usr/local/bin/kvmscope
#   deploy/setup.sh --test     the above plus the test extras (pytest, ...)
#
# Environment: KVMSCOPE_VENV (default: <repo>/.venv), KVMSCOPE_SKIP_APT=1 to
# skip the package step (e.g. on a host managed by config management).
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${KVMSCOPE_VENV:-$repo/.venv}
want_test=0
[ "${1:-}" = "--test" ] && want_test=1

step() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (needs apt, mounts and the kernel headers link): sudo make ..."
[ -r /etc/debian_version ] || die "this set-up is written for Debian (no /etc/debian_version)"

# --- 1. Debian packages ------------------------------------------------------
# bcc (real one, not PyPI's), kernel headers for bcc, the lab (tgt, libiscsi,
# qemu, libvirt, busybox, a guest kernel), netfilter, prometheus, fio, and
# bpftrace (the reference probe the probe benchmark measures block_io against).
# open-iscsi, multipath-tools and udev are for the lab's kernel-initiator host
# (a guest that runs this machine's userland over 9p): the policy-rc.d below
# keeps their daemons from starting here, and node.startup=manual keeps this
# machine from logging in to anything.
packages=(
  python3-venv python3-bpfcc bpfcc-tools libbpfcc
  linux-headers-amd64
  tgt libiscsi-bin qemu-system-x86 qemu-block-extra qemu-utils
  open-iscsi multipath-tools udev
  libvirt-daemon-system libvirt-clients python3-libvirt
  busybox-static linux-image-amd64 cpio kmod xz-utils zstd
  iptables iproute2 procps psmisc
  prometheus fio bpftrace
  prometheus-node-exporter prometheus-libvirt-exporter   # the peers `make bench` measures kvmscope against
  logrotate
  python3-setuptools python3-wheel python3-seccomp
)
if [ "${KVMSCOPE_SKIP_APT:-0}" != 1 ]; then
  missing=()
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${#missing[@]} Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists of a fresh machine are empty: update first.
    apt-get update -q 2>&1 | sed 's/^/    /' >&2
    # libvirt/prometheus postinst try to start services; without systemd that
    # fails harmlessly, policy-rc.d keeps it quiet.
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; made_policy=1; fi
    apt-get install -y -q --no-install-recommends -o Dpkg::Progress-Fancy=0 "${missing[@]}" 2>&1 \
      | grep -E '^(Setting up|Unpacking|E:|W:)' | sed 's/^/    /' >&2 || true
    [ $made_policy = 1 ] && rm -f "$policy"
    for p in "${missing[@]}"; do
      dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" \
        || die "package $p did not install (see apt-get output above)"
    done
  else
    note "Debian packages: all ${#packages[@]} present"
  fi
fi

# --- 2. kernel headers for bcc -----------------------------------------------
# bcc compiles its C at run time against /lib/modules/$(uname -r)/build. Cloud
# and Firecracker kernels ship none; Debian's generic headers are enough for
# TRACEPOINT_PROBE programs (argument structs come from tracefs format files,
# not from the headers) - see docs/architecture.md.
kver=$(uname -r)
build=/lib/modules/$kver/build
if [ ! -e "$build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$hdr" ] || die "no /usr/src/linux-headers-*-amd64 (package linux-headers-amd64 missing?)"
  common=${hdr%-amd64}-common
  step "linking kernel headers for bcc: $build -> $hdr"
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$hdr" "$build"
  [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$kver/source"
else
  note "kernel headers: $build present"
fi

# --- 3. tracefs / debugfs ----------------------------------------------------
if [ ! -e /sys/kernel/tracing/events ]; then
  step "mounting tracefs on /sys/kernel/tracing"
  mount -t tracefs tracefs /sys/kernel/tracing || note "could not mount tracefs (eBPF probes will report it)"
fi
if ! mountpoint -q /sys/kernel/debug; then
  step "mounting debugfs on /sys/kernel/debug"
  mount -t debugfs debugfs /sys/kernel/debug || note "could not mount debugfs"
fi

# --- 4. the virtual environment ----------------------------------------------
# --system-site-packages: bcc (python3-bpfcc) and libvirt (python3-libvirt)
# exist only for the system interpreter.
if [ ! -x "$venv/bin/python" ]; then
  step "creating virtual environment $venv (system interpreter, system site packages)"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
fi
extra=""
[ $want_test = 1 ] && extra="[test]"
stamp="$venv/.kvmscope-installed$extra"
if [ ! -e "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
  step "installing kvmscope$extra into $venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -e "$repo$extra" 2>&1 | sed 's/^/    /' >&2
  touch "$stamp"
else
  note "venv: kvmscope$extra installed"
fi

# --- 5. kvmscope on root's PATH ---------------------------------------------
if [ "$(readlink /usr/local/bin/kvmscope 2>/dev/null)" != "$venv/bin/kvmscope" ]; then
  step "linking /usr/local/bin/kvmscope -> $venv/bin/kvmscope"
  ln -sfn "$venv/bin/kvmscope" /usr/local/bin/kvmscope
fi
# --- 6. a local Elasticsearch for tests/es (server zip from Maven Central, cached) ---
if [ $want_test = 1 ]; then
  es_home=$(/usr/bin/python3 "$repo/deploy/es/es" fetch) || die "could not fetch Elasticsearch (deploy/es/es fetch)"
  note "elasticsearch: $es_home"
fi

# --- 7. dependency wheels for the offline install tests (tests/deploy) --------
if [ $want_test = 1 ]; then
  wheels=/var/cache/kvmscope/wheels
  wstamp=$wheels/.for-pyproject
  if [ ! -e "$wstamp" ] || [ "$repo/pyproject.toml" -nt "$wstamp" ]; then
    step "downloading dependency wheels into $wheels (install tests run offline)"
    mkdir -p "$wheels"
    deps=$("$venv/bin/python" -c 'import tomllib,sys; print("\n".join(tomllib.load(open(sys.argv[1],"rb"))["project"]["dependencies"]))' "$repo/pyproject.toml")
    mapfile -t deplist <<<"$deps"
    "$venv/bin/python" -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$wheels" "${deplist[@]}" 2>&1 | sed 's/^/    /' >&2
    touch "$wstamp"
  else
    note "dependency wheels: $wheels"
  fi
fi

# --- 8. Ansible and ansible-lint for the role's tests (their own venv) -------
if [ $want_test = 1 ]; then
  avenv=${KVMSCOPE_ANSIBLE_VENV:-$repo/.venv-ansible}
  if [ ! -x "$avenv/bin/ansible-playbook" ] || [ ! -x "$avenv/bin/ansible-lint" ]; then
    step "installing ansible-core and ansible-lint into $avenv"
    /usr/bin/python3 -m venv "$avenv"
    "$avenv/bin/python" -m pip install -q --disable-pip-version-check "ansible-core>=2.16,<2.20" "ansible-lint>=24,<27" 2>&1 | sed 's/^/    /' >&2
  else
    note "ansible: $("$avenv/bin/ansible-playbook" --version | head -1)"
  fi
fi

note "ready: $(/usr/local/bin/kvmscope version --short 2>/dev/null || echo 'kvmscope installed')"
