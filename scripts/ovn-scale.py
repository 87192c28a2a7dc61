#!/usr/bin/env python3
"""Helpers for scripts/ovn-scale.sh (issue 16's scale measurement).

populate REMOTE QUERIES  write a Southbound DB as Neutron and northd would:
                         500 networks (Datapath_Binding, external_ids
                         name=neutron-<uuid>), each with its localport
                         metadata port and 20 VM ports (10 000), bound to
                         100 other chassis, except 2 ports in each of 50
                         networks bound to chassis "scale-local"; then write
                         the (network, IP) of those 100 local VMs to QUERIES.
scan DUMP QUERIES ITERS  Neutron's per-request resolution over every
                         Port_Binding row of DUMP (`ovsdb-client dump -f
                         json`): get_network_port_bindings_by_ip, as in
                         neutron/common/ovn/... impl_idl_ovn.py; prints the
                         median of 3 runs in microseconds per lookup, as JSON.
"""
import json
import statistics
import subprocess
import sys
import time
import uuid

NETS, PORTS, LOCAL_NETS, LOCAL_PER_NET, OTHER_CHASSIS = 500, 20, 50, 2, 100
LOCAL = "scale-local"


def transact(remote, ops):
    out = subprocess.run(
        ["ovsdb-client", "transact", remote, json.dumps(["OVN_Southbound"] + ops)],
        check=True, capture_output=True, text=True).stdout
    res = json.loads(out)
    for r in res:
        if r and "error" in r:
            sys.exit(f"transaction failed: {r}")
    return res


def populate(remote, queries_path):
    rnd = uuid.UUID(int=0x5CA1E)  # fixed namespace: same rows every run
    chassis = [LOCAL] + [f"compute-{i:03d}" for i in range(OTHER_CHASSIS)]
    ops = [{"op": "insert", "table": "SB_Global", "row": {"nb_cfg": 1}}]
    for i, name in enumerate(chassis):
        ops.append({"op": "insert", "table": "Encap", "uuid-name": f"e{i}",
                    "row": {"type": "geneve", "ip": f"192.0.2.{i + 1}",
                            "chassis_name": name}})
        ops.append({"op": "insert", "table": "Chassis", "row": {
            "name": name, "hostname": name,
            "encaps": ["named-uuid", f"e{i}"]}})
        ops.append({"op": "insert", "table": "Chassis_Private",
                    "row": {"name": name}})
    res = transact(remote, ops)
    ch_uuid = [res[2 + 3 * i]["uuid"][1] for i in range(len(chassis))]
    queries = []
    batch = 5  # one argv string must stay under 128 KiB (MAX_ARG_STRLEN)
    for b in range(0, NETS, batch):
        ops = []
        for n in range(b, b + batch):
            net = str(uuid.uuid5(rnd, f"net{n}"))
            ops.append({"op": "insert", "table": "Datapath_Binding",
                        "uuid-name": f"dp{n}", "row": {
                            "tunnel_key": n + 1,
                            "external_ids": ["map", [
                                ["name", f"neutron-{net}"],
                                ["name2", f"net{n}"]]]}})
            dp = ["named-uuid", f"dp{n}"]
            ops.append({"op": "insert", "table": "Port_Binding", "row": {
                "datapath": dp, "logical_port": str(uuid.uuid5(rnd, f"meta{n}")),
                "tunnel_key": 1, "type": "localport",
                "mac": f"fa:16:3e:{n >> 8:02x}:{n & 255:02x}:02 10.0.0.2",
                "external_ids": ["map", [
                    ["neutron:device_owner", "network:distributed"],
                    ["neutron:device_id", f"ovnmeta-{net}"],
                    ["neutron:cidrs", "10.0.0.2/24"],
                    ["neutron:network_name", f"neutron-{net}"],
                    ["neutron:mtu", "1442"]]]}})
            for p in range(PORTS):
                local = n < LOCAL_NETS and p < LOCAL_PER_NET
                ch = ch_uuid[0] if local else ch_uuid[1 + (n * PORTS + p) % OTHER_CHASSIS]
                ip = f"10.0.0.{p + 10}"
                ops.append({"op": "insert", "table": "Port_Binding", "row": {
                    "datapath": dp,
                    "logical_port": str(uuid.uuid5(rnd, f"port{n}.{p}")),
                    "tunnel_key": p + 2, "type": "",
                    "mac": f"fa:16:3e:{n >> 8:02x}:{n & 255:02x}:{p + 16:02x} {ip}",
                    "chassis": ["uuid", ch],
                    "up": True,
                    "external_ids": ["map", [
                        ["neutron:device_owner", "compute:nova"],
                        ["neutron:device_id", str(uuid.uuid5(rnd, f"vm{n}.{p}"))],
                        ["neutron:project_id", "0b3cfd5e3d9f4d1e9c0a1f6b1c2d3e4f"],
                        ["neutron:cidrs", f"{ip}/24"],
                        ["neutron:network_name", f"neutron-{net}"]]]}})
                if local:
                    queries.append([net, ip])
        transact(remote, ops)
    with open(queries_path, "w") as f:
        json.dump(queries, f)


