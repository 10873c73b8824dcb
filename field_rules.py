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
import logging

import msgspec

from archive import NO_EVENT_TYPE, mask_surrogates, unmask_surrogates

log = logging.getLogger("fetch_data")

HASH_KEY_VARIABLE = "AMP_HASH_KEY"
MIN_KEY_CHARS = 32
KEY_ID_DIGITS = 12
EVENT_TYPE = "event_type"
CACHE_ENTRIES = 16_384  # pseudonyms remembered per field (about 3 MB each): the users who come back all day

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
    """Comma-separated paths, each checked; a dot inside a key name is written `\\.` (and a backslash `\\\\`)."""
    if text is None:
        return []
    paths = [path.strip() for path in text.split(",")]
    for path in paths:
        if not path:
            raise RuleError(f"{source}: an empty field path in {text!r}")
        parts = split_path(path, source)
        if any(part != part.strip() for part in parts):
            raise RuleError(f"{source}: {path!r} has spaces around a dot (a key with spaces at its ends is not one "
                            "Amplitude writes)")
    return list(dict.fromkeys(paths))


def split_path(path: str, source: str = "path") -> list[str]:
    """`a.b\\.c` is the key `b.c` inside `a`: the parts of a path, with its escapes resolved."""
    parts, current, escaped = [], [], False
    for char in path:
        if escaped:
            if char not in ".\\":
                raise RuleError(f"{source}: {path!r}: a backslash stands before a dot or a backslash only")
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise RuleError(f"{source}: {path!r} ends in a backslash")
    parts.append("".join(current))
    if any(not part for part in parts):
        raise RuleError(f"{source}: {path!r} has an empty part (use dots between field names only)")
    return parts


@dataclasses.dataclass(frozen=True)
class Plan:
    """The rules for the fields of one object: (key, path) pairs to drop and to hash, and objects to look into."""

    dropped: tuple[tuple[str, str], ...] = ()
    hashed: tuple[tuple[str, str], ...] = ()
    nested: tuple[tuple[str, Plan], ...] = ()


