"""Sequential latency of GET /openstack/latest/meta_data.json, signed as the
agent signs, over the peers fixture's instances, a new connection each.

Usage: nova-latency.py N NAME=PORT [NAME=PORT ...]
  e.g. nova-latency.py 200 nova=8775 ours=18775
Reads $METAPROXY_PEERS_FIXTURE (default /tmp/metaproxy-peers/fixture.json)
and $METAPROXY_PEERS_SECRET (default s3cr3t-shared). Wall clock: noisy on a
loaded machine; prints mean, p50 and p99 per server.
"""
import hashlib
import hmac
import http.client
import json
import os
import sys
import time

fx = json.load(open(os.environ.get('METAPROXY_PEERS_FIXTURE',
                                   '/tmp/metaproxy-peers/fixture.json')))
secret = os.environ.get('METAPROXY_PEERS_SECRET', 's3cr3t-shared').encode()
vms = list(fx['instances'].values())
n = int(sys.argv[1])


def headers(vm):
    u = vm['uuid']
    return {'X-Instance-ID': u, 'X-Tenant-ID': vm['project_id'],
            'X-Instance-ID-Signature':
                hmac.new(secret, u.encode(), hashlib.sha256).hexdigest(),
            'X-Forwarded-For': vm['ip_address']}


for arg in sys.argv[2:]:
    name, port = arg.split('=')
    lat = []
    for i in range(n):
        vm = vms[i % len(vms)]
        t = time.perf_counter()
        c = http.client.HTTPConnection('127.0.0.1', int(port))
        c.request('GET', '/openstack/latest/meta_data.json',
                  headers=headers(vm))
        r = c.getresponse()
        r.read()
        c.close()
        if r.status != 200:
            sys.exit('%s: status %d' % (name, r.status))
        lat.append(time.perf_counter() - t)
    lat.sort()
    print('%-10s n=%d mean %.2f ms p50 %.2f ms p99 %.2f ms' % (
        name, n, 1000 * sum(lat) / n, 1000 * lat[n // 2],
        1000 * lat[int(n * 0.99) - 1]))
