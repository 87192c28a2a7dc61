"""Create real nova instance rows for the fixture's instances, with nova's
own versioned objects (objects.Instance(...).create()), i.e. the rows
nova-api/conductor would write.  network_info comes from the neutron
fixture (same port ids, MACs, IPs), so network_data.json matches neutron;
hostname, display name, metadata, user_data and keypair come from each
instance's "nova" entry in the fixture (written by populate.py).

The fixture's "features" (vm5..vm12) get more of what Nova keeps for an
instance: several VIFs built from their Neutron ports and subnets as
nova.network.neutron builds the info cache (enable_dhcp, ipv6_address_mode,
DNS, host routes, a floating IP), several keypairs, device metadata (NIC and
disk tags, a VLAN, a trusted VF), a NUMA topology with pinned CPUs, block
device mappings (ephemeral, swap, a volume root), a stored password.

Usage: populate_nova.py NOVA_CONF FIXTURE_JSON
"""
import base64
import datetime
import json
import sys

from nova.api.metadata import password as md_password
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



def make_flavor(**kw):
    f = dict(id=1, flavorid='42', name='m1.peer', memory_mb=512, vcpus=1,
             root_gb=1, ephemeral_gb=0, swap=0, rxtx_factor=1.0,
             vcpu_weight=0, disabled=False, is_public=True, extra_specs={},
             description=None)
    f.update(kw)
    return objects.Flavor(**f)


flavor = make_flavor()


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


def feature_network_info(vm):
    """The info cache nova.network.neutron builds from Neutron's ports."""
    vifs = []
    for i, port in enumerate(vm['ports']):
        net = fx['feature_networks'][port['network']]
        subnets = []
        for sub in net['subnets']:
            kw = {'cidr': sub['cidr'],
                  'gateway': nm.IP(address=sub['gateway_ip'], type='gateway'),
                  'enable_dhcp': False}
            if sub.get('ipv6_address_mode'):
                kw['ipv6_address_mode'] = sub['ipv6_address_mode']
            if sub.get('enable_dhcp'):
                kw['enable_dhcp'] = True
            subnet = nm.Subnet(**kw)
            for dns in sub['dns_nameservers']:
                subnet.add_dns(nm.IP(address=dns, type='dns'))
            for r in sub['host_routes']:
                subnet.add_route(nm.Route(
                    cidr=r['destination'],
                    gateway=nm.IP(address=r['nexthop'], type='gateway')))
            for ip in port['fixed_ips']:
                if ip['subnet_id'] != sub['id']:
                    continue
                fixed = nm.FixedIP(address=ip['ip_address'])
                fip = vm['nova'].get('floating_ip')
                if fip and i == 0 and subnet['version'] == 4:
                    fixed.add_floating_ip(nm.IP(address=fip, type='floating'))
                subnet.add_ip(fixed)
            subnets.append(subnet)
        details = {'port_filter': True, 'connectivity': 'l2',
                   'bridge_name': 'br-int', 'datapath_type': 'system'}
        profile = {}
        if vm['nova'].get('device_tags'):
            if i == 0:
                details['vlan'] = '1000'
            else:
                profile['trusted'] = 'true'
        vifs.append(nm.VIF(
            id=port['port_id'], address=port['mac_address'],
            network=nm.Network(id=port['network_id'], bridge='br-int',
                               label=port['network'], subnets=subnets,
                               meta={'injected': False,
                                     'tenant_id': vm['project_id'],
                                     'mtu': net['mtu']}),
            type='ovs', devname='tap' + port['port_id'][:11],
            ovs_interfaceid=port['port_id'], active=True,
            vnic_type='normal', details=details, profile=profile, meta={}))
    return nm.NetworkInfo(vifs)


def device_metadata(vm):
    ports = vm['ports']
    return objects.InstanceDeviceMetadata(devices=[
        objects.NetworkInterfaceMetadata(
            mac=ports[0]['mac_address'],
            bus=objects.PCIDeviceBus(address='0000:00:03.0'),
            tags=['mgmt'], vlan=1000, vf_trusted=False),
        objects.NetworkInterfaceMetadata(
            mac=ports[1]['mac_address'],
            bus=objects.PCIDeviceBus(address='0000:00:04.0'),
            tags=['sriov', 'fast'], vf_trusted=True),
        objects.DiskMetadata(
            bus=objects.SCSIDeviceBus(address='0:0:0:1'),
            serial='vol-serial-8', path='/dev/sdb', tags=['db-volume']),
    ])


