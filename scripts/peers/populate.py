#!/usr/bin/env python3
"""Create the metaproxy test topology in a (noauth) neutron API peer through
its REST API and write a fixture JSON with every id the tests need.
Stdlib only; runs under any python3 >= 3.8.

Usage: populate.py NEUTRON_URL OUT.json

Topology (all resources created as admin with an explicit project_id; with
noauth every neutron request is admin):
  projects  A, B (keystone-style 32-hex ids, fixed)
  net1      A  10.10.0.0/24   vm1 10.10.0.11, vm2 10.10.0.12, dhcp port .2
  net2      B  10.10.0.0/24   vm3 10.10.0.11   (overlaps net1)
  loopnet   A  127.10.0.0/24  vm4 127.10.0.11  (enable_dhcp=false: neutron
                              refuses loopback subnets with DHCP on) - lets a
                              client on this host source from 127.10.0.11
  router1   A  interfaces on net1 (10.10.0.1) and loopnet (127.10.0.1)
  router2   B  interface on net2 (10.10.0.1)
Instance uuids: vmN -> 0000000N-0000-4000-8000-00000000000N.
The fixture also carries what nova.sh puts into nova for each instance
(hostname, user_data, metadata, key), so tests read one file.

"features" (vm5..vm12, with "feature_networks"): the instances that cover
what Nova renders (issue 14), compared only by tests/peers_nova_source.rs.
Their ports are on networks of their own, on no router (the agent tests'
routers and counts stay as they are), with every subnet mode network_data.json
has: ipv4 / ipv4_dhcp, ipv6 / ipv6_dhcp, ipv6_slaac, ipv6_dhcpv6-stateful,
ipv6_dhcpv6-stateless, host routes, DNS servers. What each instance has in
Nova (keys, user data, metadata, device tags, pinned CPUs, BDMs, a floating
IP, a password) is its "nova" entry; scripts/peers/nova/populate_nova.py
creates it with Nova's objects.
"""
import http.client
import json
import os
import sys
import time
import urllib.parse

if len(sys.argv) != 3:
    raise SystemExit(__doc__)
BASE, OUT = sys.argv[1].rstrip('/'), sys.argv[2]
u = urllib.parse.urlsplit(BASE)
HOST, PORT = u.hostname, u.port or 80

PROJ = {'A': '6e1f3b0c9d6a4f0e8b7a2c1d0e9f8a7b',
        'B': '0b1c2d3e4f5a4b6c8d7e9f0a1b2c3d4e'}
PUBKEY = ('ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGx0Y2FsLXBlZXItdGVzdC1rZXkt'
          'MDAwMDAwMDAwMDAw peer@test')


def vm_uuid(n):
    return '%08d-0000-4000-8000-%012d' % (n, n)


NETWORKS = [  # name, project, cidr, dhcp
    ('net1', 'A', '10.10.0.0/24', True),
    ('net2', 'B', '10.10.0.0/24', True),
    ('loopnet', 'A', '127.10.0.0/24', False),
]
ROUTERS = [('router1', 'A', ['net1', 'loopnet']), ('router2', 'B', ['net2'])]
VMS = [  # n, network, ip, has user_data + key
    (1, 'net1', '10.10.0.11', True),
    (2, 'net1', '10.10.0.12', False),   # no user_data, no keys: 404 paths
    (3, 'net2', '10.10.0.11', True),    # same IP as vm1, other net/project
    (4, 'loopnet', '127.10.0.11', True),
]

