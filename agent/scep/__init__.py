"""SCEP (RFC 8894) for dmagent.

Sans-IO cores: `capabilities` (GetCACaps), `cacerts` (GetCACert, CAThumbprint), `cms`
(SignedData/EnvelopedData through key handles), `messages` (PKCSReq, RenewalReq, CertPoll,
GetCert, GetCRL, CertRep). The I/O shell: `client` (httpx). The flow: `enroll`.
Nothing is imported here so `import agent.scep.capabilities` stays cheap.
"""
