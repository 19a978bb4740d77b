"""SCEP (RFC 8894) for dmagent.

Sans-IO cores: `capabilities` (GetCACaps, algorithm choice), `cacerts` (GetCACert roles,
CAThumbprint), `cms` (SignedData/EnvelopedData through key handles), `messages` (PKCSReq,
RenewalReq, CertPoll, GetCert, GetCRL, CertRep checks), `der` (DER writing), `ber` (BER
reading). The I/O shell: `client` (httpx). The flow: `enroll`. Errors: `errors`.
Nothing is imported here so `import agent.scep.capabilities` stays cheap.
"""