# name -> subnets: (suffix, ip_version, cidr, enable_dhcp, ipv6 mode, routes)
FEATURE_NETS = {
    'featnet-a': [('v4', 4, '10.20.0.0/24', True, None, []),
                  ('v6', 6, 'fd00:20::/64', True, 'slaac', [])],
    'featnet-b': [('v4', 4, '10.21.0.0/24', False, None,
                   [{'destination': '10.99.0.0/16', 'nexthop': '10.21.0.254'}]),
                  ('v6', 6, 'fd00:21::/64', True, 'dhcpv6-stateful', [])],
    'featnet-c': [('v4', 4, '10.22.0.0/24', True, None, []),
                  ('v6', 6, 'fd00:22::/64', True, 'dhcpv6-stateless', [])],
    'featnet-d': [('v6', 6, 'fd00:23::/64', False, None, [])],
    'featnet-e': [('v6', 6, 'fd00:24::/64', True, None, [])],
}
RSA_KEY = ('ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCQ+ttNDsu2W44vYWZcG39FqBScu'
           'tUnUJ2JHm9wNbUAWnqUWOIm0FS1SwYOoWUQ0OlaBqctzRqRuXFjjLG8UZ10As4DzJq'
           'MF/Ax8mj1N6bOvzna4RIdxyL32UBXtCQTi2wxQRh26CTpdOi5W7Sm0S8SghrOVcesJD'
           'JwbmW0n1D+kpRMus+J+zQcYHmKOh1Sc9R4HEuZ04BEGDue9rrxhA84rGNt/bt9xorSU'
           'wfNmXZJDYqfq6XAwkCp8Ruv1Rqu32NZvUcpEfum8J7LnxL3QGlhDr0w9vzlOJ8cWL0P'
           '6j2v02pPHIsaKVx1nVf/ilTaPq3hRxykgHbtpCIMe1Dv5ZxN peer-rsa@test')
KEYS = {'rsa': {'name': 'peer-rsa', 'type': 'ssh', 'public_key': RSA_KEY},
        'ed25519': {'name': 'peer-key', 'type': 'ssh', 'public_key': PUBKEY}}
# n, networks (one port each, in this order), nova entry overrides
FEATURES = [
    (5, ['featnet-a', 'featnet-b', 'featnet-c'],
     {'keys': ['rsa', 'ed25519'], 'floating_ip': '203.0.113.5',
      'what': 'three NICs (ipv4_dhcp+slaac, static ipv4 with a host route '
              '+ dhcpv6-stateful, ipv4_dhcp + dhcpv6-stateless), a floating '
              'IP, an RSA and an ed25519 key'}),
    (6, ['featnet-d', 'featnet-e'],
     {'keys': [], 'user_data': None,
      'what': 'IPv6 only (static ipv6, ipv6_dhcp), no keypair, no user data'}),
    (7, ['featnet-a'],
     {'keys': ['ed25519'], 'large_user_data': 48000, 'many_metadata': 100,
      'what': '48 000 bytes of user data, 100 metadata keys'}),
    (8, ['featnet-a', 'featnet-c'],
     {'keys': ['rsa'], 'device_tags': True,
      'what': 'device tags on both NICs (one with a VLAN, one trusted VF) '
              'and on a volume'}),
    (9, ['featnet-b'],
     {'keys': ['ed25519'], 'dedicated_cpus': [2, 3],
      'what': 'dedicated CPUs (hw:cpu_policy=dedicated, pinned to 2 and 3)'}),
    (10, ['featnet-c'],
     {'keys': ['ed25519'], 'ephemeral_swap': True,
      'what': 'an ephemeral and a swap BDM (flavor ephemeral_gb 1, swap 512)'}),
    (11, ['featnet-a'],
     {'keys': ['ed25519'], 'volume_backed': True,
      'what': 'volume-backed (root BDM from a volume, no image)'}),
    (12, ['featnet-b'],
     {'keys': ['rsa'], 'password': 'already-set-' + 'p' * 600,
      'what': 'a password already set (3 chunks)'}),
]

conn = None


def call(method, path, body=None):
    """One JSON request on a keep-alive connection; retries once if gunicorn
    closed the idle connection (its keep-alive timeout is 2 s)."""
    global conn
    hdr = {'Accept': 'application/json'}
    data = None
    if body is not None:
        hdr['Content-Type'] = 'application/json'
        data = json.dumps(body)
    for attempt in (1, 2):
        if conn is None:
            conn = http.client.HTTPConnection(HOST, PORT, timeout=60)
        try:
            conn.request(method, path, body=data, headers=hdr)
            r = conn.getresponse()
            raw = r.read()
            break
        except (http.client.RemoteDisconnected, ConnectionResetError,
                BrokenPipeError, http.client.CannotSendRequest):
            conn.close()
            conn = None
            if attempt == 2:
                raise
    if r.getheader('Connection', '').lower() == 'close':
        conn.close()
        conn = None
    if r.status >= 300:
        raise SystemExit('%s %s -> %d %s' % (method, path, r.status,
                                             raw.decode('utf-8', 'replace')))
    return json.loads(raw) if raw else None


