"""docs/protocol.md and the code that implements protocol v1 say the same thing.

Pure: reads the document and the code, no network. The document's layout these tests rely on:
one heading per message containing its tag in backticks (e.g. ``#### `wasm` — WasmJob``), with a
field table whose first cell is the field name in backticks and whose third cell says
``required`` or gives the default (nested maps: a heading containing the struct's name in
backticks, e.g. ``#### `Trigger` — nested map``; the same for the result struct of each vision
capability and the structs inside those, e.g. ``#### `FacesResult` — result of vision.faces``);
tables whose first cell is a backticked key for error codes, topics, TXT keys, dtypes, policy
limits, task states and capabilities; one parameter table per capability under a heading
containing its name in backticks (third cell: the default, as JSON in backticks);
```` ```hex ```` blocks for the worked example.
"""

from __future__ import annotations

import ast
import re
import typing
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from hearth.errors import ErrorCode
from hearth.protocol import (
    CONTENT_TYPE,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    GatewayStatus,
    Notification,
    Reply,
    Request,
    TaskInfo,
    Tensor,
    TensorInfo,
    Timing,
    Trigger,
    WasmExport,
    WasmImport,
    decode_reply,
    decode_request,
    encode,
    messages,
    notify_topic,
    reply_prefix,
    reply_topic,
    request_filter,
    request_topic,
    status_topic,
    vision,
)
from hearth.protocol.pairing import pair_reply_topic, pair_request_filter, pair_request_topic
from hearth.runtime.onnx import _ORT_TO_DTYPE
from hearth_gateway import vision as gateway_vision
from hearth_gateway.config import Config
from hearth_gateway.policy import Policy

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "protocol.md"
DAEMON = REPO / "gateway" / "src" / "hearth_gateway" / "daemon.py"

TAGGED: tuple[type[msgspec.Struct], ...] = (
    *typing.get_args(Request),
    *typing.get_args(Reply),
    GatewayStatus,
    Notification,
)
NESTED: tuple[type[msgspec.Struct], ...] = (
    Tensor,
    Timing,
    Trigger,
    TaskInfo,
    TensorInfo,
    WasmImport,
    WasmExport,
    vision.Image,
    vision.Preprocess,
    vision.Postprocess,
    vision.PipelineResult,
    vision.Classification,
    vision.Box,
    messages.Requirements,
    messages.AppUsage,
)
# The typed ``result`` of each capability (``call_result.result`` is a plain map, so these are
# not reachable from TAGGED), and the structs inside them that are no nested map of a message.
RESULTS: tuple[type[msgspec.Struct], ...] = tuple(vision.CAPABILITIES.values())
RESULT_PARTS: tuple[type[msgspec.Struct], ...] = (vision.Keypoint, vision.PlateText)
# Each capability's parameters: (module, struct) in the gateway. Imported in the test (OpenCV).
PARAMS = {
    "vision.faces": ("hearth_gateway.vision.faces", "FacesParams"),
    "vision.motion": ("hearth_gateway.vision.motion", "MotionParams"),
    "vision.features": ("hearth_gateway.vision.features", "FeaturesParams"),
    "vision.plate": ("hearth_gateway.vision.plate", "PlateParams"),
    "vision.odometry": ("hearth_gateway.vision.odometry", "OdometryParams"),
}
# The tags the brief for this document names; a new message type must be added here and there.
EXPECTED_TAGS = {
    "ping",
    "wasm",
    "onnx",
    "call",
    "pipeline",
    "session_close",
    "blob",
    "task_install",
    "task_control",
    "task_list",
    "pong",
    "wasm_result",
    "onnx_result",
    "call_result",
    "pipeline_result",
    "frame_dropped",
    "session_closed",
    "need_blob",
    "blob_stored",
    "error",
    "accepted",
    "task",
    "task_list_result",
    "run_start",
    "run_resume",
    "run_control",
    "run_result",
    "run_moved",
    "run_checkpoint",
    "run_chunk",
    "run_round",
    "run_ack",
    "describe",
    "described",
    "status",
    "notify",
    "usage",
    "usage_result",
}


# --- parsing the document ---------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    level: int
    title: str
    body: str


