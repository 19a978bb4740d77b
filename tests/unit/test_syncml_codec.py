"""SyncML codec: table-driven round trips, Microsoft-style wire vectors, hostile input."""

from __future__ import annotations

import time

import pytest

from agent.errors import PeerError
from agent.syncml import codec
from agent.syncml.codec import DecodeLimits, SyncMLDecodeError
from agent.syncml.messages import (
    Alert,
    Chal,
    Cmd,
    Container,
    Cred,
    Item,
    ItemCommand,
    Meta,
    Results,
    Status,
    SyncHdr,
    SyncMLMessage,
    UnknownCommand,
)

HDR = SyncHdr(session_id="1A", msg_id="3", target="https://mdm.example/omadm",
              source="8B2A9C1E-0D5F-4E1B-9A77-3C4D5E6F7081")
SCEP = "./Device/Vendor/MSFT/ClientCertificateInstall/SCEP/ModelName_AC_1_LogicalName_2_Hash_3"

# --- round trips: message -> bytes -> message ------------------------------------------------

ROUND_TRIPS: dict[str, SyncMLMessage] = {
    "empty body, no Final": SyncMLMessage(HDR, (), final=False),
    "header with everything": SyncMLMessage(SyncHdr(
        "FF", "12", "https://s/x?a=1&b=2", "dev", source_name="user@contoso.com",
        target_name="srv", cred=Cred(Meta(format="b64", type="syncml:auth-md5"), "Zz6E=="),
        meta=Meta(max_msg_size=524288, max_obj_size=4194304), resp_uri="https://s/next",
        no_resp=True), ()),
    "status with chal and refs": SyncMLMessage(HDR, (
        Status("1", "1", "0", "SyncHdr", 401,
               chal=Chal(Meta(format="b64", type="syncml:auth-md5", next_nonce="Tm9uY2U="))),
        Status("2", "1", "5", "Replace", 200, target_refs=("./a", "./b"), source_refs=("s",),
               items=(Item(target="./a"),)),
    )),
    "uuid cmdids and every item command": SyncMLMessage(HDR, tuple(
        ItemCommand(kind, f"{n:08x}-aaaa-bbbb-cccc-0123456789ab",
                    (Item(target=f"./Vendor/MSFT/X/{kind.value}", data="v"),))
        for n, kind in enumerate((Cmd.ADD, Cmd.REPLACE, Cmd.DELETE, Cmd.GET, Cmd.EXEC,
                                  Cmd.COPY)))),
    "data formats": SyncMLMessage(HDR, (ItemCommand(Cmd.REPLACE, "7", (
        Item(target="./a", meta=Meta(format="chr", type="text/plain"), data="a < b & c > d"),
        Item(target="./b", meta=Meta(format="int"), data="42"),
        Item(target="./c", meta=Meta(format="bool"), data="true"),
        Item(target="./d", meta=Meta(format="b64"), data="AAEC/w=="),
        Item(target="./e", meta=Meta(format="node")),
        Item(target="./f", meta=Meta(format="null"), data=""),
        Item(target="./g", meta=Meta(format="xml"), data="<a x=\"1\">t</a>"),
        Item(target="./h", meta=Meta(format="xml"), data="<a x=\"1\">t&amp;u</a>",
             data_is_xml=True),
        Item(target="./i", data="line1\r\nline2\ttab  "),
        Item(target="./j", data="ünïcödé ✓ 𝄞"),
    ), meta=Meta(format="chr"), no_resp=True),)),
    "nested atomic and sequence": SyncMLMessage(HDR, (Container(Cmd.ATOMIC, "10", (
        ItemCommand(Cmd.ADD, "11", (Item(target="./x", data="1"),)),
        Container(Cmd.SEQUENCE, "12", (ItemCommand(Cmd.EXEC, "13", (Item(target="./y"),)),
                                       Alert("14", "1226"))),
        Container(Cmd.ATOMIC, "15", ()),
        UnknownCommand("Frobnicate", "16"),
    ), meta=Meta(type="text/plain")),)),
    "alerts and results": SyncMLMessage(HDR, (
        Alert("2", "1222"), Alert("3", "1224", (Item(meta=Meta(type="com.microsoft/MDM/"
                                                                  "LoginStatus"), data="user"),)),
        Results("4", "1", "5", (Item(source="./DevDetail/SwV", meta=Meta(format="chr"),
                                     data="10.0"),), meta=Meta(format="chr"),
                target_ref="./t", source_ref="./s"),
    )),
    "chunk with size and more data": SyncMLMessage(HDR, (ItemCommand(Cmd.REPLACE, "9", (
        Item(target="./big", meta=Meta(format="b64", size=100000), data="QUJD",
             more_data=True),)),), final=False),
    "unknown without cmdid": SyncMLMessage(HDR, (UnknownCommand("Put", None),
                                                 ItemCommand(Cmd.GET, None, ()))),
}


