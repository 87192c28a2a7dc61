"""What Nova itself renders for one instance's devices, dedicated CPUs,
EC2 block-device-mapping and ami-id, from the rows of a Nova-shaped SQLite
file: the oracle of tests/api_nova_source.rs (run there only when the
peers' Nova venv exists).

Nova's own code does the work: InstanceDeviceMetadata.obj_from_db and
InstanceNUMATopology.obj_from_db_obj load the instance_extra JSON (with the
legacy-cell upgrade; its write-back is skipped, nothing is written),
InstanceMetadata._get_device_metadata / _get_instance_dedicated_cpus build
the meta_data.json values, block_device.instance_block_mapping the EC2
mapping from BlockDeviceMapping objects, glance_id_to_ec2_id the ami-id of
an instance without an image (it returns before any lookup), and
ec2_md_print prints them. Offline: no
config file, no database connection, no listening socket.

Usage: render_oracle.py DB_FILE INSTANCE_UUID...
Prints JSON, per instance uuid: {"meta_data": {version: {"devices": text, "dedicated_cpus":
text}}, "bdm": {"listing": text, "entries": {name: text}}, "ami_id": text
or null when the instance has an image}.
"""
import json
import sqlite3
import sys

from oslo_serialization import jsonutils

from nova.api.metadata import base
from nova import block_device
from nova import objects
from nova.objects import ec2 as ec2_obj

objects.register_all()
# An old cell is upgraded in memory and saved back; do not save.
objects.InstanceNUMATopology._save_migrated_cpuset_to_instance_extra = (
    classmethod(lambda cls, context, obj, uuid: None))


def render(db, uuid):
    """The oracle's answers for one instance."""
    inst_row = db.execute(
        'SELECT * FROM instances WHERE uuid = ? AND deleted = 0',
        (uuid,)).fetchone()
    extra = db.execute(
        'SELECT device_metadata, numa_topology FROM instance_extra '
        'WHERE instance_uuid = ? AND deleted = 0', (uuid,)).fetchone()
    bdm_rows = db.execute(
        'SELECT source_type, destination_type, guest_format, device_name '
        'FROM block_device_mapping WHERE instance_uuid = ? AND deleted = 0 '
        'ORDER BY id', (uuid,)).fetchall()

    # Instance._from_db_object with expected_attrs device_metadata, numa_topology.
    instance = objects.Instance(uuid=uuid)
    instance.device_metadata = (
        None if extra['device_metadata'] is None else
        objects.InstanceDeviceMetadata.obj_from_db(None, extra['device_metadata']))
    instance.numa_topology = (
        None if extra['numa_topology'] is None else
        objects.InstanceNUMATopology.obj_from_db_obj(
            None, uuid, extra['numa_topology']))
    # InstanceMetadata.__init__ round-trips the instance the same way.
    instance = objects.Instance.obj_from_primitive(instance.obj_to_primitive())
    md = base.InstanceMetadata.__new__(base.InstanceMetadata)
    md.instance = instance

    out = {'meta_data': {}}
    for version in base.OPENSTACK_VERSIONS:
        out['meta_data'][version] = {
            'devices': jsonutils.dumps(md._get_device_metadata(version)),
            'dedicated_cpus': jsonutils.dumps(md._get_instance_dedicated_cpus()),
        }

    bdms = [objects.BlockDeviceMapping(
        source_type=r['source_type'], destination_type=r['destination_type'],
        guest_format=r['guest_format'], device_name=r['device_name'])
        for r in bdm_rows]
    mappings = block_device.instance_block_mapping(dict(inst_row), bdms)
    out['bdm'] = {
        'listing': base.ec2_md_print(mappings),
        'entries': {k: base.ec2_md_print(v) for k, v in mappings.items()},
    }
    # EC2Ids._get_ec2_ids: ami_id = glance_id_to_ec2_id(image_ref), which for
    # an empty image_ref returns before any database lookup; get_ec2_metadata
    # puts it under 'ami-id' and the handler prints it with ec2_md_print.
    out['ami_id'] = None
    if not inst_row['image_ref']:
        out['ami_id'] = base.ec2_md_print(
            ec2_obj.glance_id_to_ec2_id(None, inst_row['image_ref']))
    return out


db = sqlite3.connect(sys.argv[1])
db.row_factory = sqlite3.Row
print(json.dumps({uuid: render(db, uuid) for uuid in sys.argv[2:]}))
