"""Caption cleaning the official PixArt-alpha / Open-Sora v1.0 checkpoints were trained with.

This follows `T5Embedder.text_preprocessing` of PixArt-alpha (`clean_caption` applied twice), regex for
regex and in the same order, so captions tokenize the way they did in training. Two third-party calls are
replaced with the standard library:

- `BeautifulSoup(caption, features="html.parser").text` -> `html.parser.HTMLParser` collecting text
  (bs4 wraps this very parser, so tags, comments and entities are handled alike);
- `ftfy.fix_text` -> its character-level fixes (line breaks, control characters, terminal escapes,
  full-width forms, Latin ligatures, curly quotes, NFC). ftfy's mojibake repair is a statistical model
  of encodings and has no stdlib equivalent; it is left out.
"""

import html
import re
import unicodedata
import urllib.parse as ul
from html.parser import HTMLParser

# ----------------------------------------------------------------------------------------------------------------
# Stand-ins for bs4 and ftfy
# ----------------------------------------------------------------------------------------------------------------


class _TextCollector(HTMLParser):
    """Keeps only character data (what bs4's `.text` returns); tags, comments and declarations are dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # entities become characters, as in bs4
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def _strip_html(text: str) -> str:
    """Remove HTML markup and unescape entities, like `BeautifulSoup(text, "html.parser").text`."""
    parser = _TextCollector()
    parser.feed(text)
    parser.close()  # flushes a trailing incomplete tag ("a <b") as text rather than losing it
    return "".join(parser.parts)


# ftfy.fix_character_width: full-width ASCII and half-width katakana -> their NFKC forms; ideographic space -> " "
_WIDTH_MAP = {i: unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)}
_WIDTH_MAP = {i: s for i, s in _WIDTH_MAP.items() if s != chr(i)}
_WIDTH_MAP[0x3000] = " "
# ftfy.fix_latin_ligatures: the Latin presentation forms (ﬁ, ﬂ, ...) and the Dutch/Croatian digraphs
_LIGATURE_CODES = [*range(0xFB00, 0xFB07), 0x132, 0x133, *range(0x1C4, 0x1CD)]
_LIGATURES = {i: unicodedata.normalize("NFKC", chr(i)) for i in _LIGATURE_CODES}
# ftfy.remove_control_chars: C0 controls except \t \n \f \r, DEL, deprecated format chars, BOM, interlinear marks
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f\u206a-\u206f\ufeff\ufff9-\ufffc]")
_TERMINAL_ESCAPE = re.compile(r"\x1b\[(?:\d|;)*[a-zA-Z]")


def _fix_text(text: str) -> str:
    """The character-level part of `ftfy.fix_text` (see the module docstring for what is not covered)."""
    text = _TERMINAL_ESCAPE.sub("", text)
    text = text.replace("\r\n", "\n")
    text = re.sub("[\r\u2028\u2029\u0085]", "\n", text)
    text = _CONTROL_CHARS.sub("", text)
    text = text.translate(_LIGATURES).translate(_WIDTH_MAP)
    text = re.sub("[\u02bc\u2018-\u201b]", "'", text)
    text = re.sub("[\u201c-\u201f]", '"', text)
    return unicodedata.normalize("NFC", text)


def _basic_clean(text: str) -> str:
    text = _fix_text(text)
    text = html.unescape(html.unescape(text))  # doubly escaped entities ("&amp;amp;") occur in scraped captions
    return text.strip()


# ----------------------------------------------------------------------------------------------------------------
# The PixArt-alpha cleaning
# ----------------------------------------------------------------------------------------------------------------

_URL_HTTP = re.compile(
    r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
)
_URL_WWW = re.compile(
    r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))"
)
# 31C0-31EF CJK strokes, 31F0-31FF katakana phonetic extensions, 3200-32FF enclosed CJK letters and months,
# 3300-33FF CJK compatibility, 3400-4DBF CJK ext. A, 4DC0-4DFF Yijing hexagrams, 4E00-9FFF CJK unified ideographs
_CJK = re.compile(r"[\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff]+")
_DASHES = re.compile(
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32"
    r"\uFE58\uFE63\uFF0D]+"
)
_BAD_PUNCT = re.compile(r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}")
_DASH_OR_UNDERSCORE = re.compile(r"(?:\-|\_)")


def _clean_once(caption: str) -> str:
    """One pass of PixArt-alpha's `T5Embedder.clean_caption`."""
    caption = ul.unquote_plus(str(caption))
    caption = caption.strip().lower()
    caption = re.sub("<person>", "person", caption)
    caption = _URL_HTTP.sub("", caption)
    caption = _URL_WWW.sub("", caption)
    caption = _strip_html(caption)
    caption = re.sub(r"@[\w\d]+\b", "", caption)  # @nickname
    caption = _CJK.sub("", caption)
    caption = _DASHES.sub("-", caption)  # every kind of dash -> "-"
    caption = re.sub(r"[`´«»“”¨]", '"', caption)  # quotes to one standard
    caption = re.sub(r"[‘’]", "'", caption)
    caption = re.sub(r"&quot;?", "", caption)
    caption = re.sub(r"&amp", "", caption)
    caption = re.sub(r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " ", caption)  # ip addresses
    caption = re.sub(r"\d:\d\d\s+$", "", caption)  # article ids
    caption = re.sub(r"\\n", " ", caption)  # a literal backslash-n left by bad escaping
    caption = re.sub(r"#\d{1,3}\b", "", caption)  # "#123"
    caption = re.sub(r"#\d{5,}\b", "", caption)  # "#12345.."
    caption = re.sub(r"\b\d{6,}\b", "", caption)  # "123456.."
    caption = re.sub(r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", "", caption)  # file names
    caption = re.sub(r"[\"\']{2,}", r'"', caption)  # """AUSVERKAUFT"""
    caption = re.sub(r"[\.]{2,}", r" ", caption)  # ellipses
    caption = _BAD_PUNCT.sub(" ", caption)  # ***AUSVERKAUFT***, #AUSVERKAUFT
    caption = re.sub(r"\s+\.\s+", r" ", caption)  # " . "
    # this-is-my-cute-cat / this_is_my_cute_cat; a few hyphens ("red-haired") are kept
    if len(_DASH_OR_UNDERSCORE.findall(caption)) > 3:
        caption = _DASH_OR_UNDERSCORE.sub(" ", caption)
    caption = _basic_clean(caption)
    caption = re.sub(r"\b[a-zA-Z]{1,3}\d{3,15}\b", "", caption)  # jc6640
    caption = re.sub(r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", "", caption)  # jc6640vc
    caption = re.sub(r"\b\d+[a-zA-Z]+\d+\b", "", caption)  # 6640vc231
    caption = re.sub(r"(worldwide\s+)?(free\s+)?shipping", "", caption)
    caption = re.sub(r"(free\s)?download(\sfree)?", "", caption)
    caption = re.sub(r"\bclick\b\s(?:for|on)\s\w+", "", caption)
    caption = re.sub(r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", "", caption)
    caption = re.sub(r"\bpage\s+\d+\b", "", caption)
    caption = re.sub(r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", r" ", caption)  # j2d1a2a...
    caption = re.sub(r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", "", caption)  # sizes like 1920x1080 (latin x, cyrillic х, ×)
    caption = re.sub(r"\b\s+\:\s+", r": ", caption)
    caption = re.sub(r"(\D[,\./])\b", r"\1 ", caption)  # a space after punctuation glued to the next word
    caption = re.sub(r"\s+", " ", caption)
    # No strip here: the original discards the result of `caption.strip()` at this point, so the anchored
    # patterns below see a leading/trailing space and leave e.g. ' "quoted" ' alone. Kept for parity.
    caption = re.sub(r"^[\"\']([\w\W]+)[\"\']$", r"\1", caption)
    caption = re.sub(r"^[\'\_,\-\:;]", r"", caption)
    caption = re.sub(r"[\'\_,\-\:\-\+]$", r"", caption)
    caption = re.sub(r"^\.\S+$", "", caption)
    return caption.strip()


def clean_caption(text: str) -> str:
    """Clean a caption exactly as PixArt-alpha / Open-Sora v1.0 did for training (two passes of the cleaner).

    Lower-cases; removes URLs, HTML markup, @nicknames, CJK characters, IP addresses, file names, long numbers
    and product codes and shop phrases ("free shipping"); normalises dashes and quotes; collapses repeated
    quotes, dots and whitespace.

    >>> clean_caption("<p>A Red   Car</p> on https://example.com")
    'a red car on'
    """
    if not isinstance(text, str):
        raise TypeError(f"clean_caption expects a str, got {type(text).__name__}")
    # PixArt's text_preprocessing runs the cleaner twice: the first pass exposes patterns for the second
    return _clean_once(_clean_once(text))