@pytest.mark.parametrize("msg", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_round_trip(msg: SyncMLMessage) -> None:
    wire = codec.encode(msg)
    assert codec.decode(wire) == msg
    assert codec.encode(codec.decode(wire)) == wire  # canonical: byte for byte


def test_encode_is_windows_shape() -> None:
    """No XML declaration, no whitespace, metinf namespace on each Meta child."""
    msg = SyncMLMessage(SyncHdr("1", "1", "https://s", "dev",
                                meta=Meta(max_msg_size=524288)),
                        (Status("1", "1", "0", "SyncHdr", 200),))
    assert codec.encode(msg) == (
        b'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><VerDTD>1.2</VerDTD>'
        b"<VerProto>DM/1.2</VerProto><SessionID>1</SessionID><MsgID>1</MsgID>"
        b"<Target><LocURI>https://s</LocURI></Target><Source><LocURI>dev</LocURI></Source>"
        b'<Meta><MaxMsgSize xmlns="syncml:metinf">524288</MaxMsgSize></Meta></SyncHdr>'
        b"<SyncBody><Status><CmdID>1</CmdID><MsgRef>1</MsgRef><CmdRef>0</CmdRef>"
        b"<Cmd>SyncHdr</Cmd><Data>200</Data></Status><Final/></SyncBody></SyncML>")
    assert len(codec.encode(msg)) == (codec.MESSAGE_OVERHEAD
                                      + len(codec.encode_header(msg.header))
                                      + len(codec.encode_command(msg.body[0])))


def test_encode_replaces_characters_xml_cannot_carry() -> None:
    msg = SyncMLMessage(HDR, (Results("1", "1", "2", (Item(source="./x", data="a\x00b\x1fc"),)),))
    item = codec.decode(codec.encode(msg)).body[0].items[0]  # type: ignore[union-attr]
    assert item.data == "a\ufffdb\ufffdc"


# --- Microsoft-style wire vectors -> expected messages ---------------------------------------

INTUNE_STYLE = b"""<?xml version="1.0" encoding="utf-8"?>
<SyncML xmlns="SYNCML:SYNCML1.2">
  <SyncHdr>
    <VerDTD>1.2</VerDTD>
    <VerProto>DM/1.2</VerProto>
    <SessionID>1A</SessionID>
    <MsgID>1</MsgID>
    <Target>
      <LocURI>8B2A9C1E-0D5F-4E1B-9A77-3C4D5E6F7081</LocURI>
    </Target>
    <Source>
      <LocURI>https://r.manage.microsoft.com/devicegatewayproxy/cimhandler.ashx</LocURI>
    </Source>
    <Meta>
      <MaxMsgSize xmlns="syncml:metinf">524288</MaxMsgSize>
    </Meta>
  </SyncHdr>
  <SyncBody>
    <Status>
      <CmdID>1</CmdID>
      <MsgRef>1</MsgRef>
      <CmdRef>0</CmdRef>
      <Cmd>SyncHdr</Cmd>
      <Data>200</Data>
    </Status>
    <Get>
      <CmdID>3f2504e0-4f89-11d3-9a0c-0305e82c3301</CmdID>
      <Item>
        <Target>
          <LocURI>
            ./Vendor/MSFT/NodeCache/MS%20DM%20Server/CacheVersion
          </LocURI>
        </Target>
      </Item>
    </Get>
    <Add>
      <CmdID>7</CmdID>
      <Item>
        <Target><LocURI>./Vendor/MSFT/Policy/Config/X</LocURI></Target>
        <Meta><Format xmlns="syncml:metinf">chr</Format></Meta>
        <Data>&lt;enabled/&gt;&lt;data id="a" value="1 &amp; 2"/&gt;</Data>
      </Item>
    </Add>
    <Final />
  </SyncBody>
</SyncML>
"""

SEED_001_ATOMIC = f"""<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><VerDTD>1.2</VerDTD>
<VerProto>DM/1.2</VerProto><SessionID>1</SessionID><MsgID>2</MsgID>
<Target><LocURI>dev</LocURI></Target><Source><LocURI>https://s</LocURI></Source></SyncHdr>
<SyncBody>
<Atomic>
      <CmdID>19</CmdID>
      <Replace>
        <CmdID>3</CmdID>
        <Item>
          <Target>
            <LocURI>{SCEP}/Install/ServerURL</LocURI>
          </Target>
          <Data>https://joyndes-blueear.msappproxy.net/certsrv/mscep/mscep.dll/</Data>
        </Item>
      </Replace>
      <Replace>
        <CmdID>4</CmdID>
        <Item>
          <Target>
            <LocURI>{SCEP}/Install/Challenge</LocURI>
          </Target>
          <Data>PENlcnRFbnJvbGxUb2tlbj48RGF0YT48Q2VydEVucm9sbENoYWxsZW5nZT5NSUlOQVFZ</Data>
        </Item>
      </Replace>
      <Replace>
        <CmdID>7</CmdID>
        <Item>
          <Target>
            <LocURI>{SCEP}/Install/SubjectName</LocURI>
          </Target>
          <Data>CN=joymalya</Data>
        </Item>
      </Replace>
      <Exec>
        <CmdID>18</CmdID>
        <Item>
          <Target>
            <LocURI>{SCEP}/Install/Enroll</LocURI>
          </Target>
        </Item>
      </Exec>
  </Atomic>
<Final/></SyncBody></SyncML>""".encode()

XML_DATA = b"""<SyncML xmlns='SYNCML:SYNCML1.2'><SyncHdr><SessionID>2</SessionID><MsgID>4</MsgID>
<Target><LocURI>d</LocURI></Target><Source><LocURI>s</LocURI></Source></SyncHdr><SyncBody>
<Replace><CmdID>1</CmdID><Item><Target><LocURI>./x</LocURI></Target>
<Meta><Format xmlns="syncml:metinf">xml</Format></Meta>
<Data><wap-provisioningdoc version="1.1"><characteristic type="A"><parm name="p" value="v"/>
</characteristic></wap-provisioningdoc></Data></Item></Replace>
<Replace><CmdID>2</CmdID><Item><Target><LocURI>./y</LocURI></Target>
<Data><![CDATA[<raw>&</raw>]]></Data></Item></Replace>
</SyncBody></SyncML>"""

WIRE_VECTORS: dict[str, tuple[bytes, SyncMLMessage]] = {
    "intune-style indented": (INTUNE_STYLE, SyncMLMessage(
        SyncHdr("1A", "1", "8B2A9C1E-0D5F-4E1B-9A77-3C4D5E6F7081",
                "https://r.manage.microsoft.com/devicegatewayproxy/cimhandler.ashx",
                meta=Meta(max_msg_size=524288)),
        (Status("1", "1", "0", "SyncHdr", 200),
         ItemCommand(Cmd.GET, "3f2504e0-4f89-11d3-9a0c-0305e82c3301", (Item(
             target="./Vendor/MSFT/NodeCache/MS%20DM%20Server/CacheVersion"),)),
         ItemCommand(Cmd.ADD, "7", (Item(
             target="./Vendor/MSFT/Policy/Config/X", meta=Meta(format="chr"),
             data='<enabled/><data id="a" value="1 & 2"/>'),))))),
    "seed 001 SCEP atomic": (SEED_001_ATOMIC, SyncMLMessage(
        SyncHdr("1", "2", "dev", "https://s"),
        (Container(Cmd.ATOMIC, "19", (
            ItemCommand(Cmd.REPLACE, "3", (Item(
                target=f"{SCEP}/Install/ServerURL",
                data="https://joyndes-blueear.msappproxy.net/certsrv/mscep/mscep.dll/"),)),
            ItemCommand(Cmd.REPLACE, "4", (Item(
                target=f"{SCEP}/Install/Challenge",
                data="PENlcnRFbnJvbGxUb2tlbj48RGF0YT48Q2VydEVucm9sbENoYWxsZW5nZT5NSUlOQVFZ"),)),
            ItemCommand(Cmd.REPLACE, "7", (Item(target=f"{SCEP}/Install/SubjectName",
                                                data="CN=joymalya"),)),
            ItemCommand(Cmd.EXEC, "18", (Item(target=f"{SCEP}/Install/Enroll"),)),
        )),))),
    "xml markup data and cdata": (XML_DATA, SyncMLMessage(
        SyncHdr("2", "4", "d", "s", ver_dtd="", ver_proto=""),
        (ItemCommand(Cmd.REPLACE, "1", (Item(
            target="./x", meta=Meta(format="xml"), data_is_xml=True,
            data='<wap-provisioningdoc version="1.1"><characteristic type="A">'
                 '<parm name="p" value="v"/>\n</characteristic></wap-provisioningdoc>'),)),
         ItemCommand(Cmd.REPLACE, "2", (Item(target="./y", data="<raw>&</raw>"),))),
        final=False)),
}


@pytest.mark.parametrize("wire,expected", WIRE_VECTORS.values(), ids=WIRE_VECTORS.keys())
def test_wire_vector(wire: bytes, expected: SyncMLMessage) -> None:
    msg = codec.decode(wire)
    assert msg == expected
    assert codec.decode(codec.encode(msg)) == msg


def test_meta_children_without_metinf_namespace_and_metinf_wrapper() -> None:
    wire = (b'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><SessionID>1</SessionID><MsgID>1</MsgID>'
            b"<Target><LocURI>d</LocURI></Target><Source><LocURI>s</LocURI></Source>"
            b"<Meta><MaxMsgSize>1000</MaxMsgSize></Meta></SyncHdr><SyncBody>"
            b"<Add><CmdID>1</CmdID><Meta><MetInf xmlns='syncml:metinf'><Format>int</Format>"
            b"<Size>2</Size></MetInf></Meta><Item><Target><LocURI>./a</LocURI></Target>"
            b"<Data>12</Data></Item></Add></SyncBody></SyncML>")
    msg = codec.decode(wire)
    assert msg.header.meta == Meta(max_msg_size=1000)
    assert msg.body[0].meta == Meta(format="int", size=2)  # type: ignore[union-attr]


# --- hostile and malformed input -------------------------------------------------------------

def _doc(body: bytes) -> bytes:
    return (b'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr><SessionID>1</SessionID><MsgID>1</MsgID>'
            b"<Target><LocURI>d</LocURI></Target><Source><LocURI>s</LocURI></Source></SyncHdr>"
            b"<SyncBody>" + body + b"</SyncBody></SyncML>")


BILLION_LAUGHS = (b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
                  + b"".join(b'<!ENTITY lol%d "%s">' % (i, (b"&lol%d;" % (i - 1) if i > 1
                                                           else b"&lol;") * 10)
                             for i in range(1, 10))
                  + b"]>" + _doc(b"<Alert><CmdID>1</CmdID><Data>&lol9;</Data></Alert>"))
XXE = (b'<?xml version="1.0"?><!DOCTYPE SyncML [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
       + _doc(b"<Alert><CmdID>1</CmdID><Data>&xxe;</Data></Alert>"))
XXE_PARAM = (b'<!DOCTYPE SyncML [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x.dtd"> %p;]>'
             + _doc(b""))

HOSTILE: dict[str, tuple[bytes, str]] = {
    "billion laughs": (BILLION_LAUGHS, "DOCTYPE is not allowed"),
    "external entity": (XXE, "DOCTYPE is not allowed"),
    "external parameter entity": (XXE_PARAM, "DOCTYPE is not allowed"),
    "doctype after comment": (b"<!-- x --><!DOCTYPE a>" + _doc(b""), "DOCTYPE is not allowed"),
    "undeclared entity": (_doc(b"<Alert><CmdID>1</CmdID><Data>&xxe;</Data></Alert>"),
                          "Entity 'xxe' not defined"),
    "50 MB body": (b"", "exceeds the limit of"),  # built in the test, not kept around
    "deep nesting": (_doc(b"<X>" * 5000 + b"</X>" * 5000), "Excessive depth"),
    "invalid UTF-8": (_doc(b"<Alert><CmdID>1</CmdID><Data>\xff\xfe</Data></Alert>"),
                      "not UTF-8: invalid byte 0xFF"),
    "UTF-16 document": ('<?xml version="1.0" encoding="UTF-16"?>'.encode("utf-16") +
                        _doc(b"").decode().encode("utf-16-le"), "not UTF-8"),
    "latin-1 declared": (b'<?xml version="1.0" encoding="ISO-8859-1"?>'
                         + _doc(b"<Alert><CmdID>1</CmdID><Data>\xe9</Data></Alert>"),
                         "not UTF-8"),
    "missing SyncHdr": (b'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncBody/></SyncML>',
                        "<SyncHdr> is missing"),
    "two SyncHdr": (b'<SyncML xmlns="SYNCML:SYNCML1.2"><SyncHdr/><SyncHdr/></SyncML>',
                    "more than one <SyncHdr>"),
    "missing SessionID": (_doc(b"").replace(b"<SessionID>1</SessionID>", b""),
                          "no <SessionID>"),
    "missing MsgID": (_doc(b"").replace(b"<MsgID>1</MsgID>", b""), "no <MsgID>"),
    "missing Source": (_doc(b"").replace(b"<Source><LocURI>s</LocURI></Source>", b""),
                       "no <Source><LocURI>"),
    "wrong namespace": (_doc(b"").replace(b"SYNCML:SYNCML1.2", b"SYNCML:SYNCML1.1"),
                        "must be in namespace SYNCML:SYNCML1.2, found SYNCML:SYNCML1.1"),
    "no namespace": (_doc(b"").replace(b' xmlns="SYNCML:SYNCML1.2"', b""),
                     "found (none)"),
    "not SyncML": (b"<html><body>Sign in</body></html>", "root element is <html>"),
    "empty": (b"", "empty message"),
    "truncated": (_doc(b"<Get><CmdID>1</CmdID>")[:-30], "malformed XML"),
    "status code not a number": (_doc(b"<Status><CmdID>1</CmdID><Data>OK</Data></Status>"),
                                 "<Status/Data> must be a non-negative decimal"),
    "status without code": (_doc(b"<Status><CmdID>1</CmdID></Status>"), "without a <Data>"),
    "size with underscore": (_doc(b"<Add><CmdID>1</CmdID><Meta><Size>1_0</Size></Meta></Add>"),
                             "<Meta/Size> must be a non-negative decimal"),
    "size negative": (_doc(b"<Add><CmdID>1</CmdID><Meta><Size>-1</Size></Meta></Add>"),
                      "non-negative decimal"),
    "size huge": (_doc(b"<Add><CmdID>1</CmdID><Meta><Size>" + b"9" * 5000
                       + b"</Size></Meta></Add>"), "non-negative decimal"),
    "element inside LocURI": (_doc(b"<Get><CmdID>1</CmdID><Item><Target><LocURI>a<b/></LocURI>"
                                   b"</Target></Item></Get>"),
                              "<Item/Target/LocURI> must hold text, found element <b>"),
    "atomic nested too deep": (_doc(b"<Atomic><CmdID>1</CmdID>" * 20
                                    + b"</Atomic>" * 20), "nested deeper than 16 levels"),
}


@pytest.mark.parametrize("wire,expect", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_input_fails_cleanly_and_fast(wire: bytes, expect: str) -> None:
    if not wire and "limit" in expect:
        wire = b"<SyncML>" + b" " * (50 * 1024 * 1024)
    start = time.perf_counter()
    with pytest.raises(SyncMLDecodeError) as info:
        codec.decode(wire)
    elapsed = time.perf_counter() - start
    assert expect in info.value.message
    assert info.value.message.startswith("invalid SyncML from the server: ")
    assert isinstance(info.value, PeerError)
    assert info.value.hresult == 0x86000018  # CFGMGR_E_XMLPARSEERROR
    assert elapsed < 0.2, f"{elapsed * 1000:.0f} ms"


def test_doctype_text_inside_data_is_fine() -> None:
    msg = codec.decode(_doc(b"<Replace><CmdID>1</CmdID><Item><Target><LocURI>./a</LocURI>"
                            b"</Target><Data>&lt;!DOCTYPE x&gt;</Data></Item></Replace>"))
    assert msg.body[0].items[0].data == "<!DOCTYPE x>"  # type: ignore[union-attr]


def test_size_limit_is_configurable() -> None:
    wire = _doc(b"")
    codec.decode(wire, DecodeLimits(max_bytes=len(wire)))
    with pytest.raises(SyncMLDecodeError, match=f"{len(wire)} bytes exceeds the limit of "
                                                f"{len(wire) - 1} bytes"):
        codec.decode(wire, DecodeLimits(max_bytes=len(wire) - 1))


def test_missing_body_is_an_empty_unfinished_message() -> None:
    wire = _doc(b"").replace(b"<SyncBody></SyncBody>", b"")
    assert codec.decode(wire) == SyncMLMessage(SyncHdr("1", "1", "d", "s", ver_dtd="",
                                                       ver_proto=""), (), final=False)
