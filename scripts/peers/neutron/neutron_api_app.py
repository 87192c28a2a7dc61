"""WSGI entry point for the local neutron API peer (served by gunicorn).

neutron 29.0.0 ships no `neutron-server` console script: the API is the WSGI
app `neutron.wsgi.api:application`.  Importing it parses sys.argv with
oslo.config, so hide gunicorn's argv; the config files are found through
neutron's OS_NEUTRON_CONFIG_DIR / OS_NEUTRON_CONFIG_FILES variables, which
scripts/peers/neutron.sh sets (rendered configs under $PEERS_DIR/neutron/etc).
"""
import os
import sys

if 'OS_NEUTRON_CONFIG_DIR' not in os.environ:
    raise SystemExit('OS_NEUTRON_CONFIG_DIR is not set: start via neutron.sh')
os.environ.setdefault('OS_NEUTRON_CONFIG_FILES', 'neutron.conf;ml2_conf.ini')

_argv = sys.argv
sys.argv = ['neutron-api']
try:
    from neutron.wsgi.api import application  # noqa: E402,F401
finally:
    sys.argv = _argv
