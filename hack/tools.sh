#!/usr/bin/env bash
# Build the pinned control-plane binaries from Go modules (no Docker, no download sites).
#
#   hack/tools.sh build [NAME...]   build (all by default); cached, so a no-op when up to date
#   hack/tools.sh path NAME         print the absolute path of NAME, building it if missing
#   hack/tools.sh versions          print each binary's --version output
#   hack/tools.sh list              print the known binary names
#
# Pins live in hack/tools/<group>/go.mod (+ go.sum): one small wrapper module per upstream,
# so each keeps its own dependency graph. Binaries go to
#   ${POSTTRAIN_CACHE:-~/.cache/posttrain}/bin/<group>-<version>-<hash>/
# where <hash> covers the wrapper's go.mod/go.sum, the ldflags and the Go version: a changed
# pin gives a new directory, so nothing is rebuilt unless its pin changed.
#
# POSTTRAIN_BIN_DIR=/dir/with/binaries skips building: NAME is taken from that directory.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE_ROOT="${POSTTRAIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/posttrain}"

# group of each binary, and the main package it is built from
declare -A GROUP=(
  [etcd]=etcd
  [kube-apiserver]=kube [kube-controller-manager]=kube [kube-scheduler]=kube
  [jobset]=jobset [kueue]=kueue [kwok]=kwok [helm]=helm
)
declare -A PKG=(
  [etcd]=go.etcd.io/etcd/server/v3
  [kube-apiserver]=k8s.io/kubernetes/cmd/kube-apiserver
  [kube-controller-manager]=k8s.io/kubernetes/cmd/kube-controller-manager
  [kube-scheduler]=k8s.io/kubernetes/cmd/kube-scheduler
  [jobset]=sigs.k8s.io/jobset
  [kueue]=sigs.k8s.io/kueue/cmd/kueue
  [kwok]=sigs.k8s.io/kwok/cmd/kwok
  [helm]=helm.sh/helm/v3/cmd/helm
)
# the upstream module whose version names the group
declare -A MODULE=(
  [etcd]=go.etcd.io/etcd/server/v3 [kube]=k8s.io/kubernetes [jobset]=sigs.k8s.io/jobset
  [kueue]=sigs.k8s.io/kueue [kwok]=sigs.k8s.io/kwok [helm]=helm.sh/helm/v3
)
ALL=(etcd kube-apiserver kube-controller-manager kube-scheduler jobset kueue kwok helm)

die() { echo "hack/tools.sh: $*" >&2; exit 1; }

# Version of the group's upstream module, read from its wrapper go.mod.
module_version() {
  local group=$1 mod=${MODULE[$1]}
  awk -v m="$mod" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' \
    "$HACK_DIR/tools/$group/go.mod"
}

# Linker flags that make `--version` print the real release, as upstream release builds do.
ldflags() {
  local group=$1 v
  v=$(module_version "$group")
  local f="-s -w"
  case $group in
    kube)
      local major minor
      major=${v#v}; major=${major%%.*}
      minor=${v#v*.}; minor=${minor%%.*}
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        f+=" -X $p.gitVersion=$v -X $p.gitMajor=$major -X $p.gitMinor=$minor"
        f+=" -X $p.gitTreeState=clean -X $p.gitCommit=module-$v"
      done ;;
    etcd) f+=" -X go.etcd.io/etcd/api/v3/version.GitSHA=module-$v" ;;  # Version is a constant upstream
    jobset) f+=" -X sigs.k8s.io/jobset/pkg/version.GitVersion=$v -X sigs.k8s.io/jobset/pkg/version.GitCommit=module-$v" ;;
    # Kueue's manager has no --version flag: it logs these at start ("Initializing", gitVersion)
    kueue) f+=" -X sigs.k8s.io/kueue/pkg/version.GitVersion=$v -X sigs.k8s.io/kueue/pkg/version.GitCommit=module-$v -X sigs.k8s.io/kueue/pkg/version.BuildDate=module" ;;
    kwok) f+=" -X sigs.k8s.io/kwok/pkg/consts.Version=${v#v}" ;;
    helm)
      # The Kubernetes version `helm template` reports (.Capabilities.KubeVersion) is a link-time
      # default, v1.20 unset; upstream's Makefile derives it from its client-go (v0.34 -> 1.34).
      local cg kmin
      cg=$(awk '$1 == "k8s.io/client-go" { print $2; exit }' "$HACK_DIR/tools/helm/go.mod")
      kmin=${cg#v0.}; kmin=${kmin%%.*}
      [[ $cg == v0.* && -n $kmin ]] || die "no k8s.io/client-go v0.x in hack/tools/helm/go.mod"
      f+=" -X helm.sh/helm/v3/internal/version.version=$v -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
      for p in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
        f+=" -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$kmin"
      done ;;
  esac
  echo "$f"
}

group_dir() {
  local group=$1 v h
  v=$(module_version "$group")
  [[ -n $v ]] || die "no version for ${MODULE[$group]} in hack/tools/$group/go.mod"
  h=$( { cat "$HACK_DIR/tools/$group/go.mod" "$HACK_DIR/tools/$group/go.sum"; ldflags "$group";
         go env GOVERSION GOOS GOARCH; } | sha256sum | cut -c1-10)
  echo "$CACHE_ROOT/bin/$group-$v-$h"
}

