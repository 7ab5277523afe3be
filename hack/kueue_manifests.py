"""Print Kueue's CRDs and webhook configurations, pointed at a manager running on loopback.

Upstream ships them (config/components/crd, config/components/webhook) as kustomize bases that
reach the manager through an in-cluster Service. Here the manager runs as a plain process, so
each webhook, and each CRD's conversion webhook, gets `clientConfig.url` and our CA bundle
instead. Reading the upstream files from the pinned module keeps versions, paths and rules in
step with the binary.

Only the webhooks of what this cluster enables are kept: Kueue's own kinds and the JobSet
integration (the Configuration hack/cluster.sh writes lists `jobset.x-k8s.io/jobset` alone).
Upstream's pod, deployment and statefulset webhooks (failurePolicy Fail on every pod create)
belong to integrations that are off here.

    python hack/kueue_manifests.py crds --kueue-src DIR --ca ca.crt --url https://127.0.0.1:PORT
    python hack/kueue_manifests.py webhooks --kueue-src DIR --ca ca.crt --url https://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

import yaml

# webhook paths kept: Kueue's own API kinds and the JobSet integration
KEEP = ("-kueue-x-k8s-io-", "-jobset-x-k8s-io-")


def crds(kueue_src: Path, ca_pem: bytes, base_url: str) -> list[dict]:
    crd_dir = kueue_src / "config" / "components" / "crd"
    kustomization = yaml.safe_load((crd_dir / "kustomization.yaml").read_text())
    # CRDs whose conversion upstream routes to the manager (webhook_in_<plural>.yaml patches)
    converted = set()
    for patch in kustomization.get("patches") or []:
        doc = yaml.safe_load((crd_dir / patch["path"]).read_text())
        converted.add(doc["metadata"]["name"])
    ca_bundle = base64.b64encode(ca_pem).decode()
    out = []
    for res in kustomization["resources"]:
        doc = yaml.safe_load((crd_dir / res).read_text())
        if doc["metadata"]["name"] in converted:
            doc["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {
                    "clientConfig": {
                        "url": base_url.rstrip("/") + "/convert",
                        "caBundle": ca_bundle,
                    },
                    "conversionReviewVersions": ["v1"],
                },
            }
        out.append(doc)
    return out


def webhooks(kueue_src: Path, ca_pem: bytes, base_url: str) -> list[dict]:
    manifests = kueue_src / "config" / "components" / "webhook" / "manifests.yaml"
    ca_bundle = base64.b64encode(ca_pem).decode()
    out = []
    for doc in yaml.safe_load_all(manifests.read_text()):
        if not doc:
            continue
        doc["metadata"]["name"] = "kueue-" + doc["metadata"]["name"]
        kept = []
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            if not any(k in path for k in KEEP):
                continue
            hook["clientConfig"] = {"url": base_url.rstrip("/") + path, "caBundle": ca_bundle}
            kept.append(hook)
        if not any("jobset" in h["clientConfig"]["url"] for h in kept):
            raise ValueError(f"no JobSet webhook in upstream {doc['kind']}: {manifests}")
        doc["webhooks"] = kept
        out.append(doc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("crds", "webhooks"))
    ap.add_argument("--kueue-src", type=Path, required=True)
    ap.add_argument("--ca", type=Path, required=True)
    ap.add_argument("--url", required=True)
    args = ap.parse_args()
    render = crds if args.what == "crds" else webhooks
    yaml.safe_dump_all(render(args.kueue_src, args.ca.read_bytes(), args.url), sys.stdout)


if __name__ == "__main__":
    main()