def bdm(uuid, **kw):
    b = dict(context=ctxt, instance_uuid=uuid, delete_on_termination=True,
             disk_bus='virtio', device_type='disk', boot_index=-1)
    b.update(kw)
    objects.BlockDeviceMapping(**b).create()


made = []
every = [(n, vm, False) for n, vm in sorted(fx['instances'].items())]
every += [(n, vm, True) for n, vm in sorted(fx.get('features', {}).items())]
for name, vm, feature in every:
    nv = vm['nova']
    n = int(vm['uuid'][:8])
    ud = nv.get('user_data')
    keys = nv.get('keys')
    if keys is None:   # the basic instances: at most one key
        keys = ([{'name': nv['key_name'], 'type': 'ssh',
                  'public_key': nv['public_key']}]
                if nv.get('key_name') else [])
    fl, numa, image = flavor, None, '11111111-2222-4333-8444-555555555555'
    if nv.get('dedicated_cpus'):
        pcpus = nv['dedicated_cpus']
        fl = make_flavor(id=2, flavorid='43', name='m1.pinned',
                         vcpus=len(pcpus),
                         extra_specs={'hw:cpu_policy': 'dedicated'})
        numa = objects.InstanceNUMATopology(cells=[objects.InstanceNUMACell(
            id=0, cpuset=set(), pcpuset=set(pcpus), memory=512,
            cpu_policy='dedicated',
            cpu_pinning={i: c for i, c in enumerate(pcpus)})])
    if nv.get('ephemeral_swap'):
        fl = make_flavor(id=3, flavorid='44', name='m1.ephemeral',
                         ephemeral_gb=1, swap=512)
    if nv.get('volume_backed'):
        image = ''
    sysmeta = {}
    if nv.get('password'):
        sysmeta.update(md_password.convert_password(None, nv['password']))
    inst = objects.Instance(
        context=ctxt, uuid=vm['uuid'], project_id=vm['project_id'],
        user_id='peer-user', hostname=nv['hostname'],
        display_name=nv['display_name'], display_description=name,
        host='metaproxy-peer', node='metaproxy-peer-node', compute_id=1,
        launch_index=0, reservation_id='r-%08d' % n,
        image_ref=image,
        kernel_id='', ramdisk_id='', root_device_name='/dev/vda',
        vm_state='active', power_state=1, task_state=None,
        availability_zone=nv['availability_zone'],
        launched_at=datetime.datetime(2026, 1, 1,
                                      tzinfo=datetime.timezone.utc),
        memory_mb=512, vcpus=fl.vcpus, root_gb=1, ephemeral_gb=fl.ephemeral_gb,
        instance_type_id=fl.id, flavor=fl, old_flavor=None, new_flavor=None,
        key_name=keys[0]['name'] if keys else None,
        key_data=keys[0]['public_key'] if keys else None,
        user_data=base64.b64encode(ud.encode()).decode() if ud else None,
        config_drive='', metadata=dict(nv['metadata']),
        system_metadata=sysmeta, numa_topology=numa,
        device_metadata=device_metadata(vm) if nv.get('device_tags') else None,
        info_cache=objects.InstanceInfoCache(
            network_info=(feature_network_info(vm) if feature
                          else network_info(vm))))
    inst.keypairs = objects.KeyPairList(objects=[objects.KeyPair(
        name=k['name'], user_id='peer-user', type=k['type'],
        public_key=k['public_key'],
        fingerprint='00:11:22:33:44:55:66:77:88:99:aa:bb:cc:dd:ee:ff')
        for k in keys])
    inst.create()
    if feature:
        if nv.get('volume_backed'):
            bdm(vm['uuid'], source_type='volume', destination_type='volume',
                boot_index=0, device_name='/dev/vda', volume_size=1,
                volume_id='aaaaaaaa-0000-4000-8000-0000000000%02d' % n)
        else:
            bdm(vm['uuid'], source_type='image', destination_type='local',
                boot_index=0, device_name='/dev/vda', image_id=image)
        if nv.get('ephemeral_swap'):
            bdm(vm['uuid'], source_type='blank', destination_type='local',
                device_name='/dev/vdb', guest_format=None, volume_size=1)
            bdm(vm['uuid'], source_type='blank', destination_type='local',
                device_name='/dev/vdc', guest_format='swap', volume_size=512)
        if nv.get('device_tags'):
            bdm(vm['uuid'], source_type='volume', destination_type='volume',
                device_name='/dev/sdb', disk_bus='scsi', volume_size=1,
                volume_id='bbbbbbbb-0000-4000-8000-0000000000%02d' % n,
                tag='db-volume')
    made.append('%s=%s' % (name, vm['uuid']))
print('created %d nova instances: %s' % (len(made), ' '.join(made)))
