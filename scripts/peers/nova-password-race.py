"""Measure what a password POST through our API (`source = "nova"`) and one
through the real nova-api-metadata give when they meet on the same
instance, over many rounds (issue 14). Not a test: Nova's outcome depends on
timing and on its cache, and this prints how often each outcome happened.

Each round resets the instance's password rows to four blank ones (what
`nova clear-password` leaves; with --delete, to none), then, by --order:
  ours-first   POST through ours, then (after its 200) POST through Nova
  nova-first   POST through Nova, then (after its 200) POST through ours
  together     both at once (a barrier, then one POST each)
With --warm, Nova's cache is warmed first: a GET of the password through
Nova before the round's POSTs, so Nova's cached InstanceMetadata has no
password in it (only meaningful when that Nova runs with a cache, e.g.
scripts/peers/nova-extra.sh start race PORT 1 default).
Then it reads the rows back and counts (ours status, Nova status, what is
stored: ours / nova / mixed / none, rows per key).

Usage (Nova venv python, peers up, `. $PEERS_DIR/env`):
  nova-password-race.py OURS_PORT NOVA_PORT ROUNDS ORDER [--warm] [--delete]
"""
import collections
import datetime
import hashlib
import hmac
import http.client
import json
import os
import sys
import threading

import sqlalchemy as sa

ours_port, nova_port, rounds, order = (int(sys.argv[1]), int(sys.argv[2]),
                                       int(sys.argv[3]), sys.argv[4])
warm, delete = '--warm' in sys.argv, '--delete' in sys.argv
assert order in ('ours-first', 'nova-first', 'together'), order
fx = json.load(open(os.environ['METAPROXY_PEERS_FIXTURE']))
secret = os.environ['METAPROXY_PEERS_SECRET'].encode()
vm = fx['instances']['vm3']
uuid = vm['uuid']
headers = {
    'X-Instance-ID': uuid,
    'X-Instance-ID-Signature': hmac.new(secret, uuid.encode(),
                                        hashlib.sha256).hexdigest(),
    'X-Tenant-ID': vm['project_id'],
    'X-Forwarded-For': vm['ip_address'],
}
engine = sa.create_engine(os.environ['METAPROXY_PEERS_NOVA_CONNECTION'])
WHERE = ("`key` IN ('password_0', 'password_1', 'password_2', 'password_3') "
         "AND deleted = 0 AND instance_uuid = :u")


def req(port, method, body=None):
    c = http.client.HTTPConnection('127.0.0.1', port, timeout=60)
    c.request(method, '/openstack/latest/password', body=body, headers=headers)
    r = c.getresponse()
    r.read()
    c.close()
    return r.status


def reset():
    """Delete the rows (duplicates a previous round left too); unless
    --delete, put back four blank ones, as `nova clear-password` leaves."""
    with engine.begin() as c:
        c.execute(sa.text('DELETE FROM instance_system_metadata WHERE '
                          + WHERE), {'u': uuid})
        if not delete:
            for i in range(4):
                c.execute(sa.text(
                    'INSERT INTO instance_system_metadata (created_at, '
                    "deleted, instance_uuid, `key`, value) VALUES "
                    "(:t, 0, :u, :k, '')"),
                    {'t': datetime.datetime.utcnow(), 'u': uuid,
                     'k': 'password_%d' % i})


def rows():
    with engine.begin() as c:
        return [tuple(r) for r in c.execute(sa.text(
            'SELECT `key`, value FROM instance_system_metadata WHERE '
            + WHERE + ' ORDER BY `key`, id'), {'u': uuid})]


counts = collections.Counter()
for i in range(rounds):
    reset()
    if warm:
        req(nova_port, 'GET')
    pw = {'ours': 'ours-%03d-' % i + 'o' * 300, 'nova': 'nova-%03d-' % i + 'n' * 300}
    st = {}
    if order == 'together':
        b = threading.Barrier(2)

        def go(who, port):
            b.wait()
            st[who] = req(port, 'POST', pw[who])
        ts = [threading.Thread(target=go, args=a)
              for a in (('ours', ours_port), ('nova', nova_port))]
        [t.start() for t in ts]
        [t.join() for t in ts]
    else:
        first, second = (('ours', 'nova') if order == 'ours-first'
                         else ('nova', 'ours'))
        port = {'ours': ours_port, 'nova': nova_port}
        st[first] = req(port[first], 'POST', pw[first])
        st[second] = req(port[second], 'POST', pw[second])
    got = rows()
    keys = collections.Counter(k for k, _ in got)
    stored = ''.join(v for k, v in sorted(dict(got).items()))
    what = next((w for w in ('ours', 'nova') if stored == pw[w]),
                'none' if not stored else 'mixed')
    dup = ' DUPLICATE ROWS %s' % dict(keys) if max(keys.values(), default=1) > 1 else ''
    counts['ours %d, nova %d, stored %s%s' % (st['ours'], st['nova'], what, dup)] += 1
reset()
print('%s%s%s, %d rounds:' % (order, ' warm' if warm else '',
                              ' from no rows' if delete else '', rounds))
for k, n in counts.most_common():
    print('  %4d  %s' % (n, k))
