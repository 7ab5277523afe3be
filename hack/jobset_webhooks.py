"""Print JobSet's webhook configurations, pointed at a controller running on loopback.

Upstream ships them (config/components/webhook) as a kustomize base that reaches the
webhook through an in-cluster Service. Here the controller runs as a plain process, so each
webhook gets `clientConfig.url` and our CA bundle instead. Reading the upstream files from
the pinned module keeps paths, rules and selectors in step with the controller binary.

    python hack/jobset_webhooks.py --jobset-src DIR --ca ca.crt --url https://127.0.0.1:PORT
"""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path

import yaml


def render(jobset_src: Path, ca_pem: bytes, base_url: str) -> list[dict]:
    webhook_dir = jobset_src / "config" / "components" / "webhook"
    docs = [d for d in yaml.safe_load_all((webhook_dir / "manifests.yaml").read_text()) if d]
    # The kustomization patches each pod webhook (index 1 of each configuration) with an
    # objectSelector so it only sees JobSet pods; apply the same JSON-patch "replace" ops.
    patches = {
        "MutatingWebhookConfiguration": webhook_dir / "patches" / "mutating-patch.yaml",
        "ValidatingWebhookConfiguration": webhook_dir / "patches" / "validating-patch.yaml",
    }
    ca_bundle = base64.b64encode(ca_pem).decode()
    out = []
    for doc in docs:
        for op in yaml.safe_load(patches[doc["kind"]].read_text()):
            if op["op"] != "replace" or not op["path"].startswith("/webhooks/"):
                raise ValueError(f"unexpected patch op in upstream webhook config: {op}")
            doc["webhooks"][int(op["path"].rsplit("/", 1)[1])] = op["value"]
        doc["metadata"]["name"] = "jobset-" + doc["metadata"]["name"]
        for hook in doc["webhooks"]:
            path = hook["clientConfig"]["service"]["path"]
            hook["clientConfig"] = {"url": base_url.rstrip("/") + path, "caBundle": ca_bundle}
        out.append(doc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobset-src", type=Path, required=True)
    ap.add_argument("--ca", type=Path, required=True)
    ap.add_argument("--url", required=True)
    args = ap.parse_args()
    yaml.safe_dump_all(render(args.jobset_src, args.ca.read_bytes(), args.url), sys.stdout)


if __name__ == "__main__":
    main()
