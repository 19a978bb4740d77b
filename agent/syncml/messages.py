"""SyncML DM 1.2 messages as frozen dataclasses (OMA-TS-DM_RepPro-V1_2, MS-MDM profile).

This is the contract between the codec (XML ⇄ these objects), the session state machine and the
DM tree executor. No I/O, no XML here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

SYNCML_NS = "SYNCML:SYNCML1.2"
METINF_NS = "syncml:metinf"
VER_DTD = "1.2"
VER_PROTO = "DM/1.2"
CONTENT_TYPE = "application/vnd.syncml.dm+xml"


class Cmd(enum.StrEnum):
    """Element names of SyncML commands (and `SyncHdr`, which Status may refer to)."""

    SYNCHDR = "SyncHdr"
    ALERT = "Alert"
    ADD = "Add"
    REPLACE = "Replace"
    DELETE = "Delete"
    GET = "Get"
    EXEC = "Exec"
    COPY = "Copy"
    ATOMIC = "Atomic"
    SEQUENCE = "Sequence"
    STATUS = "Status"
    RESULTS = "Results"


ITEM_COMMANDS = frozenset({Cmd.ADD, Cmd.REPLACE, Cmd.DELETE, Cmd.GET, Cmd.EXEC, Cmd.COPY})
CONTAINER_COMMANDS = frozenset({Cmd.ATOMIC, Cmd.SEQUENCE})


class StatusCode(enum.IntEnum):
    """Status codes the client produces or understands (OMA-TS-DM_RepPro §10)."""

    IN_PROGRESS = 101
    OK = 200
    ACCEPTED_FOR_PROCESSING = 202
    AUTHENTICATION_ACCEPTED = 212
    CHUNKED_ITEM_ACCEPTED = 213
    OPERATION_CANCELLED = 214
    NOT_EXECUTED = 215
    ATOMIC_ROLLBACK_OK = 216
    BAD_REQUEST = 400
    INVALID_CREDENTIALS = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    COMMAND_NOT_ALLOWED = 405
    OPTIONAL_FEATURE_NOT_SUPPORTED = 406
    MISSING_CREDENTIALS = 407
    INCOMPLETE_COMMAND = 412
    REQUEST_ENTITY_TOO_LARGE = 413
    URI_TOO_LONG = 414
    UNSUPPORTED_MEDIA_TYPE = 415
    ALREADY_EXISTS = 418
    SIZE_MISMATCH = 424
    COMMAND_FAILED = 500
    ATOMIC_FAILED = 507
    ATOMIC_ROLLBACK_FAILED = 516


class AlertCode(enum.IntEnum):
    """Alert codes (OMA-TS-DM_RepPro §11, MS-MDM §2.2.7.2)."""

    DISPLAY = 1100
    CONTINUE_OR_ABORT = 1101
    TEXT_INPUT = 1102
    SINGLE_CHOICE = 1103
    MULTIPLE_CHOICE = 1104
    SERVER_INITIATED_MGMT = 1200
    CLIENT_INITIATED_MGMT = 1201
    NEXT_MESSAGE = 1222
    SESSION_ABORT = 1223
    CLIENT_EVENT = 1224
    NO_END_OF_DATA = 1225
    GENERIC = 1226


class Format(enum.StrEnum):
    """Meta/Format values (OMA-TS-DM_TND §6)."""

    CHR = "chr"
    INT = "int"
    BOOL = "bool"
    B64 = "b64"
    BIN = "bin"
    NODE = "node"
    XML = "xml"
    NULL = "null"
    FLOAT = "float"
    DATE = "date"
    TIME = "time"


@dataclass(frozen=True)
class Meta:
    """`<Meta>` (MetInf namespace). Only the fields the MS-MDM profile uses."""

    format: str | None = None
    type: str | None = None
    size: int | None = None
    max_msg_size: int | None = None
    max_obj_size: int | None = None
    next_nonce: str | None = None  # base64 text, in Chal


@dataclass(frozen=True)
class Item:
    target: str | None = None  # Target/LocURI, whitespace trimmed
    source: str | None = None  # Source/LocURI
    source_name: str | None = None  # Source/LocName
    meta: Meta | None = None
    data: str | None = None  # text; for Format xml, the serialized inner XML
    more_data: bool = False
    # True when Data carried child elements (markup), False when it was text (possibly escaped
    # XML). The codec writes markup back unescaped so a message round-trips byte for byte.
    data_is_xml: bool = False


@dataclass(frozen=True)
class Cred:
    """`<Cred>`: syncml:auth-basic or syncml:auth-md5 (Meta Type), b64 Format."""

    meta: Meta
    data: str


@dataclass(frozen=True)
class Chal:
    """`<Chal>` in a Status: the auth scheme the server wants and its NextNonce."""

    meta: Meta


@dataclass(frozen=True)
class SyncHdr:
    session_id: str
    msg_id: str
    target: str  # Target/LocURI
    source: str  # Source/LocURI
    source_name: str | None = None
    target_name: str | None = None
    cred: Cred | None = None
    meta: Meta | None = None
    resp_uri: str | None = None
    no_resp: bool = False
    ver_dtd: str = VER_DTD
    ver_proto: str = VER_PROTO


@dataclass(frozen=True)
class ItemCommand:
    """Add, Replace, Delete, Get, Exec, Copy."""

    kind: Cmd
    cmd_id: str | None
    items: tuple[Item, ...] = ()
    meta: Meta | None = None  # command-level Meta applies to items without their own
    no_resp: bool = False
    cred: Cred | None = None


@dataclass(frozen=True)
class Alert:
    cmd_id: str | None
    data: str  # the alert code as sent (text, so a malformed code can be answered 400)
    items: tuple[Item, ...] = ()
    no_resp: bool = False

    @property
    def code(self) -> int | None:
        try:
            return int(self.data.strip())
        except ValueError:
            return None


@dataclass(frozen=True)
class Container:
    """Atomic or Sequence."""

    kind: Cmd
    cmd_id: str | None
    commands: tuple[Command, ...] = ()
    meta: Meta | None = None
    no_resp: bool = False


@dataclass(frozen=True)
class Status:
    cmd_id: str
    msg_ref: str
    cmd_ref: str
    cmd: str
    data: int  # the status code
    target_refs: tuple[str, ...] = ()
    source_refs: tuple[str, ...] = ()
    chal: Chal | None = None
    items: tuple[Item, ...] = ()


@dataclass(frozen=True)
class Results:
    cmd_id: str
    msg_ref: str
    cmd_ref: str
    items: tuple[Item, ...] = ()
    meta: Meta | None = None
    target_ref: str | None = None
    source_ref: str | None = None


@dataclass(frozen=True)
class UnknownCommand:
    """An element in SyncBody the client does not know; answered with Status 400."""

    name: str
    cmd_id: str | None


Command = Alert | ItemCommand | Container | Status | Results | UnknownCommand


@dataclass(frozen=True)
class SyncMLMessage:
    header: SyncHdr
    body: tuple[Command, ...] = field(default_factory=tuple)
    final: bool = True


def command_name(cmd: Command) -> str:
    """The element name of a command, as a Status's `<Cmd>` carries it."""
    if isinstance(cmd, ItemCommand | Container):
        return cmd.kind.value
    if isinstance(cmd, UnknownCommand):
        return cmd.name
    return type(cmd).__name__
