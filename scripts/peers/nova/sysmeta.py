"""Test helper: read and reset the password rows of Nova's
instance_system_metadata on nova.conf's cell URL (SQLite or MariaDB through
SQLAlchemy, as Nova itself connects), one command per stdin line, one JSON
line per answer, so that a test can run many rounds without a process each.

  rows UUID    -> [[key, value], ...]  the instance's non-deleted password_*
                  rows, every one (a duplicate would show twice), by key
  blank UUID   -> "ok"  sets their values to '' (what `nova clear-password`
                  leaves)
  delete UUID  -> "ok"  deletes the rows (an instance that never had one)
  twice UUID   -> "ok"  replaces them with two rows per key, as a Nova POST
                  racing another writer leaves them: older-N, then newer-N

Usage: sysmeta.py CELL_URL   (run with the Nova venv's python)
"""
import datetime
import json
import sys

import sqlalchemy as sa

engine = sa.create_engine(sys.argv[1])
# Nova's chunks (password.CHUNKS = 4); IN, not LIKE: '_' is a wildcard there.
WHERE = ("`key` IN ('password_0', 'password_1', 'password_2', 'password_3') "
         "AND deleted = 0 AND instance_uuid = :u")
for line in sys.stdin:
    cmd, _, uuid = line.strip().partition(' ')
    with engine.begin() as c:
        if cmd == 'rows':
            rows = c.execute(sa.text(
                'SELECT `key`, value FROM instance_system_metadata WHERE '
                + WHERE + ' ORDER BY `key`, id'), {'u': uuid})
            out = [list(r) for r in rows]
        elif cmd == 'blank':
            c.execute(sa.text("UPDATE instance_system_metadata SET value = '' "
                              'WHERE ' + WHERE), {'u': uuid})
            out = 'ok'
        elif cmd == 'delete':
            c.execute(sa.text('DELETE FROM instance_system_metadata WHERE '
                              + WHERE), {'u': uuid})
            out = 'ok'
        elif cmd == 'twice':
            c.execute(sa.text('DELETE FROM instance_system_metadata WHERE '
                              + WHERE), {'u': uuid})
            for which in ('older', 'newer'):
                for i in range(4):
                    c.execute(sa.text(
                        'INSERT INTO instance_system_metadata (created_at, '
                        'deleted, instance_uuid, `key`, value) VALUES '
                        '(:t, 0, :u, :k, :v)'),
                        {'t': datetime.datetime.utcnow(), 'u': uuid,
                         'k': 'password_%d' % i, 'v': '%s-%d' % (which, i)})
            out = 'ok'
        else:
            out = {'error': 'unknown command %r' % cmd}
    print(json.dumps(out), flush=True)
