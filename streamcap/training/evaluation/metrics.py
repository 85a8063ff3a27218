"""Caption and retrieval metrics, computed offline.

BLEU-1..4, ROUGE-L and CIDEr-D are our own pure-Python implementations of the
COCO caption evaluation definitions (corpus BLEU with the closest reference
length, ROUGE-L F with beta 1.2, CIDEr-D with sigma 6, clipping and x10);
on the same tokens they give pycocoevalcap's numbers. METEOR needs the
METEOR 1.5 jar that ships with ``pycocoevalcap`` (``pip install
'streamcap[eval]'``) and a Java runtime; without them it is reported as
unavailable with the reason, never raised. SPICE (and so SPIDEr) needs the
Stanford CoreNLP models, which pycocoevalcap downloads on first use; it is
reported unavailable offline.

Text is tokenized exactly like pycocoevalcap's ``PTBTokenizer`` (the Stanford
CoreNLP 3.4.1 PTB lexer with ``-preserveLines -lowerCase``, then its fixed list
of punctuation tokens dropped): hyphenated words and numbers such as ``3.5``
stay whole, clitics split off (``dog 's``, ``do n't``, ``can not``,
``gon na``), ``&`` stays a token and parentheses become ``-lrb-``/``-rrb-``
(the punctuation list is upper case, so pycocoevalcap keeps them). By default
a pure-Python scanner of the lexer's rules does it (:func:`ptb_tokens_python`);
``tokenizer="jar"`` runs the jar that ships with pycocoevalcap through Java
instead. On the test suite's few hundred varied captions the two agree on
every caption. Like pycocoevalcap, a batch is tokenized as one text, a
caption a line, because the lexer looks across line ends.

A FENSE-style score combines a pluggable sentence embedder with the fluency
filter: ``mean cosine to the references x (1 - 0.9 x flagged)``.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from streamcap.errors import ConfigError

Tokens = list[str]


# ---------------------------------------------------------------------------
# PTB tokenization, as pycocoevalcap does it
# ---------------------------------------------------------------------------
#
# pycocoevalcap joins every caption of a batch with newlines, runs the Stanford
# CoreNLP 3.4.1 PTBTokenizer (``-preserveLines -lowerCase``) over the whole
# text and then drops the tokens in PTB_PUNCTUATION. The lexer sees across
# line ends (an abbreviation at the end of one caption is split differently
# when the next caption starts with a capital), so tokenization works on a
# batch, never on one caption alone. ``_PtbScanner`` is a pure-Python longest
# match scanner over the rules of that lexer that captions exercise;
# :func:`ptb_tokenize_jar` runs the jar itself.

PTB_PUNCTUATION: frozenset[str] = frozenset({
    "''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-",
    "--", "...", ";"})
"""pycocoevalcap's list, compared after lower-casing: ``-lrb-`` and friends stay."""

TokenizerName = Literal["python", "jar"]
TOKENIZERS: tuple[TokenizerName, ...] = ("python", "jar")
DEFAULT_TOKENIZER: TokenizerName = "python"


def _char_class(predicate: Callable[[str], bool], extra: str = "") -> str:
    """A regex class of the BMP characters satisfying ``predicate`` (the lexer is UTF-16)."""
    ranges: list[tuple[int, int]] = []
    for cp in range(0x10000):
        if 0xD800 <= cp <= 0xDFFF or not predicate(chr(cp)):
            continue
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1] = (ranges[-1][0], cp)
        else:
            ranges.append((cp, cp))
    body = "".join(re.escape(chr(a)) if a == b else f"{re.escape(chr(a))}-{re.escape(chr(b))}"
                   for a, b in ranges)
    return f"[{body}{extra}]"


_L = _char_class(lambda c: unicodedata.category(c) in ("Lu", "Ll", "Lt", "Lm", "Lo"),
                 "\u00ad\u0300-\u036f")
_D = _char_class(lambda c: unicodedata.category(c) == "Nd")
_UPPER = _char_class(lambda c: unicodedata.category(c) == "Lu")
_AL = f"(?:{_L}|{_D})"
_NOT_AL = f"(?!{_AL})"
_SPACE = "[ \t\u00a0\u2000-\u200a\u3000]"
_NEWLINE = "(?:\r\n|[\r\n\u2028\u2029\u000b\u000c])"
_SPACENL = f"(?:{_SPACE}|{_NEWLINE})"
_APOS = "(?:['\u0092\u2019\u00b4]|&apos;)"
_APOSETC = f"(?:{_APOS}|[`\u0091\u2018\u201b])"
_REDAUX = f"{_APOS}(?:[msdMSD]|[rR][eE]|[vV][eE]|[lL][lL])"
_SREDAUX = f"[nN]{_APOSETC}[tT]"
_WORD = f"{_L}{_AL}*(?:[.!?]{_L}{_AL}*)*"
_SWORD = f"{_L}*[A-MO-Za-mo-z]\u00ad*"
_NUM = f"(?:{_D}*(?:[.,\u066b\u066c]{_D}+)+|{_D}+(?:[.:,\u00ad\u066b\u066c\u2009\u202f]{_D}+)*)"
_NUMBER = f"[-+]?{_NUM}"
_HYPHEN = "[-_\u058a\u2010\u2011]"
_APOSPRE = f"(?:[dDoOlL]{_APOSETC}{_AL})"
_THING = (f"{_APOSPRE}?(?:{_AL}+|{_NUMBER})"
          f"(?:{_HYPHEN}{_APOSPRE}?(?:{_AL}+|{_NUM}))*")