def _sections(text: str) -> list[Section]:
    """Every heading with the text up to the next heading of the same or a higher level.
    Lines inside ``` fences are never headings."""
    lines = text.splitlines()
    heads: list[tuple[int, int, str]] = []  # (line index, level, title)
    fenced = False
    for index, line in enumerate(lines):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"^(#{1,6})\s+(.*?)\s*$", line)
        if match:
            heads.append((index, len(match.group(1)), match.group(2)))
    sections = []
    for pos, (index, level, title) in enumerate(heads):
        end = len(lines)
        for later_index, later_level, _ in heads[pos + 1 :]:
            if later_level <= level:
                end = later_index
                break
        sections.append(Section(level, title, "\n".join(lines[index + 1 : end])))
    return sections


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def sections(doc: str) -> list[Section]:
    return _sections(doc)


def _section(
    sections: list[Section], *, backticked: str | None = None, title: str | None = None
) -> Section:
    if backticked is not None:
        found = [s for s in sections if f"`{backticked}`" in s.title]
        what = f"a heading containing `{backticked}`"
    else:
        assert title is not None
        found = [s for s in sections if title.lower() in s.title.lower()]
        what = f"a heading containing {title!r}"
    assert len(found) == 1, f"docs/protocol.md needs exactly one {what}, found {len(found)}"
    return found[0]


def _rows(body: str) -> list[list[str]]:
    """Cells of every table row (separator rows left out)."""
    rows = []
    for raw in body.splitlines():
        line = raw.strip()
        if not line.startswith("|"):
            continue
        cells = [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip("|"))]
        if all(re.fullmatch(r":?-{3,}:?", cell) for cell in cells):
            continue
        rows.append(cells)
    return rows


def _keyed_rows(body: str) -> dict[str, list[str]]:
    """Table rows whose first cell is one backticked name, by that name."""
    keyed: dict[str, list[str]] = {}
    for cells in _rows(body):
        match = re.fullmatch(r"`([^`]+)`", cells[0])
        if match:
            assert match.group(1) not in keyed, f"row `{match.group(1)}` appears twice"
            keyed[match.group(1)] = cells
    return keyed


