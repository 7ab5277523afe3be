#!/usr/bin/env bash
# A real local Kubernetes control plane on loopback: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler, the JobSet controller (with its webhooks), Kueue's
# controller manager (with its webhooks; JobSet integration), kwok (fake nodes and pod
# lifecycle) and a GKE-like node-pool provisioner.
#
#   hack/cluster.sh up       start it (idempotent: a healthy cluster is left alone)
#   hack/cluster.sh down     stop every process it started and remove its state
#   hack/cluster.sh status   exit 0 when up and healthy
#
# Environment:
#   CLUSTER_DIR        state directory (default: <repo>/.cluster); kubeconfig is $CLUSTER_DIR/kubeconfig
#   CLUSTER_PORT_BASE  first of 11 consecutive loopback ports (default 16443 = kube-apiserver)
#   DEFAULT_POOL_NODES plain nodes in the default pool (default 4)
#   PYTHON             interpreter with the kubernetes client (default: <repo>/.venv/bin/python)
#
# Each process is started in its own session (setsid), so its pid is also its process group
# id; `down` signals whole groups, which takes any children along.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HACK="$REPO/hack"
CLUSTER_DIR="${CLUSTER_DIR:-$REPO/.cluster}"
mkdir -p "$CLUSTER_DIR"
CLUSTER_DIR="$(cd "$CLUSTER_DIR" && pwd)"
# a running cluster remembers its ports, so `status`/`down` need no environment
if [[ -z ${CLUSTER_PORT_BASE:-} && -f $CLUSTER_DIR/port-base ]]; then CLUSTER_PORT_BASE=$(cat "$CLUSTER_DIR/port-base"); fi
PORT_BASE="${CLUSTER_PORT_BASE:-16443}"
DEFAULT_POOL_NODES="${DEFAULT_POOL_NODES:-4}"
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $REPO/.venv/bin/python ]]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi

# Port layout: everything derives from one base so a second cluster can run beside the first.
API_PORT=$PORT_BASE
ETCD_PORT=$((PORT_BASE + 1))
ETCD_PEER_PORT=$((PORT_BASE + 2))
KCM_PORT=$((PORT_BASE + 3))
SCHED_PORT=$((PORT_BASE + 4))
JOBSET_WEBHOOK_PORT=$((PORT_BASE + 5))
JOBSET_METRICS_PORT=$((PORT_BASE + 6))
JOBSET_HEALTH_PORT=$((PORT_BASE + 7))
KUEUE_WEBHOOK_PORT=$((PORT_BASE + 8))
KUEUE_METRICS_PORT=$((PORT_BASE + 9))
KUEUE_HEALTH_PORT=$((PORT_BASE + 10))

PKI=$CLUSTER_DIR/pki
LOGS=$CLUSTER_DIR/logs
PIDS=$CLUSTER_DIR/pids
KUBECONFIG_FILE=$CLUSTER_DIR/kubeconfig
# start order; `down` stops in reverse
COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler jobset kueue kwok provisioner)

log() { echo "[cluster $(date +%H:%M:%S)] $*" >&2; }
die() {
  echo "hack/cluster.sh: $*" >&2
  exit 1
}

kctl() { kubectl --kubeconfig "$KUBECONFIG_FILE" "$@"; }

# ---- processes -----------------------------------------------------------------------------

group_alive() { # PGID: does the group still have a process that is not a zombie?
  # (`kill -0 -PGID` also counts zombies, which stay until init reaps them, seconds later here)
  local f stat fields
  for f in /proc/[0-9]*/stat; do
    { read -r stat <"$f"; } 2>/dev/null || continue # exited meanwhile
    read -r -a fields <<<"${stat##*) }" # after "pid (comm) ": state ppid pgrp ...
    [[ ${fields[2]} == "$1" && ${fields[0]} != Z ]] && return 0
  done
  return 1
}

alive() { # NAME: is its recorded process group still running?
  local f=$PIDS/$1.pid
  [[ -f $f ]] && group_alive "$(cat "$f")"
}

start() { # NAME CMD...: run CMD in a new session, log to logs/NAME.log, record its pid
  local name=$1; shift
  mkdir -p "$LOGS" "$PIDS"
  echo "+ $*" >"$LOGS/$name.log"
  # Not a process group leader here (no job control), so setsid execs in place: $! is the
  # process itself and also the id of its new process group.
  # (9>&-: the daemon must not inherit, and so hold, the lock on the cluster directory)
  setsid "$@" >>"$LOGS/$name.log" 2>&1 </dev/null 9>&- &
  echo $! >"$PIDS/$name.pid"
}

