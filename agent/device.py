"""The device context: everything one emulated device owns, in one object.

The daemon, a one-shot CLI command and every device of a fleet each hold one of these; nothing
device-specific lives at module level. Parts are opened lazily so a command pays only for what
it uses.
"""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from agent.config import Config, DeviceConfig

if TYPE_CHECKING:
    from agent.events import EventLog
    from agent.registry import Registry
    from agent.sealing import Sealer
    from keystores.base import KeyStore


# Where the device remembers who it is, so the state dir keeps its identity whatever
# environment opens it later (Windows keeps its MDM device id under MDMDeviceID too).
IDENTITY_KEY = r"HKLM\SOFTWARE\Microsoft\Provisioning\OMADM\MDMDeviceID"


class DeviceContext:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._device: DeviceConfig | None = None

    @property
    def device(self) -> DeviceConfig:
        if self._device is None:
            _ = self.registry  # opening the store resolves the identity
        assert self._device is not None
        return self._device

    @cached_property
    def registry(self) -> Registry:
        from agent.registry import Registry

        reg = Registry(self.config.registry_path)
        self._device = self._identity(reg)
        reg.current_user_sid = self._device.user_sid
        return reg

    def _identity(self, reg: Registry) -> DeviceConfig:
        def stored(name: str) -> str:
            value = reg.query(IDENTITY_KEY, name)
            return value if isinstance(value, str) else ""

        before = (stored("DeviceClientId"), stored("UserSid"), stored("DeviceName"))
        device = self.config.resolved_device(*before)
        after = (device.device_id, device.user_sid, device.name)
        if after != before:
            with reg.transaction():
                for name, value in zip(("DeviceClientId", "UserSid", "DeviceName"), after,
                                       strict=True):
                    reg.set_sz(IDENTITY_KEY, name, value)
        return device

    @cached_property
    def sealer(self) -> Sealer:
        from agent.sealing import Sealer

        return Sealer.from_state_dir(self.config.state_dir)

    @cached_property
    def events(self) -> EventLog:
        from agent.events import EventLog

        return EventLog(self.config.events_path, device=self.device.device_id)

    def keystore(self, kind: str) -> KeyStore:
        """The key store a recorded key lives in ("software" or "tpm")."""
        if kind == "tpm":
            from keystores.tpm import TpmKeyStore

            return TpmKeyStore(self.config.tpm.tcti, self.config.keys_dir / "tpm")
        from keystores.software import SoftwareKeyStore

        return SoftwareKeyStore(self.config.keys_dir / "software", self.sealer)

    def select_keystore(self, key_protection: int) -> KeyStore:
        """The store ClientCertificateInstall KeyProtection asks for (blocking: probes the TPM)."""
        from keystores.selection import select_keystore

        return select_keystore(key_protection, tpm_tcti=self.config.tpm.tcti or None,
                               software_dir=self.config.keys_dir / "software",
                               tpm_dir=self.config.keys_dir / "tpm", sealing=self.sealer)

    def close(self) -> None:
        if "registry" in self.__dict__:
            self.registry.close()

    def __enter__(self) -> DeviceContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