_SGML = ("<(?:[!?][A-Za-z-][^>\r\n]*|/?[A-Za-z][A-Za-z0-9_:.-]*(?:[ ]+(?:[A-Za-z][A-Za-z0-9_:.-]*"
         "(?:[ ]*=[ ]*(?:'[^']*'|\"[^\"]*\"|[A-Za-z][A-Za-z0-9_:.-]*))?))*[ ]*/?)>")
_ACRO = "[A-Za-z](?:\\.[A-Za-z])*"
_ABBREV1 = ("(?:(?i:jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri"
            "|ala|ariz|az|ark|calif|colo|conn|ct|dak|fla|ga|ind|kans?|ky|md|mich|minn|mo|mont"
            "|neb|nev|okla|penn|tenn|va|vt|wisc?|wyo|inc|cos?|corp|pp?t[ye]s?|ltd|plc|rt|bancorp"
            "|bhd|assn|tel|est|ext|sq|jr|bros|(?:ed|ph)\\.d|esq|etc|al|seq|bldg)"
            "|Del|Ill|La|Mass|Miss|Ore|Pa|Tex|Wash)\\.")
_ABBREV4 = ("(?:(?i:mr|mrs|ms|drs?|profs?|sens?|reps?|lt|col|gen|messrs|govs?|adm|rev|maj|sgt"
            "|pvt|mt|capt|ste?|ave|pres|lieut|hon|brig|co?mdr|pfc|spc|supts?|det|vs|alex|wm|jos"
            "|cie|a\\.k\\.a|cf|treas|ph|invt|elec|natl|m[ft]g|dept|blvd|rd)|Miss|v|" + _ACRO + ")")
_ACRONYM_NEXT = ("(?:About|According|Additionally|After|An|A|As|At|But|Did|During|Earlier|He|Her"
                 "|Here|How|However|If|In|It|Last|Many|More|Mr\\.|Ms\\.|Now|Once|One|Other|Our"
                 "|She|Since|So|Some|Such|That|The|Their|Then|There|These|They|This|We|When"
                 "|While|What|Who|Why|Yet|You)")
_QUOTE_CHARS = "`\u2018-\u201f\u0082\u0084\u0091-\u0094\u2039\u203a\u00ab\u00bb"
_MISC = ("[+%&~^|\\\\\u00a6\u00a7\u00a8\u00a9\u00ac\u00ae\u00af\u00b0-\u00ba\u00d7\u00f7"
         "\u0387\u05be\u05c0\u05c3\u05c6\u05f3\u05f4\u0600-\u0603\u0606-\u060a\u060c\u0614"
         "\u061b\u061e\u066a\u066d\u0703-\u070d\u07f6-\u07f8\u0964\u0965\u0e4f\u1fbd\u2016"
         "\u2017\u2020-\u2025\u2030-\u2038\u203b\u203c\u203e-\u2044\u207a-\u207f\u208a-\u208e"
         "\u2100-\u214f\u2190-\u21ff\u2200-\u2bff\u3001-\u3006\u3008-\u3020\u30fb\uff01-\uff0f"
         "\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]")