stop_all() {
  # Reverse start order, one at a time: clients first, then the apiserver, etcd last, so
  # nothing shuts down while what it talks to is already gone.
  local i name pgid deadline
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name=${COMPONENTS[i]}
    [[ -f $PIDS/$name.pid ]] || continue
    pgid=$(cat "$PIDS/$name.pid")
    kill -TERM -- "-$pgid" 2>/dev/null || true
    deadline=$((SECONDS + 20))
    while group_alive "$pgid" && ((SECONDS < deadline)); do sleep 0.2; done
    if group_alive "$pgid"; then
      log "$name did not stop within 20s of SIGTERM; sending SIGKILL"
      kill -KILL -- "-$pgid" 2>/dev/null || true
      deadline=$((SECONDS + 10))
      while group_alive "$pgid" && ((SECONDS < deadline)); do sleep 0.2; done
    fi
    group_alive "$pgid" && die "could not stop $name (process group $pgid)"
    log "stopped $name"
    rm -f "$PIDS/$name.pid"
  done
}

wait_for() { # DESCRIPTION TIMEOUT_S LOGNAME CMD...: poll CMD until it succeeds
  local what=$1 timeout=$2 logname=$3; shift 3
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [[ -n $logname ]] && ! alive "$logname"; then
      tail -n 30 "$LOGS/$logname.log" >&2 || true
      die "$logname exited while waiting for $what; log: $LOGS/$logname.log"
    fi
    if ((SECONDS >= deadline)); then
      [[ -n $logname ]] && tail -n 30 "$LOGS/$logname.log" >&2
      die "timed out after ${timeout}s waiting for $what${logname:+; log: $LOGS/$logname.log}"
    fi
    sleep 0.5
  done
}

