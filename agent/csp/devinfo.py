"""DevInfo: `./DevInfo/{DevId, Man, Mod, DmV, Lang}` (OMA-TS-DM_StdObj §5.1), Get only.

The same five values go to the server in package 1 (Replace with Source LocURIs, MS-MDM §4).
DmV is "1.3", what the Windows DM client reports.
"""

from __future__ import annotations

from agent.config import DeviceConfig
from agent.dmtree.csp import NodeValue, ReadOnlyCSP
from agent.syncml.messages import Format

DM_VERSION = "1.3"


def devinfo_values(device: DeviceConfig) -> dict[str, str]:
    """The DevInfo leaves in the order package 1 sends them."""
    return {"DevId": device.device_id, "Man": device.manufacturer, "Mod": device.model,
            "DmV": DM_VERSION, "Lang": device.language}


def devinfo_csp(device: DeviceConfig) -> ReadOnlyCSP:
    return ReadOnlyCSP("DevInfo", {(name,): NodeValue(Format.CHR, value)
                                   for name, value in devinfo_values(device).items()})
