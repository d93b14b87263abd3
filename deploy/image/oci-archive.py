#!/usr/bin/env python3
"""Wraps a root filesystem tarball as a one-layer OCI image archive (an OCI image layout in a
tar: oci-layout, index.json, blobs/sha256/...), the format `podman load` and
`ctr images import` read. The image runs /usr/local/bin/holdfast. Deterministic for a given
tarball: fixed timestamps, gzip without a name or mtime."""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile


def blob(layout, data):
    """Stores `data` as a blob and returns its descriptor fields."""
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
        f.write(data)
    return {"digest": "sha256:" + digest, "size": len(data)}


def reference(name):
    """The fully qualified reference a runtime resolves `name` to, the Docker way: a first path
    component that is no registry (no dot, no colon, not localhost) means docker.io, and a
    one-component name docker.io/library. The kubelet asks containerd for that reference, so an
    image imported under the short name would not be found. No tag means :latest."""
    if ":" not in name.rpartition("/")[2] and "@" not in name:
        name += ":latest"
    first, _, rest = name.partition("/")
    if not rest:
        return "docker.io/library/" + name
    if "." in first or ":" in first or first == "localhost":
        return name
    return "docker.io/" + name


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rootfs", required=True, help="the root filesystem as a tar")
    ap.add_argument("--name", required=True, help="image name, e.g. holdfast/holdfast:0.1.0")
    ap.add_argument("--arch", default="amd64", help="OCI architecture (Debian's names match)")
    ap.add_argument("--out", required=True, help="the OCI archive to write")
    a = ap.parse_args()
    layout = tempfile.mkdtemp(prefix="holdfast-oci.")
    try:
        os.makedirs(os.path.join(layout, "blobs", "sha256"))
        diff_id = hashlib.sha256()
        packed = io.BytesIO()
        with open(a.rootfs, "rb") as src, gzip.GzipFile(fileobj=packed, mode="wb", compresslevel=6, mtime=0, filename="") as gz:
            while chunk := src.read(1 << 20):
                diff_id.update(chunk)
                gz.write(chunk)
        layer = blob(layout, packed.getvalue())
        layer["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip"
        config = {
            "created": "1970-01-01T00:00:00Z",
            "architecture": a.arch,
            "os": "linux",
            "config": {
                "Entrypoint": ["/usr/local/bin/holdfast"],
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Labels": {"org.opencontainers.image.title": "holdfast"},
            },
            "rootfs": {"type": "layers", "diff_ids": ["sha256:" + diff_id.hexdigest()]},
        }
        cfg = blob(layout, json.dumps(config, sort_keys=True).encode())
        cfg["mediaType"] = "application/vnd.oci.image.config.v1+json"
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": cfg, "layers": [layer]}
        man = blob(layout, json.dumps(manifest, sort_keys=True).encode())
        man["mediaType"] = "application/vnd.oci.image.manifest.v1+json"
        # podman reads the ref.name annotation as the image's name, containerd its own one; both
        # get the full reference (`ctr images import` keeps the name as it is written).
        ref = reference(a.name)
        man["annotations"] = {"org.opencontainers.image.ref.name": ref, "io.containerd.image.name": ref}
        man["platform"] = {"architecture": a.arch, "os": "linux"}
        index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [man]}
        with open(os.path.join(layout, "index.json"), "w") as f:
            json.dump(index, f, sort_keys=True)
        with open(os.path.join(layout, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        tmp = a.out + ".tmp"
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as t:
            for name in ["oci-layout", "index.json", "blobs", "blobs/sha256"] + [
                "blobs/sha256/" + n for n in sorted(os.listdir(os.path.join(layout, "blobs", "sha256")))
            ]:
                info = t.gettarinfo(os.path.join(layout, name), arcname=name)
                info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
                if info.isfile():
                    with open(os.path.join(layout, name), "rb") as f:
                        t.addfile(info, f)
                else:
                    t.addfile(info)
        os.replace(tmp, a.out)
    finally:
        shutil.rmtree(layout)


if __name__ == "__main__":
    main()
