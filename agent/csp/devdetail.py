"""DevDetail: `./DevDetail/...` (OMA-TS-DM_StdObj §5.2 plus the Windows `Ext/Microsoft` nodes).

Get only. Values come from the device config: DevTyp/OEM from model/manufacturer, SwV from
the OS version, DeviceName from the device name. LrgObj is true: the client handles large
objects (MoreData chunks). URI/Max* are the limits `agent.dmtree.uri` enforces, so what the
device advertises is what it accepts.
"""

from __future__ import annotations

from agent.config import DeviceConfig
from agent.dmtree.csp import NodeValue, ReadOnlyCSP
from agent.dmtree.uri import MAX_DEPTH, MAX_SEGMENT_LEN, MAX_TOTAL_LEN
from agent.syncml.messages import Format

FIRMWARE_VERSION = "1.0"
HARDWARE_VERSION = "1.0"
OS_PLATFORM = "Windows 10 Enterprise"
PROCESSOR_ARCHITECTURE = "9"  # PROCESSOR_ARCHITECTURE_AMD64, as Windows reports it


def devdetail_csp(device: DeviceConfig) -> ReadOnlyCSP:
    def chr_(text: str) -> NodeValue:
        return NodeValue(Format.CHR, text)

    values = {
        ("DevTyp",): chr_(device.model),
        ("OEM",): chr_(device.manufacturer),
        ("FwV",): chr_(FIRMWARE_VERSION),
        ("SwV",): chr_(device.os_version),
        ("HwV",): chr_(HARDWARE_VERSION),
        ("LrgObj",): NodeValue(Format.BOOL, "true"),
        ("URI", "MaxDepth"): chr_(str(MAX_DEPTH)),
        ("URI", "MaxTotLen"): chr_(str(MAX_TOTAL_LEN)),
        ("URI", "MaxSegLen"): chr_(str(MAX_SEGMENT_LEN)),
        ("Ext", "Microsoft", "DeviceName"): chr_(device.name),
        ("Ext", "Microsoft", "DNSComputerName"): chr_(device.name),
        ("Ext", "Microsoft", "OSPlatform"): chr_(OS_PLATFORM),
        ("Ext", "Microsoft", "ProcessorArchitecture"): NodeValue(Format.INT,
                                                                 PROCESSOR_ARCHITECTURE),
    }
    return ReadOnlyCSP("DevDetail", values)
