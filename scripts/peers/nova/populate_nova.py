"""Create real nova instance rows for the fixture's instances, with nova's
own versioned objects (objects.Instance(...).create()), i.e. the rows
nova-api/conductor would write.  network_info comes from the neutron
fixture (same port ids, MACs, IPs), so network_data.json matches neutron;
hostname, display name, metadata, user_data and keypair come from each
instance's "nova" entry in the fixture (written by populate.py).

Usage: populate_nova.py NOVA_CONF FIXTURE_JSON
"""
import base64
import datetime
import json
import sys

from nova import config
from nova import context
from nova.network import model as nm
from nova import objects

conf_file, fixture_file = sys.argv[1], sys.argv[2]
config.parse_args(['populate_nova', '--config-file', conf_file])
objects.register_all()
ctxt = context.get_admin_context()
with open(fixture_file) as f:
    fx = json.load(f)

flavor = objects.Flavor(id=1, flavorid='42', name='m1.peer', memory_mb=512,
                        vcpus=1, root_gb=1, ephemeral_gb=0, swap=0,
                        rxtx_factor=1.0, vcpu_weight=0, disabled=False,
                        is_public=True, extra_specs={}, description=None)


def network_info(vm):
    gw = vm['gateway_ip']
    subnet = nm.Subnet(
        cidr=vm['cidr'], version=4,
        gateway=nm.IP(address=gw, type='gateway') if gw else None,
        dns=[nm.IP(address='10.0.0.53', type='dns')],
        ips=[nm.FixedIP(address=vm['ip_address'])], routes=[])
    vif = nm.VIF(
        id=vm['port_id'], address=vm['mac_address'],
        network=nm.Network(id=vm['network_id'], bridge='br-int',
                           label=vm['network'], subnets=[subnet],
                           meta={'injected': False,
                                 'tenant_id': vm['project_id'], 'mtu': 1500}),
        type='ovs', devname='tap' + vm['port_id'][:11],
        ovs_interfaceid=vm['port_id'], active=True, vnic_type='normal',
        details={}, meta={})
    return nm.NetworkInfo([vif])


made = []
for name, vm in sorted(fx['instances'].items()):
    nv = vm['nova']
    n = int(vm['uuid'][:8])
    ud = nv.get('user_data')
    inst = objects.Instance(
        context=ctxt, uuid=vm['uuid'], project_id=vm['project_id'],
        user_id='peer-user', hostname=nv['hostname'],
        display_name=nv['display_name'], display_description=name,
        host='metaproxy-peer', node='metaproxy-peer-node', compute_id=1,
        launch_index=0, reservation_id='r-%08d' % n,
        image_ref='11111111-2222-4333-8444-555555555555',
        kernel_id='', ramdisk_id='', root_device_name='/dev/vda',
        vm_state='active', power_state=1, task_state=None,
        availability_zone=nv['availability_zone'],
        launched_at=datetime.datetime(2026, 1, 1,
                                      tzinfo=datetime.timezone.utc),
        memory_mb=512, vcpus=1, root_gb=1, ephemeral_gb=0,
        instance_type_id=1, flavor=flavor, old_flavor=None, new_flavor=None,
        key_name=nv.get('key_name'), key_data=nv.get('public_key'),
        user_data=base64.b64encode(ud.encode()).decode() if ud else None,
        config_drive='', metadata=dict(nv['metadata']), system_metadata={},
        device_metadata=None,
        info_cache=objects.InstanceInfoCache(network_info=network_info(vm)))
    keys = []
    if nv.get('key_name'):
        keys.append(objects.KeyPair(
            name=nv['key_name'], user_id='peer-user', type='ssh',
            public_key=nv['public_key'],
            fingerprint='00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff'))
    inst.keypairs = objects.KeyPairList(objects=keys)
    inst.create()
    made.append('%s=%s' % (name, vm['uuid']))
print('created %d nova instances: %s' % (len(made), ' '.join(made)))