class Pseudonymiser:
    """Applies FieldRules to batches of event lines; one per run, shared by the download threads."""

    def __init__(self, rules: FieldRules):
        self.rules = rules
        self._plan = plan_of([(split_path(p), p) for p in rules.dropped], [(split_path(p), p) for p in rules.hashed])
        # The standard library's HMAC, keyed once. hmac.HMAC keeps its OpenSSL object as _hmac: copying that one
        # makes a value cost a copy, an update and a digest in C, without the three Python methods hmac.HMAC wraps
        # around them (a million distinct IDs would pay those a million times). A Python without OpenSSL has none.
        keyed = hmac.new(rules.key, digestmod=hashlib.sha256)
        self._hmac = getattr(keyed, "_hmac", None) or keyed
        # One memory per field name, so that IDs seen once (device IDs of one-time visitors) do not push out the
        # users who come back all day.
        self._pseudonyms: dict[str, dict[bytes, msgspec.Raw]] = collections.defaultdict(dict)
        self._paths = frozenset(rules.dropped + rules.hashed)
        # Paths no event has carried yet; once empty (on the first events, as a rule) the check costs nothing.
        self._unmatched: set[str] = set(self._paths)
        self.events = 0
        # Event types are counted (the manifest, the report) from the lines as they arrived: a rule on event_type
        # applies to the counts too.
        self._type_rule = "drop" if EVENT_TYPE in rules.dropped else "hash" if EVENT_TYPE in rules.hashed else None
        self._type_pseudonyms: dict[str, str] = {}

    def unmatched(self) -> list[str]:
        """The paths no event carried, once events went through: a typo there keeps personal data."""
        return sorted(self._unmatched) if self.events else []

    def warn_of_unmatched(self) -> None:
        """A field path no event carried is most likely a typo, and the personal data it meant stays in the files."""
        for path in self.unmatched():
            flag = "--drop-fields" if path in self.rules.dropped else "--hash-fields"
            log.warning("%s %s matched no event: check its spelling, or the data it names is kept", flag, path)

    def carried(self) -> frozenset[str]:
        """The paths some event carried so far."""
        return self._paths - self._unmatched

    def count(self, events: int, carried: frozenset[str]) -> None:
        """Events a worker process applied the rules to, and the paths they carried."""
        self.events += events
        self._unmatched -= carried

    def counted_types(self, types: list[str]) -> list[str]:
        """The event types of a batch as its written events have them: none when the rules drop `event_type`, the
        pseudonyms when they hash it, else as they are."""
        if self._type_rule is None:
            return types
        if self._type_rule == "drop":
            return [NO_EVENT_TYPE] * len(types)
        known = self._type_pseudonyms
        counted = []
        for name in types:
            if name not in known:
                if len(known) >= CACHE_ENTRIES:
                    known.clear()
                mac = self._hmac.copy()
                mac.update(name.encode("utf-8", "surrogatepass"))
                known[name] = NO_EVENT_TYPE if name == NO_EVENT_TYPE else mac.hexdigest()
            counted.append(known[name])
        return counted

    def apply(self, lines: list[bytes]) -> list[bytes]:
        """Each event with the rules applied, or the very same bytes when it carries none of the fields.

        An object the rules reach that holds a key twice is rewritten with one (the last, as JSON parsers read it),
        so a first value hidden behind a second never reaches the file.
        """
        decode, edit, plan = OBJECT.decode, self._edit, self._plan
        changed = []
        for line in lines:
            try:
                masked, event = None, decode(line)
            except msgspec.DecodeError:  # a checked line msgspec refuses holds a lone surrogate escape
                masked = mask_surrogates(line)
                if masked is None:
                    raise
                event = decode(masked)
            # Values kept as they were keep their inner spacing: the line is made compact as a whole.
            if edit(event, plan) or has_duplicates(masked or line, event):
                rewritten = FORMAT(ENCODE(event), indent=-1)
                changed.append(unmask_surrogates(rewritten) if masked else rewritten)
            else:
                changed.append(line)
        self.events += len(lines)
        return changed

    def _edit(self, event: dict, plan: Plan) -> bool:
        changed = False
        unmatched = self._unmatched
        for name, path in plan.dropped:
            if event.pop(name, None) is not None:
                changed = True
                if unmatched:
                    unmatched.discard(path)
        for name, path in plan.hashed:
            value = event.get(name)
            if value is None:
                continue
            if unmatched:
                unmatched.discard(path)
            raw = bytes(value)
            if raw == b"null":  # null stays null
                continue
            known = self._pseudonyms[path]
            pseudonym = known.get(raw)
            if pseudonym is None:
                if len(known) >= CACHE_ENTRIES:  # IDs seen once must not grow the memory without bound
                    known.clear()
                mac = self._hmac.copy()
                mac.update(text_to_hash(raw))
                pseudonym = known[raw] = msgspec.Raw(b'"%b"' % mac.hexdigest().encode())
            event[name] = pseudonym
            changed = True
        for name, inner_plan in plan.nested:
            value = event.get(name)
            if value is not None:
                raw = bytes(value)
                if raw[:1] == b"{":
                    inner = OBJECT.decode(raw)
                    if self._edit(inner, inner_plan) or has_duplicates(raw, inner):
                        event[name] = msgspec.Raw(ENCODE(inner))
                        changed = True
        return changed


def has_duplicates(raw: bytes, decoded: dict) -> bool:
    """Whether the object `raw` holds a key twice: its decoding, written back, then differs from it.

    Called only for objects the rules left unchanged (a changed one is written from its decoding, one key each).
    A key written with escapes also differs; such an object is rewritten too, which changes no value.
    """
    return FORMAT(raw, indent=-1) != FORMAT(ENCODE(decoded), indent=-1)


def plan_of(dropped: list[tuple[list[str], str]], hashed: list[tuple[list[str], str]]) -> Plan:
    """The paths (as parts, with the text that named them) as a Plan. A field dropped or hashed as a whole covers
    the paths inside it; a field both dropped and hashed through different paths is dropped."""
    drop = {parts[0]: path for parts, path in dropped if len(parts) == 1}
    hash_ = {parts[0]: path for parts, path in hashed if len(parts) == 1 and parts[0] not in drop}
    inside = {parts[0] for parts, _ in dropped + hashed if len(parts) > 1} - set(drop) - set(hash_)
    nested = tuple(
        (name, plan_of([(p[1:], path) for p, path in dropped if len(p) > 1 and p[0] == name],
                       [(p[1:], path) for p, path in hashed if len(p) > 1 and p[0] == name]))
        for name in sorted(inside)
    )
    return Plan(tuple(sorted(drop.items())), tuple(sorted(hash_.items())), nested)


def text_to_hash(raw: bytes) -> bytes:
    """A string's own UTF-8 text; a number's or a boolean's JSON text as it stands; an object's compact JSON text."""
    if raw.startswith(b'"'):
        # Without escapes a JSON string's bytes between the quotes are its UTF-8 text already.
        if b"\\" not in raw:
            return raw[1:-1]
        return json.loads(unmask_surrogates(raw)).encode("utf-8", "surrogatepass")
    if raw.startswith((b"{", b"[")):
        return unmask_surrogates(msgspec.json.format(raw, indent=-1))
    return raw