bin_path() {
  local name=$1
  [[ -n ${GROUP[$name]:-} ]] || die "unknown binary '$name' (known: ${ALL[*]})"
  if [[ -n ${POSTTRAIN_BIN_DIR:-} ]]; then
    echo "$POSTTRAIN_BIN_DIR/$name"
  else
    echo "$(group_dir "${GROUP[$name]}")/$name"
  fi
}

# Build every missing binary of one group in a single `go build`, so the shared packages
# (kube's three binaries share most of their code) are compiled once and linked in parallel.
build_group() {
  local group=$1; shift
  local dir tmp pkgs=() name
  dir=$(group_dir "$group")
  for name in "$@"; do [[ -x $dir/$name ]] || pkgs+=("$name"); done
  ((${#pkgs[@]})) || return 0
  command -v go >/dev/null || die "go is not installed; install Go >= 1.26 or set POSTTRAIN_BIN_DIR"
  mkdir -p "$CACHE_ROOT/bin"
  # One build per group at a time (tests and `make` may ask together); whoever waited
  # re-checks, and usually finds the binaries there.
  local lock
  exec {lock}>"$CACHE_ROOT/bin/.lock-$group"
  flock "$lock"
  pkgs=()
  for name in "$@"; do [[ -x $dir/$name ]] || pkgs+=("$name"); done
  if ((${#pkgs[@]} == 0)); then
    exec {lock}>&-
    return 0
  fi
  tmp=$(mktemp -d "$CACHE_ROOT/bin/.build-$group.XXXXXX")
  # clean up on every return, then drop the trap (a RETURN trap would outlive this function)
  trap 'rm -rf "$tmp"; trap - RETURN' RETURN
  local start=$SECONDS
  echo "building ${pkgs[*]} ($(module_version "$group")) into $dir ..." >&2
  local gopkgs=()
  for name in "${pkgs[@]}"; do
    gopkgs+=("${PKG[$name]}")
  done
  # -mod=readonly: the pins are the checked-in go.mod/go.sum, never silently updated.
  # -buildvcs=false: the wrapper module sits in this git checkout, whose state says nothing
  # about the binary (and stamping it fails where git refuses the checkout's ownership).
  (cd "$HACK_DIR/tools/$group" &&
    GOFLAGS="${GOFLAGS:-} -mod=readonly -buildvcs=false" CGO_ENABLED=0 GOTOOLCHAIN=local \
      go build -trimpath -ldflags "$(ldflags "$group")" -o "$tmp/" "${gopkgs[@]}") ||
    die "go build failed for ${pkgs[*]} (see above)"
  # `go build -o dir/` names each binary after its package's last path element
  # (go.etcd.io/etcd/server/v3 -> "server", the last element that is not a major version)
  if [[ $group == etcd ]]; then mv "$tmp/server" "$tmp/etcd"; fi
  mkdir -p "$dir"
  for name in "${pkgs[@]}"; do
    [[ -x $tmp/$name ]] || die "expected $tmp/$name after building ${PKG[$name]}"
    mv "$tmp/$name" "$dir/$name"   # rename is atomic: readers never see a half-written binary
  done
  echo "built ${pkgs[*]} in $((SECONDS - start))s" >&2
  exec {lock}>&-
}

build() {
  local names=("$@") name group
  ((${#names[@]})) || names=("${ALL[@]}")
  if [[ -n ${POSTTRAIN_BIN_DIR:-} ]]; then
    for name in "${names[@]}"; do
      [[ -x $POSTTRAIN_BIN_DIR/$name ]] || die "POSTTRAIN_BIN_DIR=$POSTTRAIN_BIN_DIR has no executable '$name'"
    done
    return 0
  fi
  # group the requested names so each group is one go build
  declare -A want=()
  for name in "${names[@]}"; do
    [[ -n ${GROUP[$name]:-} ]] || die "unknown binary '$name' (known: ${ALL[*]})"
    want[${GROUP[$name]}]+=" $name"
  done
  for group in etcd kube jobset kueue kwok helm; do
    # shellcheck disable=SC2086
    [[ -n ${want[$group]:-} ]] && build_group "$group" ${want[$group]}
  done
  return 0
}

versions() {
  local name p
  for name in "${ALL[@]}"; do
    p=$(bin_path "$name")
    case $name in
      helm) "$p" version --short ;;
      kwok) "$p" --version ;;
      jobset) echo "jobset $(module_version jobset) (controller has no --version flag)" ;;
      # no --version flag either: the module version recorded in the binary, and the version
      # the ldflags set, which it logs at start ("Initializing", gitVersion)
      kueue) echo "kueue $(go version -m "$p" | awk '$1 == "mod" { print $3 }') (logs gitVersion $(module_version kueue) at start)" ;;
      *) "$p" --version ;;
    esac
  done
}

cmd=${1:-build}; shift || true
case $cmd in
  build) build "$@" ;;
  path)
    [[ $# -eq 1 ]] || die "usage: hack/tools.sh path NAME"
    p=$(bin_path "$1")
    [[ -x $p ]] || build "$1" >&2
    echo "$p" ;;
  versions) build; versions ;;
  list) printf '%s\n' "${ALL[@]}" ;;
  *) die "unknown command '$cmd' (build | path NAME | versions | list)" ;;
esac
