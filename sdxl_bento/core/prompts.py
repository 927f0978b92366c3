"""The prompt policy: checked before any GPU work.

Operators supply a YAML file of words and regular expressions (no file: no policy; none ships with the package).
Matching is done on normalised copies of the prompt, because a list of words is useless if "nüde", "nud3",
"n.u.d.e", a zero-width space or a Cyrillic "е" get past it. Words match whole words only, so "ass" does not refuse
"class" (the Scunthorpe problem). Only the positive prompt is checked by default: a negative prompt names what the
user does *not* want ("nudity, gore"), so checking it would refuse the most careful requests;
``check_negative_prompt: true`` turns it on. A refusal names the rule's id, never its text: the list is the
operator's, and echoing it would teach clients how to word around it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import ContentFiltered

Field = Literal["prompt", "negative_prompt"]


@dataclass(frozen=True)
class PolicyMatch:
    rule_id: str
    """The entry's ``id``, or ``word-N`` / ``pattern-N`` (1-based position): never the rule's text."""
    field: Field


@dataclass(frozen=True)
class Rule:
    id: str
    kind: Literal["word", "pattern"]
    text: str


# Look-alikes from other scripts, mapped to the Latin letter they imitate. Capitals are mapped
# before case folding (Greek "Η" looks like "H", its lower case "η" like "n").
_UPPER_LOOKALIKES = str.maketrans({
    "А": "A", "В": "B", "Е": "E", "Ѕ": "S", "І": "I", "Ј": "J", "К": "K", "М": "M", "Н": "H", "О": "O",
    "Р": "P", "С": "C", "Т": "T", "Х": "X", "У": "Y", "Ү": "Y",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M", "Ν": "N", "Ο": "O",
    "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
})
_LOWER_LOOKALIKES = str.maketrans({
    "а": "a", "в": "b", "е": "e", "ѕ": "s", "і": "i", "ј": "j", "к": "k", "м": "m", "н": "h", "о": "o",
    "р": "p", "с": "c", "т": "t", "у": "y", "х": "x", "ԁ": "d", "ԛ": "q", "ԝ": "w", "һ": "h", "ӏ": "l",
    "ү": "y", "α": "a", "β": "b", "γ": "y", "ε": "e", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o",
    "ρ": "p", "τ": "t", "υ": "u", "χ": "x", "ω": "w", "ı": "i", "ɡ": "g", "ℓ": "l",
})
_APOSTROPHES = str.maketrans("", "", "'\u2018\u2019\u02bc")
# Leetspeak. "1" stands for "i" or "l", so it yields two views.
_LEET = {"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"}
_LEET_I = str.maketrans({**_LEET, "1": "i"})
_LEET_L = str.maketrans({**_LEET, "1": "l"})

_NOT_ALNUM = r"(?:[^\w@$]|_)"  # a separator: neither letter, digit, nor a leet symbol
_CHAR = r"(?:[^\W_]|[@$])"  # one letter, digit or leet symbol
# Three or more single characters with short separators between them: "n.u.d.e", "n u d e", "s-3-x".
_SPACED = re.compile(rf"(?<![^\W_])(?<![@$]){_CHAR}(?:{_NOT_ALNUM}{{1,5}}{_CHAR}){{2,}}(?![^\W_])(?![@$])")
_TOKEN = re.compile(r"(?:[^\W_]|[@$])+")
_SEPARATORS = re.compile(r"[\W_]+")


def normalize(text: str) -> str:
    """NFKC, no format characters (zero-width, bidi) nor apostrophes ("hell's" = "hells"),
    look-alikes to Latin, case folded, no accents."""
    text = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES)
    text = "".join(c for c in text if unicodedata.category(c) != "Cf")
    text = text.translate(_UPPER_LOOKALIKES).casefold()
    text = "".join(c for c in unicodedata.normalize("NFD", text) if not unicodedata.category(c).startswith("M"))
    return unicodedata.normalize("NFC", text.translate(_LOWER_LOOKALIKES))


def _collapse(text: str, keep_first: bool = False, keep_last: bool = False) -> str:
    """Join spaced-out letters. The first or last may be a word of its own ("a n u d e"), so the
    views also try them kept apart."""

    def join(m: re.Match[str]) -> str:
        run = m.group()
        if not any(c.isalpha() for c in run):
            return run
        chars = re.sub(_NOT_ALNUM, "", run)
        head, tail = (chars[:1] + " ", chars[1:]) if keep_first else ("", chars)
        tail, end = (tail[:-1], " " + tail[-1]) if keep_last else (tail, "")
        return head + tail + end if len(tail) >= 2 else run

    return _SPACED.sub(join, text)


def _deleet(text: str, table: dict[int, str]) -> str:
    # Only inside tokens that hold a letter: "s3x" -> "sex", while "1024" and "$5" stay as they are.
    return _TOKEN.sub(lambda m: m.group().translate(table) if any(c.isalpha() for c in m.group()) else m.group(),
                      text)


_SPLITS = ((False, False), (True, False), (False, True), (True, True))


def views(text: str) -> list[str]:
    """The normalised copies of ``text`` rules are matched against: as written (digits kept, for
    patterns such as ages), with spaced-out letters joined, and with leetspeak read as letters."""
    base = normalize(text)
    out = [base]
    for table in (None, _LEET_I, _LEET_L):
        for variant in (base, *(_collapse(base, first, last) for first, last in _SPLITS)):
            view = _deleet(variant, table) if table else variant
            if view not in out:
                out.append(view)
    return out


_WORD = re.compile(r"[^\W_]+(?:[\s\-_.]+[^\W_]+)*")


def _word_tokens(rule: Rule) -> list[str]:
    word = normalize(rule.text).strip()
    if not _WORD.fullmatch(word):
        # "a$$" would otherwise become the word "a". Leetspeak in prompts is already read as letters.
        raise ValueError(f"policy rule {rule.id}: a word is letters and digits (spaces or hyphens between "
                         "words); use a pattern for anything else")
    return [t for t in _SEPARATORS.split(word) if t]


class PromptPolicy:
    """Words (whole-word, separators between a phrase's words are free) and patterns (``re``, case
    insensitive, searched in the normalised text: write them in lower-case ASCII)."""

    def __init__(self, rules: Sequence[Rule] = (), *, check_negative_prompt: bool = False) -> None:
        self.rules = tuple(rules)
        self.check_negative_prompt = check_negative_prompt
        self._word_ids: dict[str, str] = {}
        self._patterns: list[tuple[str, re.Pattern[str]]] = []
        alternatives: list[str] = []
        for rule in self.rules:
            if rule.kind == "word":
                tokens = _word_tokens(rule)
                key = " ".join(tokens)
                if key not in self._word_ids:
                    self._word_ids[key] = rule.id
                    alternatives.append(r"[\W_]+".join(map(re.escape, tokens)))
            else:
                try:
                    self._patterns.append((rule.id, re.compile(rule.text, re.IGNORECASE)))
                except re.error as exc:
                    raise ValueError(f"policy rule {rule.id}: not a valid regular expression ({exc})") from exc
        alternatives.sort(key=len, reverse=True)
        self._words = (re.compile(r"(?<![^\W_])(?:" + "|".join(alternatives) + r")(?![^\W_])")
                       if alternatives else None)

    @classmethod
    def load(cls, path: str | Path) -> PromptPolicy:
        """Read a policy file. Strict: a typo in a key must not silently disable a rule."""
        import yaml

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt policy file {path} does not exist")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping with 'words' and/or 'patterns'")
        unknown = set(data) - {"words", "patterns", "check_negative_prompt"}
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; expected words, patterns, check_negative_prompt")
        rules = [*_parse_entries(path, data, "words", "word"), *_parse_entries(path, data, "patterns", "pattern")]
        check_negative = data.get("check_negative_prompt", False)
        if not isinstance(check_negative, bool):
            raise ValueError(f"{path}: check_negative_prompt must be true or false")
        return cls(rules, check_negative_prompt=check_negative)

    def check(self, prompt: str, negative_prompt: str = "") -> PolicyMatch | None:
        """The first rule the prompt matches (and the negative prompt, only if so configured)."""
        fields: list[tuple[Field, str]] = [("prompt", prompt)]
        if self.check_negative_prompt and negative_prompt:
            fields.append(("negative_prompt", negative_prompt))
        for name, text in fields:
            rule_id = self._match(text)
            if rule_id is not None:
                return PolicyMatch(rule_id, name)
        return None

    def enforce(self, prompt: str, negative_prompt: str = "") -> None:
        """Raise ``ContentFiltered`` (400) naming the rule's id when the prompt matches."""
        match = self.check(prompt, negative_prompt)
        if match is not None:
            raise ContentFiltered(f"the {match.field.replace('_', ' ')} is not allowed by this server's content "
                                  f"policy (rule {match.rule_id})",
                                  finish_reason="content_filtered", rule=match.rule_id, field=match.field)

    def _match(self, text: str) -> str | None:
        if not text or not self.rules:
            return None
        for view in views(text):
            if self._words is not None and (m := self._words.search(view)):
                return self._word_ids[" ".join(t for t in _SEPARATORS.split(m.group()) if t)]
            for rule_id, pattern in self._patterns:
                if pattern.search(view):
                    return rule_id
        return None


def _parse_entries(path: Path, data: dict[str, Any], section: str, key: Literal["word", "pattern"]) -> list[Rule]:
    entries = data.get(section) or []
    if not isinstance(entries, list):
        raise ValueError(f"{path}: '{section}' must be a list")
    rules = []
    for n, entry in enumerate(entries, start=1):
        where = f"{path}: {section} entry {n}"
        if isinstance(entry, dict):
            extra = set(entry) - {"id", key}
            if extra or key not in entry:
                raise ValueError(f"{where}: expected a string or {{id: NAME, {key}: ...}}, got keys {sorted(entry)}")
            rule_id, text = entry.get("id"), entry[key]
            if rule_id is not None and (not isinstance(rule_id, (str, int)) or not str(rule_id).strip()):
                raise ValueError(f"{where}: 'id' must be a non-empty name")
        else:
            rule_id, text = None, entry
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: the {key} must be a non-empty string")
        rules.append(Rule(str(rule_id).strip() if rule_id is not None else f"{key}-{n}", key, text))
    return rules
