"""Compare two metadata APIs on the peers fixture (its instances and feature
instances): every OpenStack file at
every version, the EC2 crawl at four versions (bodies with random_seed
masked, statuses, content types); then 8 concurrent password POSTs to the
second one for vm3 (exactly one must be 200). Leaves vm3's password set.

Usage: nova-compare.py NOVA_PORT OURS_PORT
e.g. after scripts/peers/up.sh (NOVA_DB=mariadb or sqlite):
  metaproxy api --config /tmp/metaproxy-peers/nova/metaproxy-api.toml &
  python3 scripts/peers/nova-compare.py 8775 18777
"""
import hmac, hashlib, json, os, re, http.client, sys, threading
NOVA, OURS = int(sys.argv[1]), int(sys.argv[2])
fx = json.load(open(os.environ.get('METAPROXY_PEERS_FIXTURE', '/tmp/metaproxy-peers/fixture.json')))
def hdr(vm):
    u = vm['uuid']
    return {'X-Instance-ID': u, 'X-Tenant-ID': vm['project_id'],
            'X-Instance-ID-Signature': hmac.new(os.environ.get('METAPROXY_PEERS_SECRET', 's3cr3t-shared').encode(), u.encode(), hashlib.sha256).hexdigest(),
            'X-Forwarded-For': vm['ip_address']}
def get(port, path, h, method='GET', body=None):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
    c.request(method, path, body=body, headers=h); r = c.getresponse(); b = r.read(); c.close()
    return r.status, r.getheader('Content-Type'), re.sub(rb'"random_seed": "[^"]*"', b'RS', b)
n = diff = 0
def cmp(path, h):
    global n, diff
    a, b = get(NOVA, path, h), get(OURS, path, h); n += 1
    if a != b:
        diff += 1; print('DIFF', path, '\n nova', a, '\n ours', b)
    return a
def crawl(d, h):
    s, _, body = cmp(d, h)
    if s != 200: return
    for line in body.decode().splitlines():
        if line.endswith('/'): crawl(d + line, h)
        elif '=' in line:
            i = line.split('=')[0]; crawl(d + i + '/', h); cmp(d + i + '/openssh-key', h)
        else: cmp(d + line, h)
for name, vm in sorted({**fx['instances'], **fx.get('features', {})}.items()):
    h = hdr(vm)
    for v in get(NOVA, '/openstack', h)[2].decode().splitlines():
        for f in ['', '/meta_data.json', '/user_data', '/vendor_data.json', '/vendor_data2.json', '/network_data.json', '/password']:
            cmp('/openstack/%s%s' % (v, f), h)
    for v in ['2009-04-04', 'latest', '1.0', '2007-12-15']:
        cmp('/%s/user-data' % v, h); crawl('/%s/meta-data/' % v, h)
print('compared', n, 'differ', diff)
# passwords on MariaDB: 8 concurrent POSTs to ours on vm3 -> exactly one 200
vm = fx['instances']['vm3']; h = hdr(vm); res = []
def post(i): res.append(get(OURS, '/openstack/latest/password', h, 'POST', ('pw-%d' % i).encode())[0])
ts = [threading.Thread(target=post, args=(i,)) for i in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
print('concurrent POST statuses', sorted(res), 'stored', get(OURS, '/openstack/latest/password', h)[2])
sys.exit(1 if diff or sorted(res) != [200] + [409] * 7 else 0)
