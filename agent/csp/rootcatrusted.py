"""RootCATrustedCertificates CSP: `./{Device|User}/Vendor/MSFT/RootCATrustedCertificates/
{Root|CA}/<SHA1>/EncodedCertificate` (RootCATrustedCertificates CSP reference).

The server adds a trusted root or intermediate by its SHA-1 hash with the base64 DER
certificate as data; the hash in the URI must be the certificate's (else 400 — a mismatch
means the server and the device would disagree about what is trusted). The certificates land
in the certificate store (`agent.certstore`) at the Windows locations
`HKLM\\SOFTWARE\\Microsoft\\SystemCertificates\\{ROOT|CA}\\Certificates\\<SHA1>` (value `Blob`),
the user's hive for `./User`. IssuedBy, IssuedTo, ValidFrom, ValidTo, TemplateName are
Get-only views of the certificate. The MS reference says `./User/.../Root` is not supported on
Windows; the agent accepts it (a user Root store exists) — see the module's tests.
"""

from __future__ import annotations

import base64
import binascii
from typing import Final

from agent.certstore import CertStore, StoredCert, StoreName, normalize_thumbprint, thumbprint
from agent.certstore import Scope as StoreScope
from agent.dmtree.csp import (
    CSP,
    ItemValue,
    NodeSpec,
    NodeValue,
    Op,
    Resolved,
    Value,
    interior,
    leaf,
)
from agent.dmtree.errors import bad_value
from agent.dmtree.uri import Scope
from agent.errors import DmAgentError
from agent.registry import Registry
from agent.syncml.messages import Format

_STORES: Final = {"Root": StoreName.ROOT, "CA": StoreName.CA}
_VIEWS: Final = ("IssuedBy", "IssuedTo", "ValidFrom", "ValidTo", "TemplateName")


def _store_node(name: str) -> NodeSpec:
    return interior(name, Op.GET,
                    interior("{CertHash}", Op.GET | Op.DELETE,
                             leaf("EncodedCertificate", Format.B64,
                                  Op.ADD | Op.GET | Op.REPLACE, accepts=(Format.CHR,)),
                             *(leaf(v, Format.CHR, Op.GET) for v in _VIEWS)))


SCHEMA: Final = interior("RootCATrustedCertificates", Op.GET,
                         *(_store_node(n) for n in _STORES))


class RootCATrustedCertificatesCSP(CSP):
    schema: NodeSpec = SCHEMA

    def __init__(self, registry: Registry, scope: Scope) -> None:
        self.store = CertStore(registry)
        self.scope = StoreScope.USER if scope is Scope.USER else StoreScope.DEVICE

    def _store(self, r: Resolved) -> StoreName:
        return _STORES[r.chain[1].name]

    def _cert(self, r: Resolved) -> StoredCert | None:
        try:
            return self.store.get(self.scope, self._store(r), r.var("CertHash"))
        except DmAgentError:  # not a thumbprint, or not in the store
            return None

    def exists(self, r: Resolved) -> bool:
        if len(r.path) < 2:
            return True
        return self._cert(r) is not None

    def children(self, r: Resolved) -> list[str]:
        if len(r.path) == 1:
            return [c.thumbprint for c in self.store.list_store(self.scope, self._store(r))]
        return super().children(r)

    def read(self, r: Resolved) -> NodeValue:
        cert = self._cert(r)
        assert cert is not None  # exists() was checked
        name = r.spec.name
        if name == "EncodedCertificate":
            return NodeValue(Format.B64, base64.b64encode(cert.der).decode())
        if name == "IssuedBy":
            return NodeValue(Format.CHR, cert.issuer)
        if name == "IssuedTo":
            return NodeValue(Format.CHR, cert.subject)
        if name == "ValidFrom":
            return NodeValue(Format.CHR, cert.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"))
        if name == "ValidTo":
            return NodeValue(Format.CHR, cert.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"))
        return NodeValue(Format.CHR, "")  # TemplateName: no template extension is kept

    def write(self, r: Resolved, value: Value, item: ItemValue) -> None:
        where = self.describe(r)
        text = "".join(str(value).split())
        try:
            der = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise bad_value(where, "not base64") from None
        try:
            expected = normalize_thumbprint(r.var("CertHash"))
        except DmAgentError:
            raise bad_value(where, f"{r.var('CertHash')!r} is not a SHA-1 hash") from None
        if thumbprint(der) != expected:
            raise bad_value(where, f"the certificate's SHA-1 is {thumbprint(der)}, "
                                   f"not {expected}")
        try:
            self.store.add(self.scope, self._store(r), der)
        except DmAgentError as exc:
            raise bad_value(where, exc.message) from None

    def remove(self, r: Resolved) -> None:
        self.store.delete(self.scope, self._store(r), r.var("CertHash"))
