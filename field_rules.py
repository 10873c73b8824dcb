"""Field rules: drop and pseudonymise personal data in each event while it streams.

`--drop-fields` removes fields; `--hash-fields` replaces each value by the hex HMAC-SHA256 of its text, keyed by
AMP_HASH_KEY, so the same user gets the same pseudonym in every file and nobody without the key can test
guesses. Events that carry none of the fields are written byte for byte; changed events keep every other key in
its order and every other value's text as Amplitude sent it (Unicode, integers of any size), as compact JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import json

import msgspec

HASH_KEY_VARIABLE = "AMP_HASH_KEY"
MIN_KEY_CHARS = 32
KEY_ID_DIGITS = 12
CACHE_ENTRIES = 32_768  # pseudonyms remembered per field (up to about 8 MB each): IDs recur all day

OBJECT = msgspec.json.Decoder(dict[str, msgspec.Raw])
ENCODE = msgspec.json.Encoder().encode
FORMAT = msgspec.json.format


class RuleError(ValueError):
    """Settings for the field rules that cannot work; fetch_data turns it into a usage error."""


@dataclasses.dataclass(frozen=True)
class FieldRules:
    dropped: tuple[str, ...]
    hashed: tuple[str, ...]
    key: bytes = dataclasses.field(repr=False)

    @property
    def key_id(self) -> str | None:
        """Names the key in the manifest without revealing it: runs with the same key share pseudonyms."""
        return hashlib.sha256(self.key).hexdigest()[:KEY_ID_DIGITS] if self.hashed else None

    @property
    def policy(self) -> dict:
        return {"dropped": sorted(self.dropped), "hashed": sorted(self.hashed), "key_id": self.key_id}


def rules_from(dropped_text: str | None, hashed_text: str | None, key: str, sources=("--drop-fields", "--hash-fields")):
    """The rules asked for by --drop-fields / --hash-fields, checked before any request; None when there are none.

    `sources` name where each text came from (a flag or its variable), for the messages.
    """
    dropped = parse_paths(dropped_text, sources[0])
    hashed = parse_paths(hashed_text, sources[1])
    both = sorted(set(dropped) & set(hashed))
    if both:
        raise RuleError(f"{', '.join(both)}: a field is either dropped or hashed, not both")
    if not (dropped or hashed):
        return None
    key = key if hashed else ""
    if hashed and not key:
        raise RuleError(f"--hash-fields needs {HASH_KEY_VARIABLE} (in .env or the environment, never a flag)")
    if hashed and len(key) < MIN_KEY_CHARS:
        raise RuleError(f"{HASH_KEY_VARIABLE} must be at least {MIN_KEY_CHARS} characters (it has {len(key)})")
    return FieldRules(tuple(dropped), tuple(hashed), key.encode("utf-8"))


def parse_paths(text: str | None, source: str) -> list[str]:
    if text is None:
        return []
    paths = [path.strip() for path in text.split(",")]
    for path in paths:
        if not path:
            raise RuleError(f"{source}: an empty field path in {text!r}")
        if any(not part.strip() for part in path.split(".")):
            raise RuleError(f"{source}: {path!r} has an empty part (use dots between field names only)")
    return list(dict.fromkeys(paths))


@dataclasses.dataclass(frozen=True)
class Plan:
    """The rules for the fields of one object: names to drop, names to hash, and objects to look into."""

    dropped: tuple[str, ...] = ()
    hashed: tuple[str, ...] = ()
    nested: tuple[tuple[str, Plan], ...] = ()


class Pseudonymiser:
    """Applies FieldRules to batches of event lines; one per run, shared by the download threads."""

    def __init__(self, rules: FieldRules):
        self.rules = rules
        self._plan = plan_of([path.split(".") for path in rules.dropped], [path.split(".") for path in rules.hashed])
        self._key = rules.key
        # One memory per field name, so that IDs seen once (device IDs of one-time visitors) do not push out the
        # users who come back all day.
        self._pseudonyms: dict[str, dict[bytes, msgspec.Raw]] = collections.defaultdict(dict)

    def apply(self, lines: list[bytes]) -> list[bytes]:
        """Each event with the rules applied, or the very same bytes when it carries none of the fields."""
        decode, edit, plan = OBJECT.decode, self._edit, self._plan
        changed = []
        for line in lines:
            event = decode(line)
            # Values kept as they were keep their inner spacing: the line is made compact as a whole.
            changed.append(FORMAT(ENCODE(event), indent=-1) if edit(event, plan) else line)
        return changed

    def _edit(self, event: dict, plan: Plan) -> bool:
        changed = False
        for name in plan.dropped:
            if event.pop(name, None) is not None:
                changed = True
        for name in plan.hashed:
            value = event.get(name)
            if value is not None:
                raw = bytes(value)
                if raw != b"null":  # null stays null
                    known = self._pseudonyms[name]
                    event[name] = known.get(raw) or self._pseudonym(raw, known)
                    changed = True
        for name, inner_plan in plan.nested:
            value = event.get(name)
            if value is not None:
                raw = bytes(value)
                if raw[:1] == b"{":
                    inner = OBJECT.decode(raw)
                    if self._edit(inner, inner_plan):
                        event[name] = msgspec.Raw(ENCODE(inner))
                        changed = True
        return changed

    def _pseudonym(self, raw: bytes, known: dict[bytes, msgspec.Raw]) -> msgspec.Raw:
        """A value's pseudonym, computed and remembered in `known`, which starts afresh when full."""
        if len(known) >= CACHE_ENTRIES:
            known.clear()
        pseudonym = known[raw] = msgspec.Raw(b'"%b"' % hmac.digest(self._key, text_to_hash(raw), "sha256").hex().encode())
        return pseudonym


def plan_of(dropped: list[list[str]], hashed: list[list[str]]) -> Plan:
    """The paths (split at their dots) as a Plan. A field dropped or hashed as a whole covers the paths inside it;
    a field both dropped and hashed through different paths is dropped."""
    drop = {path[0] for path in dropped if len(path) == 1}
    hash_ = {path[0] for path in hashed if len(path) == 1} - drop
    inside = {path[0] for path in dropped + hashed if len(path) > 1} - drop - hash_
    nested = tuple(
        (name, plan_of([p[1:] for p in dropped if len(p) > 1 and p[0] == name],
                       [p[1:] for p in hashed if len(p) > 1 and p[0] == name]))
        for name in sorted(inside)
    )
    return Plan(tuple(sorted(drop)), tuple(sorted(hash_)), nested)


def text_to_hash(raw: bytes) -> bytes:
    """A string's own UTF-8 text; a number's or a boolean's JSON text as it stands; an object's compact JSON text."""
    if raw.startswith(b'"'):
        # Without escapes a JSON string's bytes between the quotes are its UTF-8 text already.
        return raw[1:-1] if b"\\" not in raw else json.loads(raw).encode("utf-8", "surrogatepass")
    if raw.startswith((b"{", b"[")):
        return msgspec.json.format(raw, indent=-1)
    return raw