def _backticked(body: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", body))


# --- messages ---------------------------------------------------------------------------------


def test_every_message_type_is_covered() -> None:
    tags = {cls.__struct_config__.tag for cls in TAGGED}
    assert tags == EXPECTED_TAGS


def _walk(node: object, found: set[type]) -> None:
    """Every Struct class reachable from a msgspec.inspect type description."""
    if isinstance(node, msgspec.inspect.StructType):
        if node.cls in found:
            return
        found.add(node.cls)
    if isinstance(node, msgspec.inspect.Field):
        _walk(node.type, found)
        return
    if isinstance(node, tuple | list):
        for item in node:
            _walk(item, found)
        return
    if isinstance(node, msgspec.inspect.Type):
        for field in msgspec.structs.fields(node):
            _walk(getattr(node, field.name), found)


def test_every_nested_map_is_covered() -> None:
    """A struct inside a message without a ``type`` key of its own is a nested map (§5.4)."""
    found: set[type] = set()
    for cls in TAGGED:
        _walk(msgspec.inspect.type_info(cls), found)
    assert found - set(TAGGED) == set(NESTED)


def test_every_result_struct_is_covered() -> None:
    """Every struct inside a capability's result is a result, a nested map or a result part."""
    found: set[type] = set()
    for cls in RESULTS:
        _walk(msgspec.inspect.type_info(cls), found)
    assert found - set(RESULTS) - set(NESTED) == set(RESULT_PARTS)


@pytest.mark.parametrize("cls", TAGGED + NESTED + RESULTS + RESULT_PARTS, ids=lambda c: c.__name__)
def test_message_section_lists_every_field(
    cls: type[msgspec.Struct], sections: list[Section]
) -> None:
    config = cls.__struct_config__
    tag = None if config.tag is None else str(config.tag)
    section = _section(sections, backticked=tag if tag is not None else cls.__name__)
    rows = _keyed_rows(section.body)
    fields = msgspec.structs.fields(cls)
    expected = {f.encode_name for f in fields}
    if tag is not None and config.tag_field is not None:
        expected.add(config.tag_field)
    missing = expected - set(rows)
    extra = set(rows) - expected
    assert not missing, f"{cls.__name__}: fields missing from its table in the doc: {missing}"
    assert not extra, f"{cls.__name__}: doc rows that are no field of the struct: {extra}"
    for field in fields:
        required_cell = rows[field.encode_name][2].lower()
        if field.required:
            assert required_cell == "required", f"{cls.__name__}.{field.name} is required"
        else:
            assert required_cell != "required", f"{cls.__name__}.{field.name} has a default"
    if tag is not None:
        assert rows["type"][2].lower() == "required"
        assert f'`"{tag}"`' in rows["type"][3], f"{cls.__name__}: the type row names the tag"


def _literal_fields() -> list[object]:
    """(struct, field, values) of every documented field whose type is a Literal of str."""
    params = []
    for cls in TAGGED + NESTED + RESULTS + RESULT_PARTS:
        for field in msgspec.inspect.type_info(cls).fields:
            kind = field.type
            if isinstance(kind, msgspec.inspect.LiteralType) and field.name != "dtype":
                values = tuple(map(str, kind.values))
                name = field.encode_name
                params.append(pytest.param(cls, name, values, id=f"{cls.__name__}.{name}"))
    return params


@pytest.mark.parametrize(("cls", "name", "values"), _literal_fields())
def test_enum_fields_list_every_value(
    cls: type[msgspec.Struct], name: str, values: tuple[str, ...], sections: list[Section]
) -> None:
    """An enum field's row names each of its values, quoted (``dtype`` has its own table)."""
    tag = cls.__struct_config__.tag
    section = _section(sections, backticked=str(tag) if tag is not None else cls.__name__)
    meaning = _keyed_rows(section.body)[name][3]
    named = set(re.findall(r'`"([^"`]+)"`', meaning))
    assert named == set(values), f"{cls.__name__}.{name}: the doc names {named}"


def test_dtype_table_matches(sections: list[Section]) -> None:
    section = _section(sections, title="ONNX jobs")
    documented = {
        name: (cells[1].strip("`"), int(cells[2].split()[0]))
        for name, cells in _keyed_rows(section.body).items()
        if cells[1].startswith("`tensor(")
    }
    assert set(documented) == set(typing.get_args(messages.Dtype))
    assert {ort: name for name, (ort, _) in documented.items()} == _ORT_TO_DTYPE
    np = pytest.importorskip("numpy")
    for name, (_, itemsize) in documented.items():
        assert np.dtype(name).itemsize == itemsize, f"itemsize of {name}"


# --- vision capabilities ----------------------------------------------------------------------


def test_result_sections_name_their_capability(sections: list[Section]) -> None:
    for capability, cls in vision.CAPABILITIES.items():
        title = _section(sections, backticked=cls.__name__).title
        assert capability in title, f"the heading of `{cls.__name__}` names {capability}"


def test_capability_table_matches(sections: list[Section]) -> None:
    """One row per capability: its version, its result struct, and the stream or session that
    a stateful one needs."""
    name = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*){1,3}")
    rows = {
        key: cells
        for key, cells in _keyed_rows(_section(sections, title="Capability calls").body).items()
        if name.fullmatch(key)  # not the error codes of the failures table
    }
    assert set(rows) == set(vision.CAPABILITIES) == set(gateway_vision.CAPABILITIES)
    for capability, cells in rows.items():
        assert cells[1] == f"`{gateway_vision.CAPABILITIES[capability]}`", f"{capability} version"
        assert cells[2] == f"`{vision.CAPABILITIES[capability].__name__}`", f"{capability} result"
        needs = cells[3]
        assert (needs != "") == (capability in gateway_vision.STATEFUL), f"{capability} needs"
        assert needs in {"", "`stream`", "`session`"}


def test_every_capability_has_a_parameter_table() -> None:
    assert set(PARAMS) == set(vision.CAPABILITIES)


@pytest.mark.parametrize("capability", sorted(PARAMS))
def test_capability_parameters_are_documented(capability: str, sections: list[Section]) -> None:
    """The parameter table under the capability's heading: every parameter, with its default."""
    module_name, struct_name = PARAMS[capability]
    cls = getattr(pytest.importorskip(module_name), struct_name)
    rows = _keyed_rows(_section(sections, backticked=capability).body)
    fields = {f.encode_name: f for f in msgspec.structs.fields(cls)}
    assert set(rows) == set(fields), f"{capability}: parameters in the doc"
    for name, field in fields.items():
        assert not field.required, f"{capability}.{name}: every parameter has a default"
        factory = field.default_factory
        default = field.default if factory is msgspec.NODEFAULT else factory()
        expected = f"`{msgspec.json.encode(default).decode()}`"
        assert rows[name][2] == expected, f"{capability}.{name}: default {expected}"


