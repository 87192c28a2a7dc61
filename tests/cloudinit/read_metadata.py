"""Read a metadata service with cloud-init's own readers; print what they got.

Usage: read_metadata.py BASE_URL SOURCE_IP

Run by tests/cloudinit_clients.rs with Debian's /usr/bin/python3 (the
`cloud-init` package). Nothing here reads or writes the host's cloud-init
configuration: only the URL helpers are called, against BASE_URL.

- SOURCE_IP: every TCP connection urllib3 opens (requests, hence cloud-init's
  url_helper) is bound to this loopback address, so the service sees a
  distinct "VM" (127.0.0.1 = demo, 127.0.0.2 = demo2).
- `MetadataReader.read_v2()` ends with an EC2 crawl that stock cloud-init
  always sends to http://169.254.169.254; on a test machine that address is
  not ours (or is a real cloud's), so the subclass below points that one
  call at BASE_URL. Everything else is cloud-init's code path unchanged.
- Every cloudinit log record is captured (DEBUG and up). The output carries
  the WARNING+ records and every retry the url helper made, so the test can
  assert both are empty.

Prints one JSON document on stdout.
"""
import base64
import copy
import json
import logging
import sys

import urllib3.util.connection as u3conn

from cloudinit.sources.helpers import ec2, openstack

BASE, SOURCE = sys.argv[1], sys.argv[2]

_create_connection = u3conn.create_connection


def _bound_create_connection(address, *args, **kwargs):
    kwargs["source_address"] = (SOURCE, 0)
    return _create_connection(address, *args, **kwargs)


u3conn.create_connection = _bound_create_connection


class Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


capture = Capture()
root = logging.getLogger("cloudinit")
root.setLevel(logging.DEBUG)
root.addHandler(capture)
root.propagate = False


class Reader(openstack.MetadataReader):
    def _read_ec2_metadata(self):
        return ec2.get_instance_metadata(
            metadata_address=self.base_path,
            ssl_details=self.ssl_details,
            timeout=self.timeout,
            retries=self.retries,
        )


def text(v):
    if isinstance(v, bytes):
        return v.decode()
    return v


out = {}
reader = Reader(BASE)
os_md = reader.read_v2()
md = os_md["metadata"]
out["openstack"] = {
    "version": reader._find_working_version(),
    "uuid": md.get("uuid"),
    "instance-id": md.get("instance-id"),
    "hostname": md.get("hostname"),
    "local-hostname": md.get("local-hostname"),
    "name": md.get("name"),
    "project_id": md.get("project_id"),
    "availability_zone": md.get("availability_zone"),
    "public_keys": md.get("public_keys"),
    "keys": md.get("keys"),
    "meta": md.get("meta"),
    "random_seed_len": len(md.get("random_seed", b"")),
    "userdata": text(os_md.get("userdata")),
    "vendordata": os_md.get("vendordata"),
    "vendordata2": os_md.get("vendordata2"),
    "networkdata": os_md.get("networkdata"),
    "ec2-metadata": os_md.get("ec2-metadata"),
}
nd = os_md.get("networkdata")
if nd:
    # cloud-init's own conversion to network config v1; the MACs are named
    # here so that it never looks at the host's interfaces. It edits its
    # argument in place, hence the copy.
    macs = {l["ethernet_mac_address"]: "eth%d" % i for i, l in enumerate(nd.get("links", []))}
    out["network_config"] = openstack.convert_net_json(copy.deepcopy(nd), known_macs=macs)

out["ec2"] = ec2.get_instance_metadata(api_version="2009-04-04", metadata_address=BASE)
ud = ec2.get_instance_userdata(api_version="2009-04-04", metadata_address=BASE)
out["ec2_userdata"] = text(ud)

out["warnings"] = [
    "%s: %s" % (r.levelname, r.getMessage()) for r in capture.records if r.levelno >= logging.WARNING
]
retries = []
requests_seen = 0
for r in capture.records:
    msg = r.getMessage()
    if msg.startswith("[") and " open '" in msg:
        requests_seen += 1
        if not msg.startswith("[0/"):
            retries.append(msg)
    if "Please wait" in msg or ("after " in msg and "attempts" in msg and not msg.endswith("after 1 attempts")):
        retries.append(msg)
out["retries"] = retries
out["requests"] = requests_seen
json.dump(out, sys.stdout, indent=1, sort_keys=True, default=lambda o: base64.b64encode(o).decode())
