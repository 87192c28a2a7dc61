"""WSGI entry point for the local nova metadata API peer (nova-api-metadata),
served by gunicorn.

nova 34.0.0's metadata service is the WSGI app `nova.wsgi.metadata:application`.
Importing it parses sys.argv with oslo.config, so hide gunicorn's argv; the
paste ini and nova.conf are found through OS_NOVA_CONFIG_DIR /
OS_NOVA_CONFIG_FILES, which scripts/peers/nova.sh sets.
"""
import os
import sys

if 'OS_NOVA_CONFIG_FILES' not in os.environ:
    raise SystemExit('OS_NOVA_CONFIG_FILES is not set: start via nova.sh')
os.environ.setdefault('OS_NOVA_CONFIG_DIR', '/')

_argv = sys.argv
sys.argv = ['nova-api-metadata']
try:
    from nova.wsgi.metadata import application  # noqa: E402,F401
finally:
    sys.argv = _argv
