#!/usr/bin/env bash
# Installs what tests/deploy/test_image.py needs beyond Python: podman, runc and debootstrap (Debian
# bookworm, as root), and kubectl for `kubectl kustomize` when an apt source offers it (Google's cloud-sdk
# repository does). Idempotent: does nothing when the tools are already there. hadolint and
# kubernetes-validate come from the project's test extras.
set -euo pipefail

export PATH="$PATH:/usr/sbin:/sbin"
missing=()
for tool in podman runc debootstrap kubectl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "deploy tools present: $(podman --version), $(runc --version | head -n1), debootstrap, kubectl"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "cannot install ${missing[*]}: not root (the image test will skip and say why)" >&2
  exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "cannot install ${missing[*]}: no apt-get on this machine" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# Another process (unattended-upgrades, a second job) may hold the package database: apt waits for its
# lock up to LOCK_WAIT seconds, and a failed step (lock still held, a mirror hiccup) is retried a bounded
# number of times with a growing pause.
LOCK_WAIT="${APT_LOCK_WAIT:-120}"
ATTEMPTS="${APT_ATTEMPTS:-4}"
apt_retry() {
  local attempt pause="${APT_RETRY_PAUSE:-5}"
  for ((attempt = 1; attempt <= ATTEMPTS; attempt++)); do
    if apt-get -o DPkg::Lock::Timeout="$LOCK_WAIT" "$@"; then
      return 0
    fi
    if [ "$attempt" -lt "$ATTEMPTS" ]; then
      echo "apt-get $1 failed (attempt $attempt of $ATTEMPTS); retrying in ${pause}s" >&2
      sleep "$pause"
      pause=$((pause * 2))
    fi
  done
  echo "apt-get $1 failed $ATTEMPTS times" >&2
  return 1
}
apt_retry update -qq
apt_retry install -y -qq podman runc debootstrap >/dev/null
echo "installed: $(podman --version), $(runc --version | head -n1), debootstrap"
if ! command -v kubectl >/dev/null 2>&1; then
  if apt-cache show kubectl >/dev/null 2>&1; then
    apt_retry install -y -qq kubectl >/dev/null
    echo "installed: kubectl $(kubectl version --client 2>/dev/null | head -n1)"
  else
    echo "error: kubectl is not installed and no apt source offers it; the kustomize render tests need it" >&2
    exit 1
  fi
fi
