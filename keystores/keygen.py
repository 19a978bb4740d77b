"""Making a software private key, apart from storing it.

This module imports only cryptography's key types, so a command can start generating a key
(the CPU-heavy part, which runs without the GIL) while it is still loading everything else;
`SoftwareKeyStore.create(spec, private_key=...)` stores the key afterwards and checks that it
matches the spec. Sizes are checked by the key store (`keystores.base.check_spec_shape`).
"""

from __future__ import annotations

from typing import Final

from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# 65537: the exponent the Windows software KSP (and every current CA) uses.
RSA_PUBLIC_EXPONENT: Final = 65537
CURVES: Final[dict[int, type[ec.EllipticCurve]]] = {256: ec.SECP256R1, 384: ec.SECP384R1}


def generate_rsa(size: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=size)


def generate_ec(size: int) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(CURVES[size]())