_FRAC_CHARS = {"\u00bc": "1/4", "\u00bd": "1/2", "\u00be": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
_QUOTE_MAP = {"\u0091": "`", "\u2018": "`", "\u201b": "`", "\u2039": "`", "\u0082": "`",
              "\u0092": "'", "\u2019": "'", "\u00b4": "'", "\u203a": "'",
              "\u0093": "``", "\u201c": "``", "\u00ab": "``", "\u0084": "``",
              "\u0094": "''", "\u201d": "''", "\u00bb": "''"}
_NL = "\n"  # the scanner's newline token

# An action maps the token part of a match to (token or None, characters consumed).
_Action = Callable[[str], tuple[str | None, int]]


def _keep(tok: str) -> tuple[str | None, int]:
    return tok, len(tok)


def _skip(tok: str) -> tuple[str | None, int]:
    return None, len(tok)


def _newline(tok: str) -> tuple[str | None, int]:
    return _NL, len(tok)


def _const(value: str) -> _Action:
    return lambda tok: (value, len(tok))


def _push_back(n: int) -> _Action:
    return lambda tok: (tok[:-n], len(tok) - n)


def _with_period_again(tok: str) -> tuple[str | None, int]:
    """Return ``tok`` with its final period, then lex that period once more."""
    return tok, len(tok) - 1


def _acronym(tok: str) -> tuple[str | None, int]:
    if len(tok) == 2:  # "I." before a sentence start: the letter, then the period
        return tok[:1], 1
    return _with_period_again(tok)


def _apostrophes(tok: str) -> tuple[str | None, int]:
    return re.sub("&apos;|[\u0092\u2019\u00b4]", "'", tok), len(tok)


def _quotes(left: bool) -> _Action:
    def act(tok: str) -> tuple[str | None, int]:
        out = tok.replace("&apos;", "'").replace("&quot;", '"')
        if out in ("''", "`'", "'`"):  # a typed double quote keeps its form
            return out, len(tok)
        out = "".join(("`" if left else "'") if c == "'" else
                      ("``" if left else "''") if c == '"' else _QUOTE_MAP.get(c, c)
                      for c in out)
        return out, len(tok)
    return act


def _amp(tok: str) -> tuple[str | None, int]:
    return re.sub("(?i)&amp;", "&", tok), len(tok)


def _nbsp(tok: str) -> tuple[str | None, int]:
    return tok.replace(" ", "\u00a0"), len(tok)


def _phone(tok: str) -> tuple[str | None, int]:
    return tok.replace(" ", "\u00a0").replace("(", "-LRB-").replace(")", "-RRB-"), len(tok)


def _currency(tok: str) -> tuple[str | None, int]:
    return {"\u00a2": "cents", "\u00a3": "#"}.get(
        tok, "$" if tok in "\u0080\u00a4\u20a0\u20ac" else tok), len(tok)


def _dashes(tok: str) -> tuple[str | None, int]:
    return ("--" if 3 <= len(tok) <= 4 else tok), len(tok)


# (token pattern, trailing context or "", action); earlier rules win ties.
_RULES: tuple[tuple[str, str, _Action], ...] = (
    ("(?i:c\\+\\+|[cf]#)", "", _keep),
    ("(?i:cannot|'twas)", "", _push_back(3)),
    ("(?i:'tis|gonna|gotta|lemme|gimme|wanna)", "", _push_back(2)),
    (_SGML, "", _nbsp),
    ("&(?i:md|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", "", _const("--")),
    ("(?i:&amp;)", "", _const("&")),
    ("&(?:HT|TL|UR|LR|QC|QL|QR|odq|cdq|#[0-9]+);", "", _keep),
    (_WORD, _REDAUX, _keep),
    (_SWORD, _SREDAUX, _keep),
    (_WORD, "", _keep),
    ((f"{_APOS}[nN]{_APOS}?|[lLdDjJ]{_APOS}|(?i:dunkin|somethin|ol){_APOS}|{_APOS}(?i:em)"
     f"|(?i:diff){_APOSETC}(?i:rent)|[A-HJ-XZn]{_APOSETC}{_L}{{2}}{_L}*|{_APOS}[2-9]0(?i:s)"
     f"|{_APOS}(?i:till?)|{_L}{_L}*[aeiouyAEIOUY]{_APOSETC}[aeiouA-Z]{_L}*|{_APOS}(?i:cause)"
     "|(?i:cont'd\\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)|O{_APOSETC}o"),
     "", _keep),
    (f"[yY]{_APOS}", _L, _keep),
    (("(?i:ftp|svn|svn\\+ssh|http|https|mailto)://[^ \t\n\f\r\"<>|(){}]+"
     "[^ \t\n\f\r\"'<>|.!?(){},;:&\\[\\]-]"), "", _keep),
    (("(?:(?i:www)\\.(?:[^ \t\n\f\r\"<>|.!?(){},]+\\.)+[a-zA-Z]{2,4}"
     "|(?:[^ \t\n\f\r\"`'<>|.!?(){},\\-_$]+\\.)+(?i:com|net|org|edu))"
     "(?:/[^ \t\n\f\r\"<>|()]+[^ \t\n\f\r\"<>|.!?(){},-])?"), "", _keep),
    ("(?:&lt;|<)?[a-zA-Z0-9._%+-]+@[A-Za-z0-9][A-Za-z0-9.-]*[A-Za-z0-9](?:&gt;|>)?", "", _keep),
    (f"[@\uff20][a-zA-Z_][a-zA-Z_0-9]*|[#\uff03]{_L}(?:{_L}|{_D}|_)*(?:{_L}|{_D})", "", _keep),
    (_REDAUX, f"(?!{_L})", _apostrophes),
    (_SREDAUX, f"(?!{_L})", _apostrophes),
    (f"{_D}{{1,2}}[-/]{_D}{{1,2}}[-/]{_D}{{2,4}}", "", _keep),
    (_NUMBER, "", _keep),
    (f"(?:{_D}{{1,4}}[- \u00a0])?{_D}{{1,4}}(?:\\\\?/|\u2044){_D}{{1,4}}", "", _nbsp),
    ("[\u00bc\u00bd\u00be\u2153-\u215e]", "", lambda t: (_FRAC_CHARS.get(t, t), len(t))),
    (("-(?i:rrb|lrb|rcb|lcb|rsb|lsb)-|(?i:c\\.d\\.s|pro-|anti-|s(?:&|&amp;)p-500|s(?:&|&amp;)ls"
     f"|cap{_APOS}n|c{_APOS}est)"), "", _amp),
    (f"{_AL}+(?:-{_L}+){{0,2}}(?:\\\\?/{_AL}+(?:-{_L}+){{0,2}}){{1,2}}", "", _keep),
    ("[A-Z]*\\$|#", "", _keep),
    (("[\u00a2\u00a3\u00a4\u00a5\u0080\u20a0\u20aa\u20ac\u060b\u0e3f\u20a4\uffe0\uffe1\uffe5"
     "\uffe6]"), "", _currency),
    (f"{_ACRO}\\.", f"{_SPACENL}+{_ACRONYM_NEXT}(?:{_SPACENL}|[?!])", _acronym),
    ("(?i:ca|figs?|prop|nos?|sect?s?|arts?|bldg|pp|op)\\.", f"{_SPACENL}?{_D}", _keep),
    ("(?i:so|no)\\.", f"{_SPACENL}+(?i:africa|korea|cal)", _keep),
    ("(?i:pt[ey]|co)\\.", f"{_SPACE}(?i:ltd|lim)", _keep),
    (_ABBREV1, f"{_SPACENL}(?:{_SPACENL}|{_UPPER}|{_SGML})", _with_period_again),
    (_ABBREV1, "(?s:..)", _keep),
    (_ABBREV1, "\\Z", _with_period_again),
    (f"{_ABBREV4}\\.", "", _keep),
    (_ABBREV4, _SPACE, _keep),
    (_ACRO, _SPACENL, _keep),
    (f"{_APOS}[0-9][0-9]", _SPACENL, _keep),
    (f"{_WORD}\\.", "[,;:\u3001]", _keep),
    (("(?:\\([0-9]{2,3}\\)[ \u00a0]?|(?:\\+\\+?)?(?:[0-9]{2,4}[- \u00a0])?[0-9]{2,4}[- \u00a0])"
     "[0-9]{3,4}[- \u00a0]?[0-9]{3,5}|(?:(?:\\+\\+?)?[0-9]{2,4}\\.)?[0-9]{2,4}\\.[0-9]{3,4}"
     "\\.[0-9]{3,5}"), "", _phone),
    ("\"|&quot;|[`'\u0091\u0092\u2018\u2019]'", f"(?:{_AL}|\\$)", _quotes(True)),
    ("\"|&quot;|[`'\u0091\u0092\u2018\u2019]'", "", _quotes(False)),
    ("\x7f", "", _skip),
    ("<|&lt;", "", _const("<")),
    (">|&gt;", "", _const(">")),
    ("[<>]?[:;=][-o*']?[()DPdpO\\\\{@|\\[\\]]", f"(?!{_AL})",
     lambda t: (t.replace("(", "-LRB-").replace(")", "-RRB-"), len(t))),
    ("\\{", "", _const("-LCB-")),
    ("\\}", "", _const("-RCB-")),
    ("\\[", "", _const("-LSB-")),
    ("\\]", "", _const("-RSB-")),
    ("\\(", "", _const("-LRB-")),
    ("\\)", "", _const("-RRB-")),
    ("-+", "", _dashes),
    ("\\.\\.\\.+|[\u0085\u2026]|\\.[ \u00a0](?:\\.[ \u00a0])+\\.", "", _const("...")),
    ("@+|#+|_+", "", _keep),
    ("\\*+|(?:\\\\\\*){1,3}", "", _keep),
    ("[,;:\u3001]", "", _keep),
    ("[?!]+", "", _keep),
    ("[.\u00a1\u00bf\u037e\u0589\u061f\u06d4\u0700-\u0702\u07fa\u3002]", "", _keep),
    ("=+", "", _keep),
    ("/", "", _keep),
    (_THING, "", _keep),
    ("[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+\\.", "[,;:\u3001]", _amp),
    ("[A-Z]+(?:(?:[+&]|&amp;)[A-Z]+)+", "", _amp),
    (f"{_APOS}|[{_QUOTE_CHARS}]{{1,2}}", f"{_L}(?!{_SPACENL})", _quotes(True)),
    (f"{_APOS}|[{_QUOTE_CHARS}]{{1,2}}", f"[AaIiUu]{_SPACENL}", _quotes(True)),
    (f"{_APOS}|[{_QUOTE_CHARS}]{{1,2}}", "", _quotes(False)),
    (_REDAUX, "", _apostrophes),
    (_SREDAUX, "", _apostrophes),
    ("<<|>>", "", _keep),
    (_MISC, "", _keep),
    (f"\x00|{_SPACE}+|[\u200b\u200e\u200f\ufeff]", "", _skip),
    (_NEWLINE, "", _newline),
    ("&(?i:nbsp);", "", _skip),
)


class _PtbScanner:
    """Longest match over ``_RULES`` (token plus trailing context), first rule on ties.

    All rules are tried at once: each is an optional lookahead of one combined
    pattern whose groups ``2i+1`` (token and context) and ``2i+2`` (token) give
    rule ``i``'s match at the position.
    """

    def __init__(self) -> None:
        parts = []
        for tok, ctx, _ in _RULES:
            if re.compile(f"{tok}|{ctx}").groups:
                raise AssertionError(f"PTB rule {tok!r} must not capture")
            parts.append(f"(?:(?=(({tok}){ctx})))?")
        self._pattern = re.compile("".join(parts))
        self._actions = [act for _, _, act in _RULES]

    def scan(self, text: str) -> Iterator[str]:
        pos, end = 0, len(text)
        match, actions = self._pattern.match, self._actions
        while pos < end:
            if text[pos] == " ":  # only the whitespace rule starts with a space
                pos += 1
                continue
            regs = match(text, pos).regs  # type: ignore[union-attr]  # all-optional: matches
            ends = [r[1] for r in regs[1::2]]
            best_end = max(ends)
            if best_end <= pos:  # untokenizable (the jar drops it with a warning)
                pos += 1
                continue
            best = ends.index(best_end)  # the first rule of the longest matches
            a, b = regs[2 * best + 2]
            token, consumed = actions[best](text[a:b])
            pos += max(consumed, 1)
            if token is not None:
                yield token


_SCANNER: _PtbScanner | None = None
_LINE_BREAKS = re.compile("[\r\n\u2028\u2029\u000b\u000c\u0085]")


def _batch_text(captions: Sequence[str]) -> str:
    """The batch as one text, a caption a line (line breaks inside a caption become spaces)."""
    if isinstance(captions, str):
        raise ConfigError("metrics: expected a sequence of captions to tokenize, got one str")
    return "\n".join(_LINE_BREAKS.sub(" ", c) for c in captions)


def _drop_punctuation(lines: Sequence[Sequence[str]]) -> list[str]:
    return [" ".join(t for t in line if t not in PTB_PUNCTUATION) for line in lines]


def ptb_tokens_python(captions: Sequence[str]) -> list[list[str]]:
    """PTB tokens (lower-cased, punctuation kept) of each caption, in pure Python."""
    global _SCANNER
    if _SCANNER is None:
        _SCANNER = _PtbScanner()
    lines: list[list[str]] = [[]]
    for token in _SCANNER.scan(_batch_text(captions)):
        if token == _NL:
            lines.append([])
        else:
            lines[-1].append(token.lower())
    return lines[:len(captions)] + [[] for _ in range(len(captions) - len(lines))]


def ptb_jar_path() -> Path | None:
    """The CoreNLP jar shipped with pycocoevalcap, or None when that is not installed."""
    try:
        from pycocoevalcap.tokenizer import ptbtokenizer
    except ImportError:
        return None
    jar = Path(ptbtokenizer.__file__).with_name(ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    return jar if jar.is_file() else None


def ptb_tokens_jar(captions: Sequence[str], *, timeout_s: float = 600.0) -> list[list[str]]:
    """PTB tokens (lower-cased, punctuation kept) of each caption from the CoreNLP jar.

    Raises:
        ConfigError: pycocoevalcap or Java is missing, or the tokenizer fails.
    """
    text = _batch_text(captions)
    jar = ptb_jar_path()
    if jar is None:
        raise ConfigError("metrics: the 'jar' tokenizer needs pycocoevalcap "
                          "(pip install 'streamcap[eval]')")
    reason = java_available()
    if reason is not None:
        raise ConfigError(f"metrics: the 'jar' tokenizer needs Java: {reason}")
    java = shutil.which("java") or "java"
    try:
        done = subprocess.run(
            [java, "-cp", str(jar), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", "-encoding", "utf-8"],
            input=text.encode("utf-8"), capture_output=True, timeout=timeout_s, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        raise ConfigError(f"metrics: the PTB tokenizer jar {jar} failed ({exc})") from exc
    lines = done.stdout.decode("utf-8").split("\n")
    out = [[t for t in line.rstrip().split(" ") if t] for line in lines[:len(captions)]]
    return out + [[] for _ in range(len(captions) - len(out))]


def ptb_tokenize(captions: Sequence[str], *,
                 tokenizer: TokenizerName = DEFAULT_TOKENIZER) -> list[str]:
    """Tokenize a batch like pycocoevalcap's ``PTBTokenizer``: space-joined, punctuation dropped.

    Args:
        captions: The batch (pycocoevalcap tokenizes references and candidates as two batches).
        tokenizer: ``"python"`` (this module's scanner) or ``"jar"`` (the CoreNLP jar of
            pycocoevalcap through Java).

    Raises:
        ConfigError: an unknown tokenizer, or the jar cannot run.
    """
    if tokenizer == "python":
        return _drop_punctuation(ptb_tokens_python(captions))
    if tokenizer == "jar":
        return _drop_punctuation(ptb_tokens_jar(captions))
    raise ConfigError(f"metrics: unknown tokenizer {tokenizer!r}; expected one of "
                      f"{', '.join(TOKENIZERS)}")


def tokenize(text: str) -> str:
    """One caption alone through :func:`ptb_tokenize`: ``"A dog's bark."`` -> ``"a dog 's bark"``."""
    return ptb_tokenize([text])[0]


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def _check(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if isinstance(candidates, str):
        raise ConfigError("metrics: expected a sequence of candidate captions, got one str")
    if len(candidates) != len(references):
        raise ConfigError(f"metrics: {len(candidates)} candidates but {len(references)} "
                          f"reference lists")
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ConfigError(f"metrics: references[{i}] must be a non-empty list of captions")


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]],
         n: int = 4) -> list[float]:
    """Corpus BLEU-1..n on tokenized text (COCO definition, closest reference length).

    Returns:
        ``[BLEU-1, ..., BLEU-n]``.
    """
    _check(candidates, references)
    tiny, small = 1e-15, 1e-9
    correct = [0] * n
    guess = [0] * n
    test_len = ref_len = 0
    for cand, refs in zip(candidates, references, strict=True):
        words = cand.split()
        counts = _ngrams(words, n)
        max_ref: dict[tuple[str, ...], int] = {}
        lengths = []
        for ref in refs:
            rw = ref.split()
            lengths.append(len(rw))
            for gram, c in _ngrams(rw, n).items():
                max_ref[gram] = max(max_ref.get(gram, 0), c)
        test_len += len(words)
        ref_len += min((abs(length - len(words)), length) for length in lengths)[1]
        for k in range(n):
            guess[k] += max(0, len(words) - k)
        for gram, c in counts.items():
            correct[len(gram) - 1] += min(max_ref.get(gram, 0), c)
    scores = []
    product = 1.0
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + tiny) / (ref_len + small)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, start=1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def rouge_l(candidates: Sequence[str], references: Sequence[Sequence[str]],
            beta: float = 1.2) -> tuple[float, list[float]]:
    """ROUGE-L F-measure (max precision and max recall over references), mean and per caption."""
    _check(candidates, references)
    per: list[float] = []
    for cand, refs in zip(candidates, references, strict=True):
        c = cand.split()
        precs, recs = [], []
        for ref in refs:
            r = ref.split()
            lcs = _lcs(r, c)
            precs.append(lcs / len(c) if c else 0.0)
            recs.append(lcs / len(r) if r else 0.0)
        p, r_ = max(precs), max(recs)
        per.append((1 + beta**2) * p * r_ / (r_ + beta**2 * p) if p and r_ else 0.0)
    return (float(np.mean(per)) if per else 0.0), per


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4,
            sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D (document frequencies from this corpus's references), mean and per caption."""
    _check(candidates, references)
    crefs = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    ctest = [_ngrams(c.split(), n) for c in candidates]
    df: Counter[tuple[str, ...]] = Counter()
    for refs in crefs:
        for gram in {g for r in refs for g in r}:
            df[gram] += 1
    log_n = math.log(float(len(crefs)))

    def vec(counts: Counter[tuple[str, ...]]
            ) -> tuple[list[dict[tuple[str, ...], float]], list[float], int]:
        v: list[dict[tuple[str, ...], float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            v[k][gram] = tf * (log_n - math.log(max(1.0, df[gram])))
            norm[k] += v[k][gram] ** 2
            if k == 1:  # the COCO code measures length in bigrams
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    per: list[float] = []
    for test, refs in zip(ctest, crefs, strict=True):
        vh, nh, lh = vec(test)
        total = np.zeros(n)
        for ref in refs:
            vr, nr, lr = vec(ref)
            for k in range(n):
                val = sum(min(x, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, x in vh[k].items())
                if nh[k] != 0 and nr[k] != 0:
                    val /= nh[k] * nr[k]
                total[k] += val * math.exp(-((lh - lr) ** 2) / (2 * sigma**2))
        per.append(float(np.mean(total)) / len(refs) * 10.0)
    return (float(np.mean(per)) if per else 0.0), per


def vocabulary_size(captions: Sequence[str], *,
                    tokenizer: TokenizerName = DEFAULT_TOKENIZER) -> int:
    """Number of distinct tokens over ``captions`` (after :func:`ptb_tokenize`)."""
    return len({w for c in ptb_tokenize(captions, tokenizer=tokenizer) for w in c.split()})


def java_available() -> str | None:
    """None when ``java -version`` runs, else why not."""
    java = shutil.which("java")
    if java is None:
        return "no 'java' executable on PATH (install a Java runtime, e.g. default-jre-headless)"
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"'java -version' failed ({exc})"
    return None


def meteor(candidates: Sequence[str], references: Sequence[Sequence[str]]
           ) -> tuple[float | None, str | None]:
    """METEOR 1.5 through pycocoevalcap's jar on tokenized text.

    Returns:
        ``(score, None)``, or ``(None, reason)`` when pycocoevalcap or Java is missing
        or the scorer fails.
    """
    _check(candidates, references)
    try:
        from pycocoevalcap.meteor.meteor import Meteor
    except ImportError:
        return None, "pycocoevalcap is not installed (pip install 'streamcap[eval]')"
    reason = java_available()
    if reason is not None:
        return None, reason
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [c] for i, c in enumerate(candidates)}
    try:
        scorer = Meteor()
        try:
            score, _ = scorer.compute_score(gts, res)
        finally:
            close = getattr(scorer, "close", None)
            if callable(close):
                close()
    except Exception as exc:  # noqa: BLE001 - a Java child can fail in many ways
        return None, f"METEOR scorer failed ({type(exc).__name__}: {exc})"
    return float(score), None


@dataclass(frozen=True, slots=True, kw_only=True)
class CaptionScores:
    """Corpus caption metrics; metrics that could not run are in ``unavailable``."""

    scores: Mapping[str, float]
    unavailable: Mapping[str, str] = field(default_factory=dict)
    per_caption: Mapping[str, list[float]] = field(default_factory=dict)


SPICE_UNAVAILABLE = ("SPICE needs the Stanford CoreNLP 3.6.0 models, which pycocoevalcap "
                     "downloads on first use; not run offline")


def caption_metrics(candidates: Sequence[str], references: Sequence[Sequence[str]], *,
                    with_meteor: bool = True,
                    tokenizer: TokenizerName = DEFAULT_TOKENIZER) -> CaptionScores:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and vocabulary size of ``candidates``.

    Candidates and references are tokenized as two batches, as pycocoevalcap
    does (see :func:`ptb_tokenize` for ``tokenizer``).

    Keys: ``bleu_1`` .. ``bleu_4``, ``meteor``, ``rouge_l``, ``cider_d``,
    ``vocabulary``. SPICE and SPIDEr are always in ``unavailable``.

    Raises:
        ConfigError: mismatched inputs, an unknown tokenizer, or ``"jar"`` without Java.
    """
    _check(candidates, references)
    cands = ptb_tokenize(candidates, tokenizer=tokenizer)
    flat = ptb_tokenize([r for rs in references for r in rs], tokenizer=tokenizer)
    refs: list[list[str]] = []
    for rs in references:
        refs.append(flat[:len(rs)])
        flat = flat[len(rs):]
    scores: dict[str, float] = {}
    unavailable: dict[str, str] = {"spice": SPICE_UNAVAILABLE, "spider": SPICE_UNAVAILABLE}
    for k, value in enumerate(bleu(cands, refs), start=1):
        scores[f"bleu_{k}"] = value
    scores["rouge_l"], rouge_per = rouge_l(cands, refs)
    scores["cider_d"], cider_per = cider_d(cands, refs)
    if with_meteor:
        value_m, reason = meteor(cands, refs)
        if value_m is None:
            unavailable["meteor"] = reason or "unknown"
        else:
            scores["meteor"] = value_m
    else:
        unavailable["meteor"] = "not requested"
    scores["vocabulary"] = float(len({w for c in cands for w in c.split()}))
    return CaptionScores(scores=scores, unavailable=unavailable,
                         per_caption={"rouge_l": rouge_per, "cider_d": cider_per})


class SentenceEmbedder(Protocol):
    """Maps sentences to vectors: float32 (N, D), any norm."""

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.float32]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class FenseScores:
    """FENSE-style scores: mean, per caption, similarity alone and fluency flags."""

    fense: float
    similarity: float
    per_caption: list[float]
    flagged: list[bool]


def fense(candidates: Sequence[str], references: Sequence[Sequence[str]],
          embed: SentenceEmbedder,
          error_probs: Callable[[Sequence[str]], Any] | None = None, *,
          threshold: float = 0.9, penalty: float = 0.9) -> FenseScores:
    """``mean cosine(candidate, references) x (1 - penalty x [error_prob > threshold])``.

    Args:
        candidates: Captions to score.
        references: Reference captions per candidate.
        embed: Sentence embedder (e.g. :class:`RetrieverTextEmbedder` or an SBERT wrapper).
        error_probs: Fluency error probability per caption (e.g.
            ``FluencyFilter.error_probs``); None scores similarity only.
        threshold: Error probability above which a caption is disfluent.
        penalty: Fraction of the similarity a disfluent caption loses.
    """
    _check(candidates, references)
    if not candidates:
        return FenseScores(fense=0.0, similarity=0.0, per_caption=[], flagged=[])
    flat = [r for refs in references for r in refs]
    vectors = np.asarray(embed([*candidates, *flat]), dtype=np.float64)
    vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cand_v, ref_v = vectors[: len(candidates)], vectors[len(candidates):]
    sims: list[float] = []
    at = 0
    for i, refs in enumerate(references):
        sims.append(float(np.mean(ref_v[at:at + len(refs)] @ cand_v[i])))
        at += len(refs)
    if error_probs is None:
        flagged = [False] * len(candidates)
    else:
        flagged = [bool(p > threshold) for p in np.asarray(error_probs(candidates)).tolist()]
    per = [s * (1 - penalty * f) for s, f in zip(sims, flagged, strict=True)]
    return FenseScores(fense=float(np.mean(per)), similarity=float(np.mean(sims)),
                       per_caption=per, flagged=flagged)


class RetrieverTextEmbedder:
    """The retriever's text tower as a :class:`SentenceEmbedder` (joint space, L2-normalised).

    Args:
        retriever: An ``AudioTextRetriever``.
        tokenizer: Its text tokenizer.
        max_length: Token limit.
        batch_size: Sentences per forward pass.
    """

    def __init__(self, retriever: Any, tokenizer: Any, *, max_length: int = 64,
                 batch_size: int = 64) -> None:
        self.retriever = retriever
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    def __call__(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        import torch

        parts = []
        device = next(self.retriever.parameters()).device
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(list(texts[start:start + self.batch_size]), padding=True,
                                     truncation=True, max_length=self.max_length,
                                     return_tensors="pt")
                out = self.retriever.embed_text(enc["input_ids"].to(device),
                                                enc["attention_mask"].to(device))
                parts.append(out.float().cpu().numpy())
        if not parts:
            return np.zeros((0, 1), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetrievalScores:
    """Ranking metrics of a retrieval direction (fractions in [0, 1]; ranks 1-based)."""

    r1: float
    r5: float
    r10: float
    map10: float
    median_rank: float
    mean_rank: float


def retrieval_metrics(similarity: npt.ArrayLike, relevant: npt.ArrayLike) -> RetrievalScores:
    """R@1/5/10 and mAP@10 of ranking the columns for every row (query).

    Ties are broken by column index (stable). Ranks are 1-based and are those
    of each query's best-ranked relevant item. ``median_rank`` (medR) is the
    median of these 1-based ranks as ``numpy.median`` takes it, so an even
    number of queries averages the two middle ranks (ranks 1, 2, 3, 4 give
    2.5); ``mean_rank`` is their mean. mAP@10 is, per query,
    ``sum_{k<=10} P@k x rel_k / min(n_relevant, 10)``, averaged (with one
    relevant item: ``1/rank`` if rank <= 10, else 0).

    Args:
        similarity: float (Q, C): higher = more similar.
        relevant: bool (Q, C): True where column c is a correct answer to query q.

    Raises:
        ConfigError: shapes differ, or a query has no relevant item.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    rel = np.asarray(relevant, dtype=bool)
    if sim.ndim != 2 or sim.shape != rel.shape:
        raise ConfigError(f"retrieval_metrics: expected similarity and relevant of the same "
                          f"(Q, C) shape, got {sim.shape} and {rel.shape}")
    n_rel = rel.sum(axis=1)
    if sim.shape[0] == 0 or np.any(n_rel == 0):
        bad = np.flatnonzero(n_rel == 0)[:5].tolist()
        raise ConfigError(f"retrieval_metrics: queries {bad} have no relevant item")
    order = np.argsort(-sim, axis=1, kind="stable")
    hits = np.take_along_axis(rel, order, axis=1)
    first = hits.argmax(axis=1) + 1
    top = hits[:, :10].astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, top.shape[1] + 1)
    ap = (precision * top).sum(axis=1) / np.minimum(n_rel, 10)
    return RetrievalScores(r1=float(np.mean(first <= 1)), r5=float(np.mean(first <= 5)),
                           r10=float(np.mean(first <= 10)), map10=float(np.mean(ap)),
                           median_rank=float(np.median(first)), mean_rank=float(np.mean(first)))


def audio_text_retrieval(similarity: npt.ArrayLike, text_audio: Sequence[int]
                         ) -> dict[str, RetrievalScores]:
    """Both directions from an audio x text similarity matrix.

    Args:
        similarity: float (A, T) audio-text similarities.
        text_audio: For every text column, the index of its audio row.

    Returns:
        ``{"text_to_audio": ..., "audio_to_text": ...}``.
    """
    sim = np.asarray(similarity, dtype=np.float64)
    owner = np.asarray(text_audio, dtype=np.int64)
    if sim.ndim != 2 or owner.shape != (sim.shape[1],):
        raise ConfigError(f"audio_text_retrieval: expected text_audio of length "
                          f"{sim.shape[1] if sim.ndim == 2 else '?'}, got {owner.shape}")
    rel = owner[None, :] == np.arange(sim.shape[0])[:, None]
    return {"text_to_audio": retrieval_metrics(sim.T, rel.T),
            "audio_to_text": retrieval_metrics(sim, rel)}
