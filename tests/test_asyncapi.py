"""docs/asyncapi.yaml is what scripts/gen_asyncapi.py makes of the protocol's code today, and the
real AsyncAPI parser (``@asyncapi/parser``, the version pinned in scripts/asyncapi/) accepts it.

The parser is installed with ``npm ci`` into build/asyncapi-parser/<hash of the lock file>, once
per lock file. Without node and npm the parser test skips, except in CI (``CI=true``), where it
fails: there it must run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from hearth.protocol import Reply, Request, topics
from hearth.protocol.pairing import PairingReply, PairingRequest

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "scripts" / "asyncapi"
DOC = ROOT / "docs" / "asyncapi.yaml"

sys.path.insert(0, str(ROOT / "scripts"))
import gen_asyncapi  # noqa: E402  (a script, not a package)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    built: dict[str, Any] = gen_asyncapi.build(gen_asyncapi.DOC.read_text(encoding="utf-8"))
    return built


def test_checked_in_document_is_what_the_generator_makes_now() -> None:
    assert DOC.read_text(encoding="utf-8") == gen_asyncapi.generate(), (
        "docs/asyncapi.yaml is stale: run scripts/gen_asyncapi.py and commit the result"
    )


def _tags(union: object) -> set[str]:
    return {gen_asyncapi.tag_of(cls) for cls in typing.get_args(union)}


def test_every_message_is_on_its_channel(document: dict[str, Any]) -> None:
    channels = document["channels"]
    assert set(channels["requests"]["messages"]) == _tags(Request)
    assert set(channels["replies"]["messages"]) == _tags(Reply)
    assert set(channels["status"]["messages"]) == {"status"}
    assert set(channels["notifications"]["messages"]) == {"notify"}
    assert set(channels["pairingRequests"]["messages"]) == _tags(PairingRequest)
    assert set(channels["pairingReplies"]["messages"]) == _tags(PairingReply)


def test_channel_addresses_are_the_topics_of_the_code(document: dict[str, Any]) -> None:
    def topic(address: str) -> str:
        return address.replace("{gateway}", "gw-1").replace("{client}", "dev-7")

    channels = document["channels"]
    assert topic(channels["requests"]["address"]) == topics.request_topic("gw-1", "dev-7")
    assert topic(channels["replies"]["address"]) == topics.reply_topic("dev-7")
    assert topic(channels["status"]["address"]) == topics.status_topic("gw-1")
    assert topic(channels["notifications"]["address"]) == topics.notify_topic("dev-7")


def test_every_request_is_answered_and_every_reply_answers_one(document: dict[str, Any]) -> None:
    handled, answered = set(), set()
    for operation in document["operations"].values():
        if operation["action"] != "receive":
            continue
        handled |= {ref["$ref"].rsplit("/", 1)[1] for ref in operation["messages"]}
        answered |= {ref["$ref"].rsplit("/", 1)[1] for ref in operation["reply"]["messages"]}
    assert handled == _tags(Request) | _tags(PairingRequest)
    assert answered == _tags(Reply) | _tags(PairingReply)


def test_requests_carry_the_mqtt5_request_properties(document: dict[str, Any]) -> None:
    for tag in _tags(Request):
        mqtt = document["components"]["messages"][tag]["bindings"]["mqtt"]
        assert mqtt["contentType"] == "application/vnd.hearth.v1+msgpack"
        assert mqtt["responseTopic"]["pattern"] == "^hearth/v1/dev/[A-Za-z0-9_.-]{1,64}/"
        assert mqtt["correlationData"]["minLength"] == 1


def test_binary_fields_are_msgpack_bin_not_base64() -> None:
    text = DOC.read_text(encoding="utf-8")
    assert "contentEncoding" not in text
    assert 'x-msgpack-type: "bin"' in text


# --- the real parser ------------------------------------------------------------------------


def _parser_dir() -> Path:
    """build/asyncapi-parser/<lock hash> with node_modules installed by ``npm ci``."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node and npm are needed in CI to validate docs/asyncapi.yaml")
        pytest.skip("node and npm not installed")
    lock = (PINS / "package-lock.json").read_bytes()
    target = ROOT / "build" / "asyncapi-parser" / hashlib.sha256(lock).hexdigest()[:16]
    stamp = target / ".installed"
    if not stamp.exists():
        target.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copyfile(PINS / name, target / name)
        # --ignore-scripts: nothing the packages ship runs at install time.
        subprocess.run(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=target,
            check=True,
            timeout=600,
        )
        stamp.touch()
    shutil.copyfile(PINS / "validate.mjs", target / "validate.mjs")
    return target


def test_document_parses_with_the_real_asyncapi_parser(
    tmp_path: Path, document: dict[str, Any]
) -> None:
    parser = _parser_dir()
    dump = tmp_path / "parsed.json"
    run = subprocess.run(
        ["node", "validate.mjs", str(DOC), "--dump", str(dump)],
        cwd=parser,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "valid: AsyncAPI 3.0.0" in run.stdout
    # No warnings either (the one "Information" line suggests a newer AsyncAPI version).
    assert not [line for line in run.stdout.splitlines() if line.startswith("Warning")]
    # The hand-written YAML reads back (js-yaml) as exactly the document the generator built.
    assert json.loads(dump.read_text()) == json.loads(json.dumps(document))


def test_the_parser_refuses_a_broken_document(tmp_path: Path) -> None:
    """The validation has teeth: a wrong operation action is an error."""
    parser = _parser_dir()
    broken = tmp_path / "broken.yaml"
    broken.write_text(DOC.read_text(encoding="utf-8").replace('"receive"', '"recieve"', 1))
    run = subprocess.run(
        ["node", "validate.mjs", str(broken)],
        cwd=parser,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 1
    assert '"action" property must be equal to one of the allowed values' in run.stdout
