"""The lab's OMA-DM server (MS-MDM profile) with Intune-style SCEP profile delivery."""
