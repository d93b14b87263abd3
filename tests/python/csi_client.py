"""A CSI client as a Python user writes one: grpcio with default channel options.

Usage: csi_client.py STUBS_DIR SOCKET POOL NAME
Generated stubs (csi_pb2, csi_pb2_grpc) are imported from STUBS_DIR; tests/runtime.rs makes
them from proto/csi.proto at test time. Prints one JSON object per call, one line each:
{"call": ..., "code": "OK" | grpc code name, "details": ..., "value": ...}; exits 0 when every
call could be made (the Rust test judges the answers).
"""

import json
import sys

sys.path.insert(0, sys.argv[1])

import grpc  # noqa: E402
import csi_pb2  # noqa: E402
import csi_pb2_grpc  # noqa: E402

socket, pool, name = sys.argv[2], sys.argv[3], sys.argv[4]
# No options at all: grpc-core then sends the percent-encoded socket path as :authority.
channel = grpc.insecure_channel("unix://" + socket)
identity = csi_pb2_grpc.IdentityStub(channel)
controller = csi_pb2_grpc.ControllerStub(channel)


def call(label, fn, value=lambda r: None):
    try:
        resp = fn()
        out = {"call": label, "code": "OK", "details": "", "value": value(resp)}
    except grpc.RpcError as e:
        out = {"call": label, "code": e.code().name, "details": e.details() or "", "value": None}
    print(json.dumps(out), flush=True)
    return out


call("Probe", lambda: identity.Probe(csi_pb2.ProbeRequest(), timeout=10), lambda r: r.ready.value)
call("GetPluginInfo", lambda: identity.GetPluginInfo(csi_pb2.GetPluginInfoRequest(), timeout=10), lambda r: r.name)
cap = csi_pb2.VolumeCapability(
    mount=csi_pb2.VolumeCapability.MountVolume(fs_type="ext4"),
    access_mode=csi_pb2.VolumeCapability.AccessMode(mode=csi_pb2.VolumeCapability.AccessMode.SINGLE_NODE_WRITER),
)
create = call(
    "CreateVolume",
    lambda: controller.CreateVolume(
        csi_pb2.CreateVolumeRequest(
            name=name,
            capacity_range=csi_pb2.CapacityRange(required_bytes=64 << 20),
            volume_capabilities=[cap],
            parameters={"pool": pool},
        ),
        timeout=60,
    ),
    lambda r: r.volume.volume_id,
)
volume_id = create["value"] or ""
call("DeleteVolume", lambda: controller.DeleteVolume(csi_pb2.DeleteVolumeRequest(volume_id=volume_id), timeout=60))
# An unknown, oversized id: the answer must still be a readable NOT_FOUND.
call(
    "ValidateVolumeCapabilities(10 KB id)",
    lambda: controller.ValidateVolumeCapabilities(
        csi_pb2.ValidateVolumeCapabilitiesRequest(volume_id="file:n:" + "x" * 10240, volume_capabilities=[cap]),
        timeout=10,
    ),
)