# The scan, over rows shaped as the Python IDL gives them (port.chassis and
# port.mac are lists, port.datapath is the referenced row object).
class Row:
    def __init__(self, uuid_, cols):
        self.uuid = uuid_
        self.__dict__.update(cols)


def atoms(v):
    if isinstance(v, list) and v and v[0] == "set":
        return v[1]
    if isinstance(v, list) and v and v[0] == "uuid":
        return [v]
    return [v]


def load(dump_path):
    d = [json.loads(line) for line in open(dump_path) if line.strip()]
    # `ovsdb-client dump -f json` prints one object per table, one a line:
    # {"caption": "<table> table", "headings": [...], "data": [[...], ...]}
    tables = {}
    for t in d:
        name = t["caption"].split(" ")[0]
        tables[name] = [dict(zip(t["headings"], r)) for r in t["data"]]
    dps = {}
    for r in tables["Datapath_Binding"]:
        ext = dict(r["external_ids"][1])
        dps[r["_uuid"][1]] = Row(r["_uuid"][1], {"external_ids": ext})
    rows = []
    for r in tables["Port_Binding"]:
        rows.append(Row(r["_uuid"][1], {
            "chassis": [a[1] for a in atoms(r["chassis"])],
            "mac": sorted(atoms(r["mac"])),
            "datapath": dps[r["datapath"][1]]}))
    return rows


def get_network_name_from_datapath(datapath):
    return datapath.external_ids["name"].replace("neutron-", "", 1)


def get_network_port_bindings_by_ip(rows, network, ip_address):
    def check_net_and_ip(port):
        if not port.chassis:
            return False
        is_in_network = (str(port.datapath.uuid) == network or
                         get_network_name_from_datapath(port.datapath) == network)
        if port.mac and is_in_network:
            return ip_address in port.mac[0].split(" ")
        return False
    return [r for r in rows if check_net_and_ip(r)]


def scan(dump_path, queries_path, iters):
    rows = load(dump_path)
    queries = json.load(open(queries_path))
    for net, ip in queries:  # same answers as ours: exactly one port each
        assert len(get_network_port_bindings_by_ip(rows, net, ip)) == 1
    runs = []
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(iters):
            for net, ip in queries:
                get_network_port_bindings_by_ip(rows, net, ip)
        runs.append((time.perf_counter() - t0) * 1e6 / (iters * len(queries)))
    print(json.dumps({"port_binding_rows": len(rows), "lookups": len(queries) * iters,
                      "us_per_lookup_runs": runs,
                      "us_per_lookup_median": statistics.median(runs)}))


if __name__ == "__main__":
    if sys.argv[1] == "populate":
        populate(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "scan":
        scan(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        sys.exit(__doc__)
