"""SCEP (RFC 8894) for dmagent.

Sans-IO cores: `capabilities` (GetCACaps, algorithm choice), `cacerts` (GetCACert roles,
CAThumbprint), `cms` (building SignedData/EnvelopedData through key handles) and `cmsread`
(verifying and opening them), `messages` (PKCSReq, RenewalReq, CertPoll, GetCert, GetCRL,
CertRep checks), `der` (DER writing), `ber` (DER/BER reading), `asn1types` (asn1crypto
schemas for callers that use asn1crypto). The I/O shell: `client` (over httpx, see
`httpx_transport`, or over `agent.httpio.BlockingHttp`). The flow: `enroll`; `inline` runs
it without an event loop for one-shot commands. Errors: `errors`.
Nothing is imported here so `import agent.scep.capabilities` stays cheap.
"""