# --- error codes ------------------------------------------------------------------------------


def test_error_table_matches_error_codes(sections: list[Section]) -> None:
    rows = _keyed_rows(_section(sections, title="Error codes").body)
    assert set(rows) == {code.value for code in ErrorCode}
    for code in ErrorCode:
        retryable = rows[code.value][1].lower()
        assert retryable in {"yes", "no"}, f"retryable column of `{code}`: {retryable!r}"
        assert (retryable == "yes") == code.retryable, f"`{code}`: retryable is {code.retryable}"


def test_error_codes_named_elsewhere_exist(doc: str) -> None:
    """Every backticked snake_case word in a 'Code' column of any table is a real ErrorCode."""
    codes = {code.value for code in ErrorCode}
    tables = 0
    for section in _sections(doc):
        lines = section.body.splitlines()
        for index, line in enumerate(lines):
            if re.match(r"^\s*\|\s*Code\s*\|", line):
                tables += 1
                for row in _rows("\n".join(lines[index + 1 :]).split("\n\n")[0]):
                    name = row[0].strip("`")
                    assert name in codes, f"{section.title}: {name!r} is no ErrorCode"
    assert tables >= 4  # blob upload, wasm, onnx, the error code table itself


# --- constants ---------------------------------------------------------------------------------


def test_content_type_and_version(doc: str) -> None:
    glance = {cells[0]: cells[1] for cells in _rows(doc.split("\n## ", 1)[0])}
    assert glance["Content Type"] == f"`{CONTENT_TYPE}`"
    assert glance["Protocol version (`v`)"] == f"`{PROTOCOL_VERSION}`"
    assert set(re.findall(r"application/vnd\.hearth[^\s`]*", doc)) == {CONTENT_TYPE}


# --- topics -----------------------------------------------------------------------------------

GATEWAY, CLIENT = "gw-1.kitchen", "dev_7"


def _fill(template: str) -> str:
    return template.replace("{gateway}", GATEWAY).replace("{client}", CLIENT)


def test_topic_templates_match_topic_functions(sections: list[Section]) -> None:
    templates = set(_keyed_rows(_section(sections, title="Topics").body))
    outputs = {
        status_topic(GATEWAY),
        request_topic(GATEWAY, CLIENT),
        request_filter(GATEWAY),
        reply_prefix(CLIENT),
        reply_topic(CLIENT),
        notify_topic(CLIENT),
    }
    assert {_fill(t) for t in templates} == outputs
    assert notify_topic(CLIENT).startswith(reply_prefix(CLIENT)), "§15.5: under the prefix"


def test_topics_used_elsewhere_are_real(doc: str) -> None:
    """Every concrete topic or template written anywhere (``hearth/v1/...``) is one of the
    topic layout's, filled with any ids."""
    ids = r"[A-Za-z0-9_.-]{1,64}"
    # {connection}: a pairing connection's MQTT Client Identifier (§16).
    gateway, client = f"(?:{ids}|{{gateway}}|\\+)", f"(?:{ids}|{{client}}|{{connection}})"
    layout = (
        status_topic("GGG"),
        request_topic("GGG", "CCC"),
        request_filter("GGG"),
        reply_prefix("CCC"),
        reply_topic("CCC"),
        notify_topic("CCC"),
        pair_request_topic("CCC"),
        pair_reply_topic("CCC"),
        pair_request_filter(),
    )
    patterns = [re.escape(t).replace("GGG", gateway).replace("CCC", client) for t in layout]
    for found in re.findall(r"hearth/v\d+/[^\s`)\"',]*", doc):
        if found.endswith("…") and found.count("/") <= 2:
            continue  # "hearth/v1/…", "hearth/v2/…" in prose about versions
        # A trailing "." ends a sentence; "/#" is a device's subscription to its reply topics.
        topic = found.rstrip(".").removesuffix("#")
        assert any(re.fullmatch(p, topic) for p in patterns), f"unknown topic {topic!r} in doc"


# --- discovery --------------------------------------------------------------------------------


