#!/bin/sh
# Run Kueue's manager with /etc/kueue/metrics/certs holding our certificate, without touching
# the host's /etc. hack/cluster.sh calls it through `unshare --mount --propagation private`:
#
#   kueue_etc.sh SCRATCH_DIR CERT_DIR KUEUE_BINARY ARGS...
#
# In that private mount namespace, /etc becomes an overlay (the host's /etc below, a tmpfs on
# SCRATCH_DIR above) into which tls.crt/tls.key of CERT_DIR are copied; then it execs the manager.
set -eu
scratch=$1 certs=$2
shift 2
# Refuse to mount anything in the caller's namespace (run without unshare, this would cover the
# host's /etc).
if [ "$(readlink /proc/self/ns/mnt)" = "$(readlink /proc/$PPID/ns/mnt)" ]; then
  echo "kueue_etc.sh: not in a private mount namespace (run it through unshare --mount)" >&2
  exit 1
fi
mkdir -p "$scratch"
mount -t tmpfs kueue-etc "$scratch"
mkdir -p "$scratch/upper" "$scratch/work"
mount -t overlay kueue-etc -o "lowerdir=/etc,upperdir=$scratch/upper,workdir=$scratch/work" /etc
mkdir -p /etc/kueue/metrics/certs
cp "$certs/tls.crt" "$certs/tls.key" /etc/kueue/metrics/certs/
exec "$@"
