"""Create many Nova instances in bulk for the storm comparison
(scripts/bench-nova-storm.sh), with Nova's own versioned objects
(objects.Instance(...).create(), the rows nova-conductor writes), from an
inventory made by `metaproxy inventory synth`: same uuid, project,
hostname, key, user data and port (MAC, fixed IP, network, subnet) as the
inventory, so that `metaproxy storm` checks every answer of the real Nova
(and of ours on these rows) against the VM that asked.

Idempotent: instances whose uuid is already in the cell are skipped, so a
second run only adds what is missing.

Usage: populate_bulk.py NOVA_CONF INVENTORY_TOML
"""
import base64
import datetime
import sys
import time
import tomllib

import sqlalchemy as sa

from nova import config
from nova import context
from nova.network import model as nm
from nova import objects

conf_file, inv_file = sys.argv[1], sys.argv[2]
config.parse_args(['populate_bulk', '--config-file', conf_file])
objects.register_all()
ctxt = context.get_admin_context()
with open(inv_file, 'rb') as f:
    inv = tomllib.load(f)

from nova.conf import CONF  # noqa: E402 (parsed above)
engine = sa.create_engine(CONF.database.connection)
with engine.begin() as c:
    have = {r[0] for r in c.execute(sa.text(
        'SELECT uuid FROM instances WHERE deleted = 0'))}

nets = {n['id']: n for n in inv['network']}
flavor = objects.Flavor(
    id=1, flavorid='42', name='m1.peer', memory_mb=512, vcpus=1, root_gb=1,
    ephemeral_gb=0, swap=0, rxtx_factor=1.0, vcpu_weight=0, disabled=False,
    is_public=True, extra_specs={}, description=None)


def network_info(inst):
    vifs = []
    for port in inst['port']:
        net = nets[port['network']]
        sub = net['subnet'][0]
        subnet = nm.Subnet(
            cidr=sub['cidr'], version=4, enable_dhcp=False,
            gateway=nm.IP(address=sub['gateway'], type='gateway'),
            dns=[], ips=[nm.FixedIP(address=ip) for ip in port['fixed_ips']],
            routes=[])
        vifs.append(nm.VIF(
            id=port['id'], address=port['mac'],
            network=nm.Network(id=net['id'], bridge='br-int',
                               label=net['name'], subnets=[subnet],
                               meta={'injected': False,
                                     'tenant_id': net['project'],
                                     'mtu': net.get('mtu', 1500)}),
            type='ovs', devname='tap' + port['id'][:11],
            ovs_interfaceid=port['id'], active=True, vnic_type='normal',
            details={}, meta={}))
    return nm.NetworkInfo(vifs)


t0 = time.monotonic()
made = 0
for n, i in enumerate(inv['instance']):
    if i['uuid'] in have:
        continue
    keys = i.get('key', [])
    ud = i.get('user_data')
    inst = objects.Instance(
        context=ctxt, uuid=i['uuid'], project_id=i['project'],
        user_id='storm-user', hostname=i['hostname'],
        display_name=i['hostname'], display_description='storm',
        host='metaproxy-peer', node='metaproxy-peer-node', compute_id=1,
        launch_index=0, reservation_id='r-storm%05d' % n,
        image_ref='11111111-2222-4333-8444-555555555555',
        kernel_id='', ramdisk_id='', root_device_name='/dev/vda',
        vm_state='active', power_state=1, task_state=None,
        availability_zone=i.get('availability_zone', 'nova'),
        launched_at=datetime.datetime(2026, 1, 1,
                                      tzinfo=datetime.timezone.utc),
        memory_mb=512, vcpus=1, root_gb=1, ephemeral_gb=0,
        instance_type_id=flavor.id, flavor=flavor, old_flavor=None,
        new_flavor=None,
        key_name=keys[0]['name'] if keys else None,
        key_data=keys[0]['data'] if keys else None,
        user_data=base64.b64encode(ud.encode()).decode() if ud else None,
        config_drive='', metadata={}, system_metadata={},
        info_cache=objects.InstanceInfoCache(network_info=network_info(i)))
    inst.keypairs = objects.KeyPairList(objects=[objects.KeyPair(
        name=k['name'], user_id='storm-user', type='ssh',
        public_key=k['data'],
        fingerprint='00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff')
        for k in keys])
    inst.create()
    made += 1
    if made % 500 == 0:
        print('  %d created (%.0f s)' % (made, time.monotonic() - t0),
              flush=True)
print('populate_bulk: %d created, %d already there, in %.0f s'
      % (made, len(inv['instance']) - made, time.monotonic() - t0))
