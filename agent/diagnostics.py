"""HRESULTs, SCEP Status values and the Windows diagnostic events the agent mirrors.

Pure data and formatting: no I/O here (the event log sink is `agent.events`).

Windows writes ErrorCode under `...\\SCEP\\<UniqueID>` as a REG_DWORD and the DM server reads it
back through `.../SCEP/<UniqueID>/ErrorCode` as a *signed* decimal (e.g. 0x80190194 is reported
as -2145844844). `certutil -error` accepts either form; so does `dmagent error`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uuid

FACILITY_WIN32 = 7
FACILITY_HTTP = 0x19  # 0x8019xxxx: WinHTTP/WinINet status codes (HTTP_E_STATUS_*)


def hresult_from_win32(code: int) -> int:
    """HRESULT_FROM_WIN32: 0x8007xxxx for a positive Win32 error code (winerror.h)."""
    if code <= 0:
        return code & 0xFFFFFFFF
    return ((code & 0xFFFF) | (FACILITY_WIN32 << 16) | 0x80000000) & 0xFFFFFFFF


def hresult_from_http_status(status: int) -> int:
    """The HRESULT Windows reports for an HTTP error status: 0x80190000 + status."""
    if not 100 <= status <= 999:
        raise ValueError(f"not an HTTP status: {status}")
    return 0x80190000 + status


def to_unsigned(hr: int) -> int:
    return hr & 0xFFFFFFFF


def to_signed(hr: int) -> int:
    """Signed 32-bit rendering, as Windows reports ErrorCode through the CSP."""
    hr &= 0xFFFFFFFF
    return hr - 0x1_0000_0000 if hr & 0x80000000 else hr


def format_hex(hr: int) -> str:
    return f"0x{to_unsigned(hr):08X}"


def parse_hresult(text: str) -> int:
    """Parse `0x80190194`, `80190194h`, `-2145844844` or `2149122452` to an unsigned HRESULT."""
    s = text.strip().replace("_", "")
    if not s:
        raise ValueError("empty error code")
    try:
        if s.lower().startswith(("0x", "-0x")):
            value = int(s, 16)
        elif s.lower().endswith("h"):
            value = int(s[:-1], 16)
        else:
            value = int(s, 10)
    except ValueError:
        raise ValueError(f"not an error code: {text!r}") from None
    if not -0x80000000 <= value <= 0xFFFFFFFF:
        raise ValueError(f"out of the 32-bit range: {text!r}")
    return to_unsigned(value)


class HResult(enum.IntEnum):
    """The HRESULTs the agent raises or reports, with their winerror.h names."""

    S_OK = 0x00000000
    E_FAIL = 0x80004005
    E_NOTIMPL = 0x80004001
    E_ABORT = 0x80004004
    E_UNEXPECTED = 0x8000FFFF
    E_PENDING = 0x8000000A
    E_ACCESSDENIED = 0x80070005
    E_OUTOFMEMORY = 0x8007000E
    E_INVALIDARG = 0x80070057
    ERROR_FILE_NOT_FOUND = 0x80070002
    ERROR_INVALID_DATA = 0x8007000D
    ERROR_NOT_SUPPORTED = 0x80070032
    ERROR_BUSY = 0x800700AA
    ERROR_CANCELLED = 0x800704C7
    ERROR_NOT_FOUND = 0x80070490
    ERROR_TIMEOUT = 0x800705B4
    ERROR_MESSAGE_EXCEEDS_MAX_SIZE = 0x800710F0
    # WinHTTP transport failures (HRESULT_FROM_WIN32(ERROR_WINHTTP_*)).
    WINHTTP_TIMEOUT = 0x80072EE2
    WINHTTP_NAME_NOT_RESOLVED = 0x80072EE7
    WINHTTP_CANNOT_CONNECT = 0x80072EFD
    WINHTTP_CONNECTION_ERROR = 0x80072EFE
    WINHTTP_INVALID_SERVER_RESPONSE = 0x80072F78
    WINHTTP_SECURE_FAILURE = 0x80072F8F
    # HTTP_E_STATUS_* (0x80190000 + HTTP status).
    HTTP_E_STATUS_UNEXPECTED = 0x80190001
    HTTP_E_STATUS_UNEXPECTED_REDIRECTION = 0x80190003
    HTTP_E_STATUS_BAD_REQUEST = 0x80190190
    HTTP_E_STATUS_DENIED = 0x80190191
    HTTP_E_STATUS_FORBIDDEN = 0x80190193
    HTTP_E_STATUS_NOT_FOUND = 0x80190194
    HTTP_E_STATUS_BAD_METHOD = 0x80190195
    HTTP_E_STATUS_NONE_ACCEPTABLE = 0x80190196
    HTTP_E_STATUS_PROXY_AUTH_REQ = 0x80190197
    HTTP_E_STATUS_REQUEST_TIMEOUT = 0x80190198
    HTTP_E_STATUS_CONFLICT = 0x80190199
    HTTP_E_STATUS_GONE = 0x8019019A
    HTTP_E_STATUS_LENGTH_REQUIRED = 0x8019019B
    HTTP_E_STATUS_PRECOND_FAILED = 0x8019019C
    HTTP_E_STATUS_REQUEST_TOO_LARGE = 0x8019019D
    HTTP_E_STATUS_URI_TOO_LONG = 0x8019019E
    HTTP_E_STATUS_UNSUPPORTED_MEDIA = 0x8019019F
    HTTP_E_STATUS_SERVER_ERROR = 0x801901F4
    HTTP_E_STATUS_NOT_SUPPORTED = 0x801901F5
    HTTP_E_STATUS_BAD_GATEWAY = 0x801901F6
    HTTP_E_STATUS_SERVICE_UNAVAIL = 0x801901F7
    HTTP_E_STATUS_GATEWAY_TIMEOUT = 0x801901F8
    HTTP_E_STATUS_VERSION_NOT_SUP = 0x801901F9
    # CryptoAPI / CNG.
    NTE_BAD_KEY = 0x80090003
    NTE_BAD_DATA = 0x80090005
    NTE_BAD_SIGNATURE = 0x80090006
    NTE_BAD_ALGID = 0x80090008
    NTE_BAD_KEY_STATE = 0x8009000B
    NTE_BAD_KEYSET = 0x80090016
    NTE_INVALID_PARAMETER = 0x80090027
    NTE_NOT_SUPPORTED = 0x80090029
    NTE_DEVICE_NOT_READY = 0x80090030
    CRYPT_E_MSG_ERROR = 0x80091001
    CRYPT_E_UNKNOWN_ALGO = 0x80091002
    CRYPT_E_INVALID_MSG_TYPE = 0x80091004
    CRYPT_E_AUTH_ATTR_MISSING = 0x80091006
    CRYPT_E_HASH_VALUE = 0x80091007
    CRYPT_E_RECIPIENT_NOT_FOUND = 0x8009100B
    CRYPT_E_SIGNER_NOT_FOUND = 0x8009100E
    CRYPT_E_BAD_ENCODE = 0x80092002
    CRYPT_E_NOT_FOUND = 0x80092004
    CRYPT_E_EXISTS = 0x80092005
    CRYPT_E_NO_MATCH = 0x80092009
    CRYPT_E_UNEXPECTED_MSG_TYPE = 0x8009200A
    CRYPT_E_BAD_MSG = 0x8009200D
    CRYPT_E_ASN1_EOD = 0x80093102
    CRYPT_E_ASN1_BADTAG = 0x8009310B
    CERTSRV_E_BAD_REQUESTSUBJECT = 0x80094001
    CERT_E_EXPIRED = 0x800B0101
    CERT_E_UNTRUSTEDROOT = 0x800B0109
    CERT_E_CHAINING = 0x800B010A
    CERT_E_WRONG_USAGE = 0x800B0110
    CERT_E_UNTRUSTEDCA = 0x800B0112
    TRUST_E_CERT_SIGNATURE = 0x80096004
    # ConfigManager2 / OMA-DM client (cfgmgr2err.h).
    CFGMGR_E_XMLPARSEERROR = 0x86000018
    # TPM Base Services.
    TBS_E_TPM_NOT_FOUND = 0x8028400F
    TPM_E_PCP_DEVICE_NOT_READY = 0x80290101

    @property
    def message(self) -> str:
        return _MESSAGES.get(self.value, "")

    @property
    def signed(self) -> int:
        return to_signed(self.value)


_MESSAGES: dict[int, str] = {
    HResult.S_OK: "The operation completed successfully.",
    HResult.E_FAIL: "Unspecified error",
    HResult.E_NOTIMPL: "Not implemented",
    HResult.E_ABORT: "Operation aborted",
    HResult.E_UNEXPECTED: "Catastrophic failure",
    HResult.E_PENDING: "The data necessary to complete this operation is not yet available.",
    HResult.E_ACCESSDENIED: "Access is denied.",
    HResult.E_OUTOFMEMORY: "Not enough memory resources are available to complete this operation.",
    HResult.E_INVALIDARG: "The parameter is incorrect.",
    HResult.ERROR_FILE_NOT_FOUND: "The system cannot find the file specified.",
    HResult.ERROR_INVALID_DATA: "The data is invalid.",
    HResult.ERROR_NOT_SUPPORTED: "The request is not supported.",
    HResult.ERROR_BUSY: "The requested resource is in use.",
    HResult.ERROR_CANCELLED: "The operation was canceled by the user.",
    HResult.ERROR_NOT_FOUND: "Element not found.",
    HResult.ERROR_TIMEOUT: "This operation returned because the timeout period expired.",
    HResult.ERROR_MESSAGE_EXCEEDS_MAX_SIZE:
        "The message provided exceeds the maximum size allowed for this parameter.",
    HResult.WINHTTP_TIMEOUT: "The operation timed out",
    HResult.WINHTTP_NAME_NOT_RESOLVED: "The server name or address could not be resolved",
    HResult.WINHTTP_CANNOT_CONNECT: "A connection with the server could not be established",
    HResult.WINHTTP_CONNECTION_ERROR: "The connection with the server was terminated abnormally",
    HResult.WINHTTP_INVALID_SERVER_RESPONSE:
        "The server returned an invalid or unrecognized response",
    HResult.WINHTTP_SECURE_FAILURE: "A security error occurred",
    HResult.HTTP_E_STATUS_UNEXPECTED: "Unexpected HTTP status code.",
    HResult.HTTP_E_STATUS_UNEXPECTED_REDIRECTION: "Unexpected redirection status code (3xx).",
    HResult.HTTP_E_STATUS_BAD_REQUEST: "Invalid syntax (400).",
    HResult.HTTP_E_STATUS_DENIED: "Access denied (401).",
    HResult.HTTP_E_STATUS_FORBIDDEN: "Forbidden (403).",
    HResult.HTTP_E_STATUS_NOT_FOUND: "Not found (404).",
    HResult.HTTP_E_STATUS_BAD_METHOD: "Method not allowed (405).",
    HResult.HTTP_E_STATUS_NONE_ACCEPTABLE: "No acceptable response found (406).",
    HResult.HTTP_E_STATUS_PROXY_AUTH_REQ: "Proxy authentication required (407).",
    HResult.HTTP_E_STATUS_REQUEST_TIMEOUT: "Server timed out waiting for request (408).",
    HResult.HTTP_E_STATUS_CONFLICT: "Conflict (409).",
    HResult.HTTP_E_STATUS_GONE: "Gone (410).",
    HResult.HTTP_E_STATUS_LENGTH_REQUIRED: "Length required (411).",
    HResult.HTTP_E_STATUS_PRECOND_FAILED: "Precondition failed (412).",
    HResult.HTTP_E_STATUS_REQUEST_TOO_LARGE: "Request entity too large (413).",
    HResult.HTTP_E_STATUS_URI_TOO_LONG: "Request uri too long (414).",
    HResult.HTTP_E_STATUS_UNSUPPORTED_MEDIA: "Unsupported media type (415).",
    HResult.HTTP_E_STATUS_SERVER_ERROR: "Internal server error (500).",
    HResult.HTTP_E_STATUS_NOT_SUPPORTED: "Not supported (501).",
    HResult.HTTP_E_STATUS_BAD_GATEWAY: "Bad Gateway (502).",
    HResult.HTTP_E_STATUS_SERVICE_UNAVAIL: "Service unavailable (503).",
    HResult.HTTP_E_STATUS_GATEWAY_TIMEOUT: "Gateway timeout (504).",
    HResult.HTTP_E_STATUS_VERSION_NOT_SUP: "Version not supported (505).",
    HResult.NTE_BAD_KEY: "Bad Key.",
    HResult.NTE_BAD_DATA: "Bad Data.",
    HResult.NTE_BAD_SIGNATURE: "Invalid Signature.",
    HResult.NTE_BAD_ALGID: "Invalid algorithm specified.",
    HResult.NTE_BAD_KEY_STATE: "Key not valid for use in specified state.",
    HResult.NTE_BAD_KEYSET: "Keyset does not exist",
    HResult.NTE_INVALID_PARAMETER: "The parameter is incorrect.",
    HResult.NTE_NOT_SUPPORTED: "The requested operation is not supported.",
    HResult.NTE_DEVICE_NOT_READY: "The device that is required by this cryptographic provider is not ready for use.",  # noqa: E501
    HResult.CRYPT_E_MSG_ERROR: "An error occurred while performing an operation on a cryptographic message.",  # noqa: E501
    HResult.CRYPT_E_UNKNOWN_ALGO: "Unknown cryptographic algorithm.",
    HResult.CRYPT_E_INVALID_MSG_TYPE: "Invalid cryptographic message type.",
    HResult.CRYPT_E_AUTH_ATTR_MISSING: "The cryptographic message does not contain an expected authenticated attribute.",  # noqa: E501
    HResult.CRYPT_E_HASH_VALUE: "The hash value is not correct.",
    HResult.CRYPT_E_RECIPIENT_NOT_FOUND: "The enveloped-data message does not contain the specified recipient.",  # noqa: E501
    HResult.CRYPT_E_SIGNER_NOT_FOUND: "Cannot find the original signer.",
    HResult.CRYPT_E_BAD_ENCODE: "An error occurred during encode or decode operation.",
    HResult.CRYPT_E_NOT_FOUND: "Cannot find object or property.",
    HResult.CRYPT_E_EXISTS: "The object or property already exists.",
    HResult.CRYPT_E_NO_MATCH: "Cannot find the requested object.",
    HResult.CRYPT_E_UNEXPECTED_MSG_TYPE: "The type of the cryptographic message being decoded is different than what was expected.",  # noqa: E501
    HResult.CRYPT_E_BAD_MSG: "Not a cryptographic message or the cryptographic message is not formatted correctly.",  # noqa: E501
    HResult.CRYPT_E_ASN1_EOD: "ASN1 unexpected end of data.",
    HResult.CRYPT_E_ASN1_BADTAG: "ASN1 bad tag value met.",
    HResult.CERTSRV_E_BAD_REQUESTSUBJECT: "The request subject name is invalid or too long.",
    HResult.CERT_E_EXPIRED: "A required certificate is not within its validity period when verifying against the current system clock or the timestamp in the signed file.",  # noqa: E501
    HResult.CERT_E_UNTRUSTEDROOT: "A certificate chain processed, but terminated in a root certificate which is not trusted by the trust provider.",  # noqa: E501
    HResult.CERT_E_CHAINING: "A certificate chain could not be built to a trusted root authority.",
    HResult.CERT_E_WRONG_USAGE: "The certificate is not valid for the requested usage.",
    HResult.CERT_E_UNTRUSTEDCA: "A certification chain processed correctly but one of the CA certificates is not trusted by the policy provider.",  # noqa: E501
    HResult.TRUST_E_CERT_SIGNATURE: "The signature of the certificate cannot be verified.",
    HResult.CFGMGR_E_XMLPARSEERROR: "Error occured in XML parser.",
    HResult.TBS_E_TPM_NOT_FOUND: "A compatible Trusted Platform Module (TPM) Security Device cannot be found on this computer.",  # noqa: E501
    HResult.TPM_E_PCP_DEVICE_NOT_READY: "The Platform Crypto Device is currently not ready. It needs to be fully provisioned to be operational.",  # noqa: E501
}

# Win32 error names for `dmagent error <small number>` (certutil prints "WIN32: 2 ERROR_...").
_WIN32_NAMES: dict[int, str] = {
    (hr & 0xFFFF): name
    for name, hr in HResult.__members__.items()
    if (hr >> 16) == 0x8007 and name.startswith(("ERROR_", "E_"))
}
_WIN32_NAMES.update({12002: "ERROR_WINHTTP_TIMEOUT", 12007: "ERROR_WINHTTP_NAME_NOT_RESOLVED",
                     12029: "ERROR_WINHTTP_CANNOT_CONNECT", 12030: "ERROR_WINHTTP_CONNECTION_ERROR",
                     12152: "ERROR_WINHTTP_INVALID_SERVER_RESPONSE",
                     12175: "ERROR_WINHTTP_SECURE_FAILURE"})


@dataclass(frozen=True)
class ErrorDescription:
    """What `dmagent error CODE` prints (modelled on `certutil -error`)."""

    hresult: int
    name: str
    message: str
    win32: int | None  # set when the code is (or wraps) a Win32 error

    @property
    def hex(self) -> str:
        return format_hex(self.hresult)

    @property
    def signed(self) -> int:
        return to_signed(self.hresult)

    def as_dict(self) -> dict[str, Any]:
        return {"hresult": self.hex, "signed": self.signed, "unsigned": self.hresult,
                "name": self.name, "message": self.message, "win32": self.win32}


def lookup_error(code: int) -> ErrorDescription:
    """Name and message for an HRESULT, a Win32 error code or an HTTP status HRESULT."""
    code = to_unsigned(code)
    win32: int | None = None
    if 0 < code <= 0xFFFF:  # a bare Win32 code, as `certutil -error 2` accepts
        win32, code = code, hresult_from_win32(code)
    elif (code >> 16) == 0x8007:
        win32 = code & 0xFFFF
    try:
        member = HResult(code)
        return ErrorDescription(code, member.name, member.message, win32)
    except ValueError:
        pass
    if (code >> 16) == 0x8019:  # any HTTP status the table does not name
        status = code & 0xFFFF
        return ErrorDescription(code, "HTTP_E_STATUS_UNEXPECTED",
                                f"HTTP status {status}.", None)
    if win32 is not None and win32 in _WIN32_NAMES:
        return ErrorDescription(code, _WIN32_NAMES[win32], "", win32)
    return ErrorDescription(code, "", "", win32)


def describe_hresult(hr: int) -> str:
    """One-line rendering: `0x80190194 (-2145844844) HTTP_E_STATUS_NOT_FOUND: Not found (404).`"""
    d = lookup_error(hr)
    text = f"{d.hex} ({d.signed})"
    if d.name:
        text += f" {d.name}"
    if d.message:
        text += f": {d.message}"
    return text


def result_text(hr: int) -> str:
    """The `Result : (...)` text of Windows events: the message, else `Unknown ... 0x...`."""
    d = lookup_error(hr)
    if d.message:
        return d.message
    return f"Unknown Win32 Error code: {d.hex}"


class ScepStatus(enum.IntEnum):
    """ClientCertificateInstall `SCEP/<UniqueID>/Status` values."""

    FINISHED = 1
    PENDING = 2
    FAILED = 16
    IN_PROGRESS = 32  # also "unknown"


class FailInfo(enum.IntEnum):
    """RFC 8894 §3.2.1.4.5 failInfo values."""

    BAD_ALG = 0
    BAD_MESSAGE_CHECK = 1
    BAD_REQUEST = 2
    BAD_TIME = 3
    BAD_CERT_ID = 4

    @property
    def hresult(self) -> HResult:
        """The HRESULT the agent reports for a SCEP FAILURE with this failInfo."""
        return _FAILINFO_HRESULT[self]


_FAILINFO_HRESULT = {
    FailInfo.BAD_ALG: HResult.NTE_BAD_ALGID,
    FailInfo.BAD_MESSAGE_CHECK: HResult.NTE_BAD_SIGNATURE,
    FailInfo.BAD_REQUEST: HResult.E_ACCESSDENIED,  # the CA (or its validator) refused the request
    FailInfo.BAD_TIME: HResult.CERT_E_EXPIRED,
    FailInfo.BAD_CERT_ID: HResult.CRYPT_E_NOT_FOUND,
}


# --- events -------------------------------------------------------------------------------

class EventId(enum.IntEnum):
    """DeviceManagement-Enterprise-Diagnostics-Provider/Admin event IDs the agent mirrors."""

    ENROLL_FAILED = 32
    REQUEST_GENERATED = 36
    CERT_INSTALLED = 39
    CSP_EXECUTE = 306
    LOG_ERROR = 307
    INSTALL_FROM_REG = 309


class Level(enum.StrEnum):
    INFORMATION = "Information"
    WARNING = "Warning"
    ERROR = "Error"


@dataclass(frozen=True)
class EventRecord:
    """One diagnostic event; `data` holds the fields, `message` the Windows-style text."""

    event_id: EventId
    level: Level
    message: str
    data: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"id": int(self.event_id), "level": self.level.value,
                "message": self.message, "data": self.data}


def ev_csp_execute(unique_id: str, install_sid: str, location: str, key_protection: int,
                   result: int) -> EventRecord:
    """306: SCEP: CspExecute for UniqueId ... (written when Exec Enroll is accepted)."""
    msg = (f"SCEP: CspExecute for UniqueId : ({unique_id}) InstallUserSid : ({install_sid}) "
           f"InstallLocation : ({location}) NodePath : (clientinstall)  "
           f"KeyProtection: (0x{key_protection:x}) Result : ({result_text(result)}).")
    return EventRecord(EventId.CSP_EXECUTE, Level.INFORMATION, msg,
                       {"unique_id": unique_id, "install_sid": install_sid,
                        "location": location, "key_protection": key_protection,
                        "result": format_hex(result)})


def ev_request_generated(eku: str, url: str, container: str, ksp: int,
                         store_location: int) -> EventRecord:
    """36: SCEP: Certificate request generated successfully."""
    msg = (f"SCEP: Certificate request generated successfully. Enhanced Key Usage: ({eku}), "
           f"NDES URL: ({url}). Container Name: ({container}), KSP Setting: (0x{ksp:x}), "
           f"Store Location: (0x{store_location:x}).")
    return EventRecord(EventId.REQUEST_GENERATED, Level.INFORMATION, msg,
                       {"eku": eku, "url": url, "container": container, "ksp": ksp,
                        "store_location": store_location})


def ev_install_from_reg(unique_id: str, thumbprint: str, respondent: str, status: int,
                        retry_count: int, result: int,
                        correlation: uuid.UUID | None = None) -> EventRecord:
    """309: SCEP: InstallFromRegEntries ... Install Status / Current Retry Count / Result."""
    if correlation is None:
        import uuid  # on use: its import (with `platform`) costs every CLI start ~3 ms

        correlation = uuid.uuid4()
    corr = "{" + str(correlation).upper() + "}"
    msg = (f"SCEP: InstallFromRegEntries. CorrelationGuid : ({corr}) UniqueId : ({unique_id}) "
           f"Certificate Thumbprint : ({thumbprint}) Respondent Server : ({respondent}) "
           f"Install Status : (0x{status:x}) Current Retry Count :  (0x{retry_count:x}) "
           f"Result : ({result_text(result)})")
    level = Level.INFORMATION if to_signed(result) >= 0 else Level.ERROR
    return EventRecord(EventId.INSTALL_FROM_REG, level, msg,
                       {"correlation": corr, "unique_id": unique_id, "thumbprint": thumbprint,
                        "respondent": respondent, "status": status, "retry_count": retry_count,
                        "result": format_hex(result)})


def ev_cert_installed(unique_id: str, thumbprint: str) -> EventRecord:
    """39: SCEP: Certificate installed successfully."""
    return EventRecord(EventId.CERT_INSTALLED, Level.INFORMATION,
                       "SCEP: Certificate installed successfully.",
                       {"unique_id": unique_id, "thumbprint": thumbprint})


def ev_log_error(unique_id: str, message: str) -> EventRecord:
    """307: SCEP: Failed LogError Message : (...)."""
    return EventRecord(EventId.LOG_ERROR, Level.ERROR,
                       f"SCEP: Failed LogError Message : ({message}. )",
                       {"unique_id": unique_id, "detail": message})


def ev_enroll_failed(unique_id: str, result: int) -> EventRecord:
    """32: SCEP: Certificate enroll failed. Result: (...)."""
    return EventRecord(EventId.ENROLL_FAILED, Level.ERROR,
                       f"SCEP: Certificate enroll failed. Result: ({result_text(result)}).",
                       {"unique_id": unique_id, "result": format_hex(result),
                        "result_signed": to_signed(result)})
