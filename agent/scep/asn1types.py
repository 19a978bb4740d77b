"""asn1crypto schemas of SCEP structures, for code that works with asn1crypto objects (the
lab CA parsing requests). The client itself reads with `agent.scep.ber`; importing this
module imports asn1crypto."""

from __future__ import annotations

from asn1crypto import core
from asn1crypto import x509 as ax509


class IssuerAndSubject(core.Sequence):  # type: ignore[misc]
    """RFC 8894 §3.3.3: the CertPoll message data."""

    _fields = [("issuer", ax509.Name), ("subject", ax509.Name)]  # noqa: RUF012
