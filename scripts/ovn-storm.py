#!/usr/bin/env python3
"""Helper for scripts/ovn-storm.sh (issue 16's storm through `metaproxy ovn`).

populate REMOTE CHASSIS NETS VMS DIR
    Write a Southbound DB as Neutron and northd would: CHASSIS (with its
    Chassis_Private row) and SB_Global; NETS networks (Datapath_Binding,
    external_ids name=neutron-<uuid>), each with its localport metadata port
    (neutron:device_owner=network:distributed, neutron:cidrs) and VMS/NETS VM
    ports bound to CHASSIS (network n on 10.(100+n).0.0/16, metadata port .0.2,
    VMs from .1.0 on). Then write DIR/inventory.toml (every network and VM,
    for `metaproxy api` and the stand-in agent), DIR/storm.toml (the VMs, for
    `metaproxy storm`) and DIR/nets.txt (one "net-id md-mac cidr-prefix" a line,
    for the wiring).
"""
import json
import subprocess
import sys
import uuid


def transact(remote, ops):
    out = subprocess.run(
        ["ovsdb-client", "--timeout=30", "transact", remote,
         json.dumps(["OVN_Southbound"] + ops)],
        check=True, capture_output=True, text=True).stdout
    res = json.loads(out)
    for r in res:
        if r and "error" in r:
            sys.exit(f"transaction failed: {r}")
    return res


def populate(remote, chassis, nets, vms, out):
    rnd = uuid.UUID(int=0x570A4)  # fixed namespace: same rows every run
    project = uuid.uuid5(rnd, "project").hex
    res = transact(remote, [
        {"op": "insert", "table": "SB_Global", "row": {"nb_cfg": 1}},
        {"op": "insert", "table": "Encap", "uuid-name": "e",
         "row": {"type": "geneve", "ip": "192.0.2.1", "chassis_name": chassis}},
        {"op": "insert", "table": "Chassis", "uuid-name": "c",
         "row": {"name": chassis, "hostname": chassis, "encaps": ["named-uuid", "e"]}},
        {"op": "insert", "table": "Chassis_Private",
         "row": {"name": chassis, "chassis": ["named-uuid", "c"]}},
    ])
    ch = res[2]["uuid"][1]
    inv = ['dhcp_domain = "novalocal"\n']
    lines = []
    per = -(-vms // nets)
    k = 0
    for n in range(nets):
        net = str(uuid.uuid5(rnd, f"net{n}"))
        prefix = f"10.{100 + n}"
        md_mac = f"fa:16:3e:{n:02x}:00:02"
        lines.append(f"{net} {md_mac} {prefix}")
        net_toml = (f'\n[[network]]\nid = "{net}"\nname = "storm-{n}"\nproject = "{project}"\n'
                    f'[[network.subnet]]\nid = "{uuid.uuid5(rnd, f"sub{n}")}"\ncidr = "{prefix}.0.0/16"\n')
        inv.append(net_toml)
        dp = transact(remote, [{"op": "insert", "table": "Datapath_Binding", "row": {
            "tunnel_key": n + 1,
            "external_ids": ["map", [["name", f"neutron-{net}"], ["name2", f"storm-{n}"]]]}}])
        dp = ["uuid", dp[0]["uuid"][1]]
        ops = [{"op": "insert", "table": "Port_Binding", "row": {
            "datapath": dp, "logical_port": str(uuid.uuid5(rnd, f"meta{n}")),
            "tunnel_key": 1, "type": "localport", "mac": f"{md_mac} {prefix}.0.2",
            "external_ids": ["map", [
                ["neutron:device_owner", "network:distributed"],
                ["neutron:device_id", f"ovnmeta-{net}"],
                ["neutron:cidrs", f"{prefix}.0.2/16"]]]}}]
        for p in range(min(per, vms - k)):
            inst = str(uuid.uuid5(rnd, f"vm{k}"))
            ip = f"{prefix}.{1 + p // 250}.{1 + p % 250}"
            mac = f"fa:16:3e:{n:02x}:{(p >> 8) & 255:02x}:{p & 255:02x}"
            ops.append({"op": "insert", "table": "Port_Binding", "row": {
                "datapath": dp, "logical_port": str(uuid.uuid5(rnd, f"port{k}")),
                "tunnel_key": p + 2, "type": "", "mac": f"{mac} {ip}",
                "chassis": ["uuid", ch], "up": True,
                "external_ids": ["map", [
                    ["neutron:device_id", inst], ["neutron:project_id", project],
                    ["neutron:device_owner", "compute:nova"]]]}})
            vm = (f'\n[[instance]]\nuuid = "{inst}"\nname = "vm-{k}"\nhostname = "vm-{k}"\n'
                  f'project = "{project}"\n[[instance.port]]\nid = "{uuid.uuid5(rnd, f"nport{k}")}"\n'
                  f'network = "{net}"\nmac = "{mac}"\nfixed_ips = ["{ip}"]\n')
            inv.append(vm)
            k += 1
            if len(ops) >= 100:  # one argv string stays under 128 KiB
                transact(remote, ops)
                ops = []
        transact(remote, ops)
    with open(f"{out}/inventory.toml", "w") as f:
        f.write("".join(inv))
    with open(f"{out}/nets.txt", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "populate":
        populate(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        sys.exit(__doc__)