def main():
    t0 = time.monotonic()
    # refuse to populate twice (ports with fixed IPs would conflict)
    existing = call('GET', '/v2.0/networks?fields=name')['networks']
    if any(n['name'] in dict((x[0], 1) for x in NETWORKS) for n in existing):
        raise SystemExit('neutron at %s already has the test networks; '
                         'restart it (neutron.sh start gives a fresh DB)'
                         % BASE)

    nets = {}
    for name, proj, cidr, dhcp in NETWORKS:
        n = call('POST', '/v2.0/networks', {'network': {
            'name': name, 'project_id': PROJ[proj]}})['network']
        s = call('POST', '/v2.0/subnets', {'subnet': {
            'name': name + '-v4', 'network_id': n['id'],
            'project_id': PROJ[proj], 'ip_version': 4, 'cidr': cidr,
            'enable_dhcp': dhcp}})['subnet']
        nets[name] = {'id': n['id'], 'project': proj,
                      'project_id': PROJ[proj], 'subnet_id': s['id'],
                      'cidr': cidr, 'gateway_ip': s['gateway_ip'],
                      'enable_dhcp': dhcp, 'router': None}

    routers = {}
    for name, proj, members in ROUTERS:
        r = call('POST', '/v2.0/routers', {'router': {
            'name': name, 'project_id': PROJ[proj]}})['router']
        ifaces = []
        for m in members:
            i = call('PUT', '/v2.0/routers/%s/add_router_interface' % r['id'],
                     {'subnet_id': nets[m]['subnet_id']})
            p = call('GET', '/v2.0/ports/%s' % i['port_id'])['port']
            ifaces.append({'network': m, 'network_id': nets[m]['id'],
                           'subnet_id': nets[m]['subnet_id'],
                           'port_id': p['id'],
                           'mac_address': p['mac_address'],
                           'ip_address': p['fixed_ips'][0]['ip_address'],
                           'device_owner': p['device_owner']})
            nets[m]['router'] = name
        routers[name] = {'id': r['id'], 'project': proj,
                         'project_id': PROJ[proj], 'networks': members,
                         'network_ids': [nets[m]['id'] for m in members],
                         'interfaces': ifaces}

    instances = {}
    for n, net, ip, full in VMS:
        name = 'vm%d' % n
        nw = nets[net]
        p = call('POST', '/v2.0/ports', {'port': {
            'name': name + '-port', 'network_id': nw['id'],
            'project_id': nw['project_id'], 'device_id': vm_uuid(n),
            'device_owner': 'compute:nova',
            'fixed_ips': [{'subnet_id': nw['subnet_id'],
                           'ip_address': ip}]}})['port']
        instances[name] = {
            'uuid': vm_uuid(n), 'project': nw['project'],
            'project_id': nw['project_id'], 'network': net,
            'network_id': nw['id'], 'subnet_id': nw['subnet_id'],
            'cidr': nw['cidr'], 'gateway_ip': nw['gateway_ip'],
            'router': nw['router'],
            'router_id': routers[nw['router']]['id'] if nw['router'] else None,
            'port_id': p['id'], 'mac_address': p['mac_address'],
            'ip_address': p['fixed_ips'][0]['ip_address'],
            # what nova.sh creates in nova for this instance
            'nova': {
                'hostname': name,
                'display_name': name + '-display',
                'metadata': {'role': 'peer-' + name, 'tier': 'test'},
                'user_data': ('#cloud-config\nhostname: %s\n' % name
                              if full else None),
                'key_name': 'peer-key' if full else None,
                'public_key': PUBKEY if full else None,
                'availability_zone': 'nova',
            },
        }

    # a DHCP-owned port (not an instance) on net1: its IP must not resolve
    # to an instance
    p = call('POST', '/v2.0/ports', {'port': {
        'name': 'dhcp-net1', 'network_id': nets['net1']['id'],
        'project_id': PROJ['A'], 'device_id': 'dhcp-metaproxy-peer',
        'device_owner': 'network:dhcp',
        'fixed_ips': [{'subnet_id': nets['net1']['subnet_id'],
                       'ip_address': '10.10.0.2'}]}})['port']
    other_ports = {'dhcp_net1': {
        'port_id': p['id'], 'network': 'net1',
        'network_id': nets['net1']['id'], 'device_id': p['device_id'],
        'device_owner': p['device_owner'], 'mac_address': p['mac_address'],
        'ip_address': p['fixed_ips'][0]['ip_address']}}

    feature_nets = {}
    for name, subnets in FEATURE_NETS.items():
        n = call('POST', '/v2.0/networks', {'network': {
            'name': name, 'project_id': PROJ['A']}})['network']
        subs = []
        for suffix, ver, cidr, dhcp, mode, routes in subnets:
            body = {'name': '%s-%s' % (name, suffix), 'network_id': n['id'],
                    'project_id': PROJ['A'], 'ip_version': ver,
                    'cidr': cidr, 'enable_dhcp': dhcp,
                    'dns_nameservers': ['10.0.0.53' if ver == 4
                                        else 'fd00::53'],
                    'host_routes': routes}
            if mode:
                body['ipv6_ra_mode'] = body['ipv6_address_mode'] = mode
            sub = call('POST', '/v2.0/subnets', {'subnet': body})['subnet']
            subs.append({k: sub[k] for k in (
                'id', 'cidr', 'ip_version', 'gateway_ip', 'enable_dhcp',
                'ipv6_address_mode', 'dns_nameservers', 'host_routes')})
        feature_nets[name] = {'id': n['id'], 'project_id': PROJ['A'],
                              'mtu': n.get('mtu', 1500), 'subnets': subs}

    features = {}
    for n, netnames, nova in FEATURES:
        name = 'vm%d' % n
        ports = []
        for i, net in enumerate(netnames):
            p = call('POST', '/v2.0/ports', {'port': {
                'name': '%s-port%d' % (name, i),
                'network_id': feature_nets[net]['id'],
                'project_id': PROJ['A'], 'device_id': vm_uuid(n),
                'device_owner': 'compute:nova'}})['port']
            ports.append({'port_id': p['id'], 'network': net,
                          'network_id': p['network_id'],
                          'mac_address': p['mac_address'],
                          'fixed_ips': p['fixed_ips']})
        first = ports[0]['fixed_ips'][0]['ip_address']
        nv = {'hostname': name, 'display_name': name + '-display',
              'metadata': {'role': 'feature-' + name},
              'user_data': '#cloud-config\nhostname: %s\n' % name,
              'availability_zone': 'nova'}
        nv.update(nova)
        nv['keys'] = [KEYS[k] for k in nova['keys']]
        if nv.pop('large_user_data', None):
            line = '# %s large user data line\n' % name
            nv['user_data'] = ('#cloud-config\n' + line * (
                nova['large_user_data'] // len(line) + 1))[:nova['large_user_data']]
        if nv.pop('many_metadata', None):
            nv['metadata'].update({'key-%03d' % i: 'värde %d' % i
                                   for i in range(nova['many_metadata'] - 1)})
        features[name] = {
            'uuid': vm_uuid(n), 'project': 'A', 'project_id': PROJ['A'],
            'network_id': ports[0]['network_id'], 'ip_address': first,
            'ports': ports, 'nova': nv}

    fx = {
        'version': 1,
        'created_at': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
        'neutron_url': BASE,
        'nova_url': os.environ.get('NOVA_URL', 'http://127.0.0.1:8775'),
        'shared_secret': os.environ.get('PEERS_SECRET', 's3cr3t-shared'),
        'projects': PROJ,
        'networks': nets,
        'routers': routers,
        'instances': instances,
        'other_ports': other_ports,
        'feature_networks': feature_nets,
        'features': features,
    }
    os.makedirs(os.path.dirname(os.path.abspath(OUT)), exist_ok=True)
    tmp = OUT + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(fx, f, indent=2, sort_keys=True)
        f.write('\n')
    os.replace(tmp, OUT)
    print('populated %s in %.1f s: %d networks, %d routers, %d instances, '
          '%d feature instances on %d more networks; fixture %s'
          % (BASE, time.monotonic() - t0, len(nets), len(routers),
             len(instances), len(features), len(feature_nets), OUT))


if __name__ == '__main__':
    main()