def _txt_keys() -> set[str]:
    tree = ast.parse(DAEMON.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_txt":
            for ret in ast.walk(node):
                if isinstance(ret, ast.Return) and isinstance(ret.value, ast.Dict):
                    keys = {
                        k.value
                        for k in ret.value.keys
                        if isinstance(k, ast.Constant) and isinstance(k.value, str)
                    }
                    if keys:
                        return keys
    raise AssertionError("daemon.py: no _txt() returning a dict literal")


def test_mdns_service_type_and_txt_keys(sections: list[Section]) -> None:
    section = _section(sections, title="Discovery")
    assert f"`{SERVICE_TYPE}`" in section.body
    assert set(_keyed_rows(section.body)) == _txt_keys()


def test_runners_are_the_default_ones(sections: list[Section]) -> None:
    """The status field and the TXT key name every runner a gateway enables by default."""
    runners = Config().runners
    status = _keyed_rows(_section(sections, backticked="status").body)["runners"][3]
    assert set(re.findall(r'`"([^"`]+)"`', status)) == set(runners)
    txt = _keyed_rows(_section(sections, title="Discovery").body)["runners"][1]
    assert f"`{','.join(runners)}`" in txt


# --- persistent tasks -------------------------------------------------------------------------


def test_task_states_table_matches(sections: list[Section]) -> None:
    rows = _keyed_rows(_section(sections, title="Lifecycle").body)
    [state] = [f for f in msgspec.structs.fields(TaskInfo) if f.name == "state"]
    assert set(rows) == set(typing.get_args(state.type))


# Exports and imports of the guest ABI (docs/tasks.md, another document's contract) that are no
# field of a message here.
ABI_NAMES = {"_initialize", "hearth_alloc", "hearth_on_event", "kv_get", "kv_set", "now_ms"}


def test_task_abi_is_linked_not_duplicated(doc: str, sections: list[Section]) -> None:
    """The guest ABI lives in docs/tasks.md: this document links to it and has no table of it."""
    assert "](tasks.md)" in _section(sections, title="Persistent tasks").body
    assert (DOC.parent / "tasks.md").exists()
    rows = _rows(doc)
    tabled = {cells[0].strip("`") for cells in rows} & ABI_NAMES
    assert not tabled, f"ABI names with a table row of their own here: {tabled}"
    signatures = [cells for cells in rows if re.search(r"\bi(32|64)\b", " ".join(cells))]
    assert not signatures, f"wasm signatures belong in docs/tasks.md: {signatures}"


# --- limits -----------------------------------------------------------------------------------


def test_limits_table_matches_policy_defaults(sections: list[Section]) -> None:
    rows = _keyed_rows(_section(sections, title="Limits").body)
    defaults = msgspec.to_builtins(Policy())
    expected = {
        f"{table}.{key}": value
        for table, values in defaults.items()
        for key, value in values.items()
        # quotas: no numbers by default (§20 and docs/quotas.md describe them); topic trees
        # (tasks.home_*) are not limits (docs/home.md).
        if table != "quotas" and not isinstance(value, list)
    }
    assert set(rows) == set(expected)
    for key, value in expected.items():
        number = re.match(r"\s*(\d[\d_]*(?:\.\d+)?)", rows[key][1])
        assert number, f"limit `{key}`: no number in {rows[key][1]!r}"
        assert float(number.group(1).replace("_", "")) == float(value), f"limit `{key}`"


def test_need_blob_default_chunk_is_the_policy_default(doc: str) -> None:
    chunk = Policy().limits.max_chunk_bytes
    assert f'"max_chunk": {chunk}' in doc


# --- worked example ---------------------------------------------------------------------------


def test_worked_example_bytes_are_exact(doc: str) -> None:
    blocks = re.findall(r"```hex\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 2, "the worked example has a request and a reply in ```hex blocks"
    request_bytes, reply_bytes = (bytes.fromhex("".join(b.split())) for b in blocks)
    request = decode_request(request_bytes)
    reply = decode_reply(reply_bytes)
    assert encode(request) == request_bytes
    assert encode(reply) == reply_bytes
    assert getattr(reply, "job_id", None) == getattr(request, "job_id", object())
    assert f"Payload, {len(request_bytes)} bytes" in doc
    assert f"Payload, {len(reply_bytes)} bytes" in doc
