"""Field rules: dropping and pseudonymising personal data while streaming, exact for everything kept."""

import collections
import datetime as dt
import hashlib
import hmac
import json
import re

import pytest

import field_rules
from amplitude_standin import EVENT_TYPES
from errors import UsageError
from field_rules import FieldRules, Pseudonymiser, RuleError, rules_from
from settings import parse_settings
from tests.conftest import API_KEY, hour

KEY = "k" * 20 + "-a-secret-of-32+chars"
NOW = dt.datetime(2025, 11, 7, 3, 30, tzinfo=dt.UTC)
DAY = ("--date", "2025-11-01")


def pseudonym(text: str | bytes) -> str:
    return hmac.new(KEY.encode(), text if isinstance(text, bytes) else text.encode(), hashlib.sha256).hexdigest()


def rules(dropped=(), hashed=()) -> Pseudonymiser:
    return Pseudonymiser(FieldRules(tuple(dropped), tuple(hashed), KEY.encode()))


# Settings


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--drop-fields", ""], {}, "--drop-fields: the value is empty"),
        (["--drop-fields", ","], {}, "--drop-fields: an empty field path in ','"),
        (["--drop-fields", "ip_address,,city"], {}, "--drop-fields: an empty field path"),
        (["--hash-fields", "user_properties..email"], {"AMP_HASH_KEY": KEY}, "'user_properties..email' has an empty part"),
        ([], {"AMP_DROP_FIELDS": ".email"}, "AMP_DROP_FIELDS: '.email' has an empty part"),
        (["--drop-fields", "a."], {}, "has an empty part"),
        (["--drop-fields", "city,user_id", "--hash-fields", "user_id"], {"AMP_HASH_KEY": KEY},
         "user_id: a field is either dropped or hashed, not both"),
        (["--hash-fields", "user_id"], {}, "--hash-fields needs AMP_HASH_KEY (in .env or the environment, never a flag)"),
        (["--hash-fields", "user_id"], {"AMP_HASH_KEY": "short"}, "AMP_HASH_KEY must be at least 32 characters (it has 5)"),
        (["--hash-key", KEY], {}, "unrecognized arguments: --hash-key"),
        (["--drop-fields", "user_properties. email"], {}, "'user_properties. email' has spaces around a dot"),
        (["--drop-fields", "user_properties .email"], {}, "has spaces around a dot"),
        (["--drop-fields", "a\\b"], {}, "a backslash stands before a dot or a backslash only"),
        (["--drop-fields", "a\\"], {}, "ends in a backslash"),
    ],
)
def test_bad_field_settings_are_usage_errors(argv, env, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        parse_settings(argv, {"AMP_API_KEY": "k", "AMP_SECRET_KEY": "s", **env}, NOW)


def test_the_policy_names_the_key_without_revealing_it():
    parsed = rules_from("ip_address, city", "user_id", KEY)
    assert parsed.policy == {"dropped": ["city", "ip_address"], "hashed": ["user_id"],
                             "key_id": hashlib.sha256(KEY.encode()).hexdigest()[:12]}
    assert KEY not in repr(parsed)
    assert rules_from("city", None, "").policy == {"dropped": ["city"], "hashed": [], "key_id": None}
    assert rules_from(None, None, "") is None
    with pytest.raises(RuleError):
        rules_from("x", "x", KEY)


# The transformation


def test_events_without_the_fields_are_kept_byte_for_byte():
    lines = [b'{"event_type" : "a",  "n": 1.50}', b'{"x":"M\\u00fcnchen","big":123456789012345678901234567890}',
             b'{"user_properties":{"plan":"pro"}}', b'{"user_properties":"not an object"}']
    assert rules(["ip_address", "user_properties.email"], ["device_id"]).apply(lines) == lines


def test_dropped_fields_go_and_everything_else_stays_exact_and_compact():
    line = ('{"event_type": "Bestellung", "ip_address": "10.0.0.1", "city": "München", '
            '"user_properties": {"email": "a@b.de", "plan" : "pro", "tags": [1, 2]}, "n": 1.50, '
            '"id": 123456789012345678901234567890, "note": "x\\u00fcy", "data": {"path": "/2/httpapi"}}').encode()
    out = rules(["ip_address", "user_properties.email", "data.path", "absent", "absent.deeper"]).apply([line])[0]
    assert out == ('{"event_type":"Bestellung","city":"München","user_properties":{"plan":"pro","tags":[1,2]},'
                   '"n":1.50,"id":123456789012345678901234567890,"note":"x\\u00fcy","data":{}}').encode()


def test_hashed_values_are_the_hmac_of_their_text():
    line = (b'{"user_id":"user-\xc3\xa4","device_id":"abc","n":1.50,"b":true,"o":{ "k" : [1, "x"] },'
            b'"a":[ 1 ,2 ],"z":null,"e":"\\u00e4"}')
    out = json.loads(rules((), ["user_id", "n", "b", "o", "a", "z", "e", "missing"]).apply([line])[0])
    assert out == {
        "user_id": pseudonym("user-ä"), "device_id": "abc", "n": pseudonym("1.50"), "b": pseudonym("true"),
        "o": pseudonym('{"k":[1,"x"]}'), "a": pseudonym("[1,2]"), "z": None, "e": pseudonym("ä"),
    }


def test_a_value_gets_the_same_pseudonym_in_every_event_and_every_run():
    lines = [b'{"user_id":"u-1","n":1}', b'{"user_id":"u-2"}', b'{"user_id":"u-1"}']
    first = [json.loads(line)["user_id"] for line in rules((), ["user_id"]).apply(lines)]
    again = [json.loads(line)["user_id"] for line in rules((), ["user_id"]).apply(lines)]
    assert first == again == [pseudonym("u-1"), pseudonym("u-2"), pseudonym("u-1")]
    other_key = Pseudonymiser(FieldRules((), ("user_id",), b"another key of thirty-two chars!!"))
    assert json.loads(other_key.apply(lines[:1])[0])["user_id"] != first[0]


def test_pseudonyms_are_the_same_whichever_hmac_the_standard_library_keys(monkeypatch):
    """The OpenSSL object inside hmac.HMAC, or hmac's own HMAC where there is none: the same pseudonyms."""
    lines = [b'{"user_id":"u-1","device_id":"d\\u00e9"}', b'{"user_id":{"k": [1, 2]},"device_id":7}']
    with_openssl = rules((), ["user_id", "device_id"])
    assert type(with_openssl._hmac).__module__ == "_hashlib"
    monkeypatch.setattr(field_rules.hashlib, "sha256", lambda *data: hashlib.new("sha256", *data))
    without = rules((), ["user_id", "device_id"])  # hmac.new given a Python function keeps no OpenSSL object
    assert isinstance(without._hmac, hmac.HMAC)
    assert with_openssl.apply(lines) == without.apply(lines) == [
        b'{"user_id":"%b","device_id":"%b"}' % (pseudonym("u-1").encode(), pseudonym("dé").encode()),
        b'{"user_id":"%b","device_id":"%b"}' % (pseudonym('{"k":[1,2]}').encode(), pseudonym("7").encode()),
    ]


def test_nested_hash_and_a_field_name_written_with_escapes():
    line = b'{"ip\\u005faddress":"10.1.2.3","event_properties":{"phone":"+49 30 1234"},"keep":"\\"q\\""}'
    out = rules(["ip_address"], ["event_properties.phone"]).apply([line])[0]
    assert out == ('{"event_properties":{"phone":"' + pseudonym("+49 30 1234") + '"},"keep":"\\"q\\""}').encode()


# End to end


def reference(line: bytes, dropped, hashed) -> dict:
    """What an event must become, computed the slow obvious way."""
    event = json.loads(line)
    for path in hashed:
        *parents, name = path.split(".")
        holder = event
        for parent in parents:
            holder = holder.get(parent) if isinstance(holder, dict) else None
        if isinstance(holder, dict) and holder.get(name) is not None:
            value = holder[name]
            holder[name] = pseudonym(value if isinstance(value, str) else json.dumps(value))
    for path in dropped:
        *parents, name = path.split(".")
        holder = event
        for parent in parents:
            holder = holder.get(parent) if isinstance(holder, dict) else None
        if isinstance(holder, dict):
            holder.pop(name, None)
    return event


DROPPED = ["ip_address", "city", "user_properties.plan"]
HASHED = ["user_id", "device_id", "event_properties.order_id"]
RULE_FLAGS = ("--drop-fields", ",".join(DROPPED), "--hash-fields", ",".join(HASHED))


def test_an_export_with_field_rules(cli, standin):
    result = cli.run(*DAY, *RULE_FLAGS, "--format", "jsonl", AMP_HASH_KEY=KEY)
    assert result.returncode == 0, result.stderr
    (output,) = cli.outputs()
    written = output.read_bytes().splitlines()
    expected = standin.expected_lines(hour("20251101T00"), hour("20251101T23"))
    assert len(written) == len(expected)
    for line, original in zip(written, expected, strict=True):
        assert list(json.loads(line).items()) == list(reference(original, DROPPED, HASHED).items())
        assert b" " not in re.sub(rb'"(?:[^"\\]|\\.)*"', b'""', line)  # compact: no space outside strings
        if b"\\u" not in original:
            assert b"\\u" not in line  # Unicode stays text
    record = cli.manifest()[0]
    assert record["policy"] == {"dropped": sorted(DROPPED), "hashed": sorted(HASHED),
                                "key_id": hashlib.sha256(KEY.encode()).hexdigest()[:12]}
    for text in (result.stderr, cli.everything_written()):
        assert KEY not in text and API_KEY not in text


def test_event_types_are_counted_as_the_rules_write_them():
    names = ["signup", "(no event_type)", "signup", "7"]
    assert rules(hashed=["event_type"]).counted_types(names) == [
        pseudonym("signup"), "(no event_type)", pseudonym("signup"), pseudonym("7")]
    assert rules(dropped=["event_type"]).counted_types(names) == ["(no event_type)"] * 4
    assert rules(dropped=["event_properties.event_type"], hashed=["user_id"]).counted_types(names) is names


@pytest.mark.parametrize("flag", ["--hash-fields", "--drop-fields"])
@pytest.mark.parametrize("members", [24, 1], ids=["on the workers", "on the download thread"])
def test_a_rule_on_event_type_applies_to_the_counts_and_the_report_too(cli, standin, flag, members):
    """Event types are counted from the lines as they arrived: the manifest and the report must not show what the
    rules took out of the file."""
    end = "20251101T23" if members == 24 else "20251101T00"
    result = cli.run("--start", "20251101T00", "--end", end, flag, "event_type", "--format", "jsonl",
                     AMP_HASH_KEY=KEY)
    assert result.returncode == 0, result.stderr
    assert cli.run("--report", "--start", "20251101T00", "--end", end).returncode == 0
    (output,) = cli.outputs()
    written = collections.Counter(json.loads(line).get("event_type", "(no event_type)")
                                  for line in output.read_bytes().splitlines())
    assert cli.manifest()[0]["event_types"] == written
    if flag == "--hash-fields":
        assert written.keys() and written.keys() <= {pseudonym(name) for name in EVENT_TYPES}
    else:
        assert written.keys() == {"(no event_type)"}
    report_page = (cli.data / "report.html").read_text()
    for name in EVENT_TYPES:
        for text in (report_page, cli.everything_written(), result.stderr):
            assert name not in text


def test_resume_skips_only_hours_exported_under_the_same_policy(cli, standin):
    assert cli.run(*DAY, AMP_DROP_FIELDS="ip_address").returncode == 0
    standin.requests.clear()
    assert cli.run(*DAY, "--drop-fields", "ip_address").returncode == 0
    assert standin.requests == []
    # Another policy: exported again into a new file; the old file is left alone.
    old_files = cli.outputs()
    result = cli.run(*DAY, *RULE_FLAGS, AMP_HASH_KEY=KEY)
    assert result.returncode == 0, result.stderr
    assert len(standin.requests) == 1
    assert set(old_files) < set(cli.outputs()) and len(cli.outputs()) == 2
    # Without rules, the hours exported under rules do not count either.
    standin.requests.clear()
    assert cli.run(*DAY).returncode == 0
    assert len(standin.requests) == 1
    assert [r.get("policy", {}).get("dropped") for r in cli.manifest()] == [["ip_address"], sorted(DROPPED), None]


def test_a_short_hash_key_is_refused_before_any_request(cli, standin):
    result = cli.run(*DAY, "--hash-fields", "user_id", AMP_HASH_KEY="too-short")
    assert result.returncode == 2
    assert result.stderr.strip() == "Error: AMP_HASH_KEY must be at least 32 characters (it has 9)"
    assert standin.requests == []
    assert "too-short" not in result.stderr


def test_pseudonyms_stay_right_when_their_memory_starts_afresh(monkeypatch):
    monkeypatch.setattr(field_rules, "CACHE_ENTRIES", 3)
    lines = [f'{{"user_id":"u{n % 5}","device_id":"d{n}"}}'.encode() for n in range(20)]
    out = [json.loads(line) for line in rules((), ["user_id", "device_id"]).apply(lines)]
    assert out == [{"user_id": pseudonym(f"u{n % 5}"), "device_id": pseudonym(f"d{n}")} for n in range(20)]


# Keys with dots, duplicate keys, paths that match nothing


def test_a_dot_inside_a_key_is_written_with_a_backslash():
    applied = rules(dropped=["event_properties.page\\.url", "a\\.b"]).apply(
        [b'{"a.b":1,"a":{"b":2},"event_properties":{"page.url":"x","page":{"url":"y"}}}'])
    assert json.loads(applied[0]) == {"a": {"b": 2}, "event_properties": {"page": {"url": "y"}}}


@pytest.mark.parametrize(
    "line, dropped, hashed, expected",
    [
        # The last of two equal keys is the value every JSON parser reads: the rule applies to it, the first goes.
        (b'{"event_type":"a","device_id":"LEAK","device_id":null}', (), ("device_id",),
         {"event_type": "a", "device_id": None}),
        (b'{"event_type":"a","device_id":null,"device_id":"LEAK"}', (), ("device_id",),
         {"event_type": "a", "device_id": "PSEUDONYM:LEAK"}),
        (b'{"event_properties":{"email":"LEAK"},"event_properties":{}}', ("event_properties.email",), (),
         {"event_properties": {}}),
        (b'{"event_properties":{"email":"LEAK","email":null}}', (), ("event_properties.email",),
         {"event_properties": {"email": None}}),
        (b'{"user_id":"u","event_properties":{"email":"LEAK","email":null}}', (), ("user_id", "event_properties.email"),
         {"user_id": "PSEUDONYM:u", "event_properties": {"email": None}}),
        (b'{"city":"LEAK","x":1,"city":"also"}', ("city",), (), {"x": 1}),
    ],
)
def test_a_key_written_twice_never_carries_its_first_value_past_the_rules(line, dropped, hashed, expected):
    (applied,) = rules(dropped, hashed).apply([line])
    assert b"LEAK" not in applied or b'"PSEUDONYM' in applied
    decoded = json.loads(applied)
    for key, value in expected.items():
        if isinstance(value, str) and value.startswith("PSEUDONYM:"):
            expected[key] = pseudonym(value.removeprefix("PSEUDONYM:"))
    assert decoded == expected
    assert b"LEAK" not in applied


def test_a_key_twice_in_an_object_no_rule_reaches_is_left_as_sent():
    line = b'{"user_id":"u","data":{"k":1,"k":2}}'
    (applied,) = rules(hashed=["user_id"]).apply([line])
    assert applied == b'{"user_id":"' + pseudonym("u").encode() + b'","data":{"k":1,"k":2}}'
    assert rules(dropped=["city"]).apply([b'{"data":{"k":1,"k":2}}']) == [b'{"data":{"k":1,"k":2}}']


def test_a_long_line_with_a_key_twice_is_rewritten_too():
    filler = b'"' + b"x" * (2 << 20) + b'"'
    line = b'{"device_id":"LEAK","blob":' + filler + b',"device_id":null}'
    (applied,) = rules(hashed=["device_id"]).apply([line])
    assert b"LEAK" not in applied and json.loads(applied)["device_id"] is None


def test_paths_that_matched_no_event_are_named():
    applied = rules(dropped=["city", "user_properties.emial"], hashed=["user_id", "device_id"])
    assert applied.unmatched() == []  # nothing seen yet: nothing to say
    applied.apply([b'{"city":"x","user_id":null,"user_properties":{"email":"a"}}'])
    assert applied.unmatched() == ["device_id", "user_properties.emial"]


def test_a_run_warns_of_a_path_that_matched_no_event(cli, standin):
    result = cli.run(*DAY, "--drop-fields", "ip_adress,city", AMP_HASH_KEY=KEY)
    assert result.returncode == 0, result.stderr
    assert re.search(r"WARNING - --drop-fields ip_adress matched no event", result.stderr)
    assert "city matched no event" not in result.stderr
