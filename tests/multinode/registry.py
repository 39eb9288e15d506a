"""The test swarm's registry (Debian's docker-registry on 198.18.0.1:5000) as a client,
and the copy of the base image into it from the machine's engine, under the lock the
single-engine tests share.

The machine's engine cannot push there itself: it trusts no plain-HTTP registry
but loopback, and is not ours to reconfigure. So the image is read with
`docker save` and uploaded through the registry's HTTP API as an OCI image with
uncompressed layers (no gzip on 2 cores; a layer's digest is then its diff id,
and an unchanged image is recognised without reading it).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import json
import os
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from .procs import SwarmError, ancestors, log, run

HOST_IP = "198.18.0.1"  # the bridge's address: the registry listens there only
REGISTRY = f"{HOST_IP}:5000"
BASE_IMAGE = os.environ.get("DS01_TEST_BASE_IMAGE", "ds01/singleuser:latest")
BASE_REPO = "ds01/singleuser"  # its name in the registry
INTEGRATION_LOCK = Path("/tmp/ds01-integration.lock")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"  # uncompressed: no gzip on 2 cores


# -- the integration lock


def _lock_holders() -> set[int]:
    try:
        inode = INTEGRATION_LOCK.stat().st_ino
    except OSError:
        return set()
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].split(":")[-1] == str(inode):
            holders.add(int(fields[4]))
    return holders


@contextlib.contextmanager
def integration_lock(wait: bool = True) -> Iterator[bool]:
    """Hold /tmp/ds01-integration.lock (flock) while the machine's engine is used;
    whether it is held (only False when it is busy and not `wait`).

    A caller that already holds it (`flock /tmp/ds01-integration.lock scripts/swarm up`)
    is an ancestor of ours: then it is not taken again (that would wait forever).
    """
    if _lock_holders() & ancestors():
        yield True
        return
    with open(INTEGRATION_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                yield False
                return
            log(f"waiting for {INTEGRATION_LOCK} (single-engine tests are using the engine)")
            waited = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            log(f"got {INTEGRATION_LOCK} after {time.monotonic() - waited:.0f}s")
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# -- the registry


def registry_request(
    method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60
) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection(HOST_IP, 5000, timeout=timeout)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    response.body = response.read()
    conn.close()
    return response


def registry_answers() -> bool:
    try:
        return registry_request("GET", "/v2/", timeout=2).status == 200
    except OSError:
        return False


def _location(response: http.client.HTTPResponse) -> str:
    parts = urlsplit(response.getheader("Location"))
    return parts.path + (f"?{parts.query}" if parts.query else "")


def _upload_blob(repo: str, stream, size: int) -> str:
    """Upload `size` bytes from `stream` as one blob; its digest (computed on the way)."""
    start = registry_request("POST", f"/v2/{repo}/blobs/uploads/")
    if start.status != 202:
        raise SwarmError(f"registry refused an upload: {start.status} {start.body[:200]!r}")
    conn = http.client.HTTPConnection(HOST_IP, 5000, timeout=300)
    conn.putrequest("PATCH", _location(start))
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    sha = hashlib.sha256()
    while chunk := stream.read(1 << 20):
        sha.update(chunk)
        conn.send(chunk)
    patched = conn.getresponse()
    patched.read()
    conn.close()
    if patched.status != 202:
        raise SwarmError(f"registry refused a blob: {patched.status}")
    digest = f"sha256:{sha.hexdigest()}"
    location = _location(patched)
    sep = "&" if "?" in location else "?"
    done = registry_request("PUT", f"{location}{sep}digest={digest}")
    if done.status != 201:
        raise SwarmError(f"registry refused blob {digest}: {done.status} {done.body[:200]!r}")
    return digest


def _blob_present(repo: str, digest: str) -> bool:
    return registry_request("HEAD", f"/v2/{repo}/blobs/{digest}").status == 200


def registry_manifest(repo: str, tag: str) -> tuple[str, dict] | None:
    """(digest, manifest) of repo:tag in the registry, None when it has none."""
    r = registry_request("GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
    if r.status != 200:
        return None
    return r.getheader("Docker-Content-Digest"), json.loads(r.body)


def push_base_image(
    image: str = BASE_IMAGE, repo: str = BASE_REPO, tag: str = "latest", wait: bool = False
) -> str:
    """Copy `image` from the machine's engine into the registry; its reference by digest.

    Read with `docker save` (the machine's engine cannot push to 198.18.0.1
    itself: it trusts no plain-HTTP registry but loopback, and is not ours to
    reconfigure) and uploaded as an OCI image with uncompressed layers, so a
    layer's digest is its diff id. When the registry already holds this image
    (same config digest, every layer present), nothing is read or sent.

    The engine is read under the integration lock. While single-engine tests
    hold it (for minutes), a registry that has a copy already is used as it
    is, unless `wait` (`up --fresh-base`): that copy may be older than the image.
    """
    cached = registry_manifest(repo, tag)
    with integration_lock(wait=wait or cached is None) as locked:
        if not locked:
            log(
                f"registry: {INTEGRATION_LOCK} is busy: using the registry's copy of {image}, "
                "which may be older (up --fresh-base waits for the lock)"
            )
            return f"{REGISTRY}/{repo}@{cached[0]}"
        try:
            info = json.loads(run("docker", "image", "inspect", image))[0]
        except SwarmError as e:
            raise SwarmError(f"{e}; build it with images/build") from None
        held = registry_manifest(repo, tag)
        if (
            held
            and held[1].get("config", {}).get("digest") == info["Id"]
            and all(_blob_present(repo, d) for d in info["RootFS"]["Layers"])
        ):
            log(f"registry: {image} already there, unchanged ({held[0][:19]})")
            return f"{REGISTRY}/{repo}@{held[0]}"
        log(f"registry: copying {image} from the machine's engine")
        small: dict[str, bytes] = {}
        uploaded: dict[str, tuple[str, int]] = {}
        links: dict[str, str] = {}  # newer engines save a repeated layer as a link
        save = subprocess.Popen(["docker", "save", image], stdout=subprocess.PIPE)
        try:
            with tarfile.open(fileobj=save.stdout, mode="r|") as tar:
                for member in tar:
                    if member.issym():
                        target = os.path.join(os.path.dirname(member.name), member.linkname)
                        links[member.name] = os.path.normpath(target)
                    if not member.isfile():
                        continue
                    f = tar.extractfile(member)
                    if member.size < 1 << 20:
                        small[member.name] = f.read()
                    else:
                        uploaded[member.name] = (_upload_blob(repo, f, member.size), member.size)
        finally:
            save.stdout.close()
            if save.wait() != 0:
                raise SwarmError(f"docker save {image} failed")
    (entry,) = json.loads(small["manifest.json"])
    config = small[entry["Config"]]
    layers = []
    for name in entry["Layers"]:
        name = links.get(name, name)
        if name not in uploaded:  # a small layer, kept in memory
            data = small[name]
            uploaded[name] = (_upload_blob(repo, _BytesReader(data), len(data)), len(data))
        digest, size = uploaded[name]
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": size})
    config_digest = _upload_blob(repo, _BytesReader(config), len(config))
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
        "layers": layers,
    }
    r = registry_request(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        body=json.dumps(manifest).encode(),
        headers={"Content-Type": OCI_MANIFEST},
    )
    if r.status != 201:
        raise SwarmError(f"registry refused the manifest: {r.status} {r.body[:300]!r}")
    return f"{REGISTRY}/{repo}@{r.getheader('Docker-Content-Digest')}"


class _BytesReader:
    def __init__(self, data: bytes) -> None:
        self._data, self._at = data, 0

    def read(self, n: int) -> bytes:
        chunk = self._data[self._at : self._at + n]
        self._at += len(chunk)
        return chunk
