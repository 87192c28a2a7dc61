"""Create the neutron schema in SQLite from the HEAD models, as neutron's own
unit tests do.  `neutron-db-manage upgrade heads` cannot be used on SQLite
(mitaka migration 1df244e556f5: "No support for ALTER of constraints in
SQLite dialect"); neutron.sh runs `neutron-db-manage stamp heads` afterwards.

Usage: create_schema.py sqlite:////path/to/neutron.db
"""
import sys

import sqlalchemy as sa

from neutron.db.migration.models import head  # imports every model

url = sys.argv[1]
engine = sa.create_engine(url)
md = head.get_metadata()
md.create_all(engine)
print('created %d tables in %s' % (len(md.tables), url))