https_ok() { # URL: GET with the admin client certificate, expect "ok"
  [[ $(curl -sf --max-time 3 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$1") == ok ]]
}

# ---- certificates --------------------------------------------------------------------------

# One CA signs everything: serving certs for etcd, the apiserver and the JobSet webhook,
# client certs for each component, plus the service-account token signing key.
gen_pki() {
  mkdir -p "$PKI"
  (
    cd "$PKI"
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=posttrain-local-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    cert() { # NAME SUBJECT EXTENSIONS
      openssl req -newkey rsa:2048 -nodes -subj "$2" -keyout "$1.key" -out "$1.csr" 2>/dev/null
      printf '%s\n' "$3" >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    local serving="basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=serverAuth,clientAuth"
    local client="basicConstraints=CA:FALSE
keyUsage=digitalSignature,keyEncipherment
extendedKeyUsage=clientAuth"
    cert etcd "/CN=etcd" "$serving
subjectAltName=IP:127.0.0.1,DNS:localhost"
    # 10.0.0.1 is the `kubernetes` Service's cluster IP (first address of the service range)
    cert kube-apiserver "/CN=kube-apiserver" "$serving
subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert jobset-webhook "/CN=jobset-webhook" "$serving
subjectAltName=IP:127.0.0.1,DNS:localhost"
    cert admin "/O=system:masters/CN=admin" "$client"
    cert kube-controller-manager "/CN=system:kube-controller-manager" "$client"
    cert kube-scheduler "/CN=system:kube-scheduler" "$client"
    # controller-runtime looks for tls.crt/tls.key in its cert dir
    mkdir -p jobset-certs
    cp jobset-webhook.crt jobset-certs/tls.crt
    cp jobset-webhook.key jobset-certs/tls.key
    # Kueue serves its webhooks (and metrics) with the same loopback serving certificate
    mkdir -p kueue-certs
    cp jobset-webhook.crt kueue-certs/tls.crt
    cp jobset-webhook.key kueue-certs/tls.key
  )
}

kubeconfig_for() { # USER OUTFILE
  local user=$1 out=$2
  kubectl config --kubeconfig "$out" set-cluster local --server "https://127.0.0.1:$API_PORT" \
    --certificate-authority "$PKI/ca.crt" --embed-certs >/dev/null
  kubectl config --kubeconfig "$out" set-credentials "$user" \
    --client-certificate "$PKI/$user.crt" --client-key "$PKI/$user.key" --embed-certs >/dev/null
  kubectl config --kubeconfig "$out" set-context local --cluster local --user "$user" >/dev/null
  kubectl config --kubeconfig "$out" use-context local >/dev/null
}

# ---- commands ------------------------------------------------------------------------------

healthy() {
  local name
  for name in "${COMPONENTS[@]}"; do alive "$name" || return 1; done
  https_ok "https://127.0.0.1:$API_PORT/readyz"
}

cmd_up() {
  if healthy; then
    log "already up: export KUBECONFIG=$KUBECONFIG_FILE"
    return 0
  fi
  if compgen -G "$PIDS/*.pid" >/dev/null; then
    log "found a partly running cluster in $CLUSTER_DIR; restarting it"
    stop_all
  fi
  command -v openssl >/dev/null || die "openssl is required to generate certificates"
  command -v kubectl >/dev/null || die "kubectl is required"
  "$PYTHON" -c "import kubernetes, yaml" 2>/dev/null ||
    die "$PYTHON lacks the kubernetes client (and PyYAML): run \`make setup\` or set PYTHON"

  local t0=$SECONDS
  declare -A BIN
  local name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler jobset kueue kwok; do
    BIN[$name]=$("$HACK/tools.sh" path "$name") || die "could not build $name; see the output above"
  done
  local jobset_src
  # The CRD and webhook manifests come from the pinned module's source in the module cache.
  jobset_src=$(cd "$HACK/tools/jobset" && go mod download sigs.k8s.io/jobset &&
    go list -m -f '{{.Dir}}' sigs.k8s.io/jobset) ||
    die "cannot locate the sigs.k8s.io/jobset module source (go mod download failed?)"
  local kueue_src
  kueue_src=$(cd "$HACK/tools/kueue" && go mod download sigs.k8s.io/kueue &&
    go list -m -f '{{.Dir}}' sigs.k8s.io/kueue) ||
    die "cannot locate the sigs.k8s.io/kueue module source (go mod download failed?)"

  rm -rf "${CLUSTER_DIR:?}/etcd-data" "$PKI" "$LOGS" "$KUBECONFIG_FILE" "$CLUSTER_DIR"/*.kubeconfig
  mkdir -p "$LOGS" "$PIDS"
  gen_pki
  kubeconfig_for admin "$KUBECONFIG_FILE"
  kubeconfig_for kube-controller-manager "$CLUSTER_DIR/kube-controller-manager.kubeconfig"
  kubeconfig_for kube-scheduler "$CLUSTER_DIR/kube-scheduler.kubeconfig"
  echo "$PORT_BASE" >"$CLUSTER_DIR/port-base"

  log "starting etcd on 127.0.0.1:$ETCD_PORT"
  start etcd "${BIN[etcd]}" --name local --data-dir "$CLUSTER_DIR/etcd-data" \
    --listen-client-urls "https://127.0.0.1:$ETCD_PORT" --advertise-client-urls "https://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "local=http://127.0.0.1:$ETCD_PEER_PORT" \
    --cert-file "$PKI/etcd.crt" --key-file "$PKI/etcd.key" --client-cert-auth --trusted-ca-file "$PKI/ca.crt" \
    --unsafe-no-fsync --quota-backend-bytes 2147483648 --log-level warn
  # --unsafe-no-fsync: a throwaway test store; fsync on a loaded CI disk costs seconds per write

  wait_for "etcd /health" 60 etcd curl -sf --max-time 3 --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" \
    --key "$PKI/admin.key" "https://127.0.0.1:$ETCD_PORT/health"

  log "starting kube-apiserver on https://127.0.0.1:$API_PORT"
  start kube-apiserver "${BIN[kube-apiserver]}" \
    --etcd-servers "https://127.0.0.1:$ETCD_PORT" --etcd-cafile "$PKI/ca.crt" \
    --etcd-certfile "$PKI/admin.crt" --etcd-keyfile "$PKI/admin.key" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
    --tls-cert-file "$PKI/kube-apiserver.crt" --tls-private-key-file "$PKI/kube-apiserver.key" \
    --client-ca-file "$PKI/ca.crt" --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 --allow-privileged \
    --endpoint-reconciler-type none \
    --enable-admission-plugins ExtendedResourceToleration \
    --profiling=false --v 1
  # (ExtendedResourceToleration, as on GKE: a pod that requests google.com/tpu or
  # nvidia.com/gpu tolerates the taint of that name, which keeps other pods off those nodes.
  # --endpoint-reconciler-type none: Endpoints may not hold a loopback address, so the
  # `kubernetes` Service cannot point at 127.0.0.1; nothing in the cluster dials it.)
  wait_for "kube-apiserver /readyz" 120 kube-apiserver https_ok "https://127.0.0.1:$API_PORT/readyz"

  # The JobSet CRD must exist before its controller starts; apply it server-side as upstream does.
  log "applying the JobSet CRD and webhook configurations"
  kctl apply --server-side --force-conflicts -f "$jobset_src/config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml" >/dev/null
  wait_for "the JobSet CRD to be established" 60 kube-apiserver crd_established jobsets.jobset.x-k8s.io
  "$PYTHON" "$HACK/jobset_webhooks.py" --jobset-src "$jobset_src" --ca "$PKI/ca.crt" \
    --url "https://127.0.0.1:$JOBSET_WEBHOOK_PORT" | kctl apply --server-side --force-conflicts -f - >/dev/null

  # Kueue's CRDs (with their v1beta1<->v1beta2 conversion webhook pointed at the manager on
  # loopback) before its manager starts, and its webhooks: JobSet (suspend a JobSet with a queue
  # label until admitted) and its own kinds.
  log "applying Kueue's CRDs and webhook configurations"
  "$PYTHON" "$HACK/kueue_manifests.py" crds --kueue-src "$kueue_src" --ca "$PKI/ca.crt" \
    --url "https://127.0.0.1:$KUEUE_WEBHOOK_PORT" | kctl apply --server-side --force-conflicts -f - >/dev/null
  wait_for "Kueue's Workload CRD to be established" 60 kube-apiserver crd_established workloads.kueue.x-k8s.io
  "$PYTHON" "$HACK/kueue_manifests.py" webhooks --kueue-src "$kueue_src" --ca "$PKI/ca.crt" \
    --url "https://127.0.0.1:$KUEUE_WEBHOOK_PORT" | kctl apply --server-side --force-conflicts -f - >/dev/null
  kctl create namespace kueue-system >/dev/null

  log "starting kube-controller-manager, kube-scheduler, jobset, kueue, kwok"
  # Each controller runs as its own service account (as kubeadm does): the
  # system:kube-controller-manager role alone cannot, e.g., create pods for Jobs.
  # Default controllers include the job controller, the garbage collector (ownerReference
  # cascade deletion), namespace and service-account controllers.
  start kube-controller-manager "${BIN[kube-controller-manager]}" \
    --kubeconfig "$CLUSTER_DIR/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$CLUSTER_DIR/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$CLUSTER_DIR/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$KCM_PORT" --leader-elect=false \
    --controllers '*' --use-service-account-credentials \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key" \
    --profiling=false --v 1
  start kube-scheduler "${BIN[kube-scheduler]}" \
    --kubeconfig "$CLUSTER_DIR/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$CLUSTER_DIR/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$CLUSTER_DIR/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$SCHED_PORT" --leader-elect=false --profiling=false --v 1

  cat >"$CLUSTER_DIR/jobset-config.yaml" <<EOF
apiVersion: config.jobset.x-k8s.io/v1alpha1
kind: Configuration
leaderElection:
  leaderElect: false
# certificates come from hack/cluster.sh, not from the in-cluster cert rotator
internalCertManagement:
  enable: false
webhook:
  host: 127.0.0.1
  port: $JOBSET_WEBHOOK_PORT
  certDir: $PKI/jobset-certs
metrics:
  bindAddress: 127.0.0.1:$JOBSET_METRICS_PORT
  certDir: $PKI/jobset-certs
health:
  healthProbeBindAddress: 127.0.0.1:$JOBSET_HEALTH_PORT
EOF
  start jobset "${BIN[jobset]}" --kubeconfig "$KUBECONFIG_FILE" --config "$CLUSTER_DIR/jobset-config.yaml" \
    --zap-log-level info

  cat >"$CLUSTER_DIR/kueue-config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: kueue-system
leaderElection:
  leaderElect: false
# certificates come from hack/cluster.sh, not from the in-cluster cert rotator
internalCertManagement:
  enable: false
webhook:
  host: 127.0.0.1
  port: $KUEUE_WEBHOOK_PORT
  certDir: $PKI/kueue-certs
metrics:
  bindAddress: 127.0.0.1:$KUEUE_METRICS_PORT
health:
  healthProbeBindAddress: 127.0.0.1:$KUEUE_HEALTH_PORT
integrations:
  frameworks:
  - jobset.x-k8s.io/jobset
# the pending-workloads API is an aggregated API server with its certificate at a fixed path
# (/visibility) and an APIService; not served here
featureGates:
  VisibilityOnDemand: false
EOF
  # With internal certificates off, the manager reads its metrics certificate from a fixed path,
  # /etc/kueue/metrics/certs (a mounted Secret in upstream's Deployment). It runs in a private
  # mount namespace where /etc is an overlay holding that directory: nothing is written to the
  # host's /etc, and clusters side by side each see their own.
  local userns=()
  [[ $EUID -eq 0 ]] || userns=(--user --map-root-user)
  start kueue unshare "${userns[@]}" --mount --propagation private -- "$HACK/kueue_etc.sh" \
    "$CLUSTER_DIR/kueue-etc" "$PKI/kueue-certs" \
    "${BIN[kueue]}" --kubeconfig "$KUBECONFIG_FILE" --config "$CLUSTER_DIR/kueue-config.yaml" \
    --zap-log-level info

  start kwok "${BIN[kwok]}" --kubeconfig "$KUBECONFIG_FILE" --config "$HACK/kwok-stages.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake \
    --node-lease-duration-seconds 40 --cidr 10.244.0.0/16 --node-ip 127.0.0.1

  start provisioner "$PYTHON" -u "$HACK/nodepool_provisioner.py" --kubeconfig "$KUBECONFIG_FILE" \
    --default-pool-nodes "$DEFAULT_POOL_NODES"

  wait_for "kube-controller-manager /healthz" 60 kube-controller-manager \
    curl -skf --max-time 3 "https://127.0.0.1:$KCM_PORT/healthz"
  wait_for "kube-scheduler /healthz" 60 kube-scheduler curl -skf --max-time 3 "https://127.0.0.1:$SCHED_PORT/healthz"
  wait_for "JobSet controller /readyz (webhooks serving)" 60 jobset \
    curl -sf --max-time 3 "http://127.0.0.1:$JOBSET_HEALTH_PORT/readyz"
  wait_for "Kueue /readyz (webhooks serving)" 120 kueue \
    curl -sf --max-time 3 "http://127.0.0.1:$KUEUE_HEALTH_PORT/readyz"
  wait_for "$DEFAULT_POOL_NODES Ready nodes in the default pool" 60 provisioner default_pool_ready
  wait_for "the default service account" 60 kube-controller-manager kctl -n default get serviceaccount default
  log "up in $((SECONDS - t0))s: export KUBECONFIG=$KUBECONFIG_FILE"
}

crd_established() { # NAME (kubectl wait fails outright while .status.conditions is still empty)
  [[ $(kctl get crd "$1" -o jsonpath='{.status.conditions[?(@.type=="Established")].status}') == True ]]
}

default_pool_ready() {
  local n
  n=$(kctl get nodes -l cloud.google.com/gke-nodepool=default-pool \
    -o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' | grep -c True)
  ((n >= DEFAULT_POOL_NODES))
}

cmd_down() {
  if compgen -G "$PIDS/*.pid" >/dev/null; then
    log "stopping the cluster in $CLUSTER_DIR"
    stop_all
  fi
  # Keep logs/ for post-mortems; everything else is state of the stopped cluster.
  rm -rf "${CLUSTER_DIR:?}/etcd-data" "$PKI" "$PIDS" "$KUBECONFIG_FILE" "$CLUSTER_DIR"/*.kubeconfig \
    "$CLUSTER_DIR/jobset-config.yaml" "$CLUSTER_DIR/kueue-config.yaml" "$CLUSTER_DIR/kueue-etc" \
    "$CLUSTER_DIR/port-base"
  log "down"
}

cmd_status() {
  local name rc=0
  for name in "${COMPONENTS[@]}"; do
    if alive "$name"; then echo "$name: running (pid $(cat "$PIDS/$name.pid"))"; else
      echo "$name: not running"
      rc=1
    fi
  done
  if [[ -f $PKI/ca.crt ]] && https_ok "https://127.0.0.1:$API_PORT/readyz"; then echo "apiserver: ready"; else
    echo "apiserver: not ready"
    rc=1
  fi
  return $rc
}

lock() { # serialize up/down on one cluster directory (parallel test sessions, make)
  exec 9>"$CLUSTER_DIR/.lock"
  flock 9
}

case ${1:-} in
  up) lock && cmd_up ;;
  down) lock && cmd_down ;;
  status) cmd_status ;;
  *) die "usage: hack/cluster.sh up|down|status" ;;
esac
