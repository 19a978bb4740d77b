"""The lab SCEP CA: an RFC 8894 server with an NDES-like mode, PENDING approval, a pluggable
challenge policy, CRS notifications and fault injection.

- `python -m lab.scepca init|serve|approve|reject|revoke|list|faults|info` (`cli`);
- `lab.scepca.testing.LabScepCA`: the CA in a background thread, as a context manager;
- `config.CAConfig`: mode, caps, verifier (`policy`), pending, validity, notifier (`notify`).

Layers: `protocol` (sans-IO SCEP messages, CA side) ← `service` (decisions, database `db`,
issuance `ca`) ← `server` (ASGI app, faults) ← `runner` (uvicorn).
"""
