"""How people type a prompt for one emoji: the phrasings of a single-emoji caption.

The corpus caption of a single emoji is "NAME, STYLE" ("dog face, twemoji style"). People type "dog face",
"a dog face", "Dog face emoji" or "the dog face emoji, twemoji style". `phrasings` lists those variants for
one concept in one style, `plain_phrasings` the ones without a style. Pure and deterministic: the same
name and style always give the same list in the same order, with no duplicates.

The templates, for a name N (as captions write it: "dog face") and its article form "a N" / "an N":

    N                 a N               N emoji           a N emoji         the N emoji
    Capitalised N     A N               Capitalised N emoji

each once as it is (a plain phrasing: no style) and once followed by ", STYLE". The list starts with the
corpus caption itself ("N, STYLE"), then the other styled phrasings, then the plain ones. A phrasing
without a style names no style, so it is written on the rows of *both* styles of a concept: a model
trained on them answers a plain prompt in either style, which is what a missing style means.

The article is a spelling rule, not a grammar: no article when the head noun looks plural ("cherries",
"french fries", "two hearts"; the head of "face with tears of joy" is "face") or the name is a time ("one
oclock", "one thirty"); "an" before a vowel letter except where the vowel is said "you"/"wun" ("a unicorn",
"a one piece swimsuit"), and before a silent h ("an hourglass done"). Where no article fits, the article
templates are left out. Mass nouns still get one ("a popcorn"): the bare name is always in the list.
"""
from __future__ import annotations

# Word endings that look plural but are singular ("bus", "cactus", "glass", "iris", "rhinoceros").
_SINGULAR_ENDINGS = ("ss", "us", "is", "ys", "os", "ics")
_NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "hundred")
# Words that end a name's head noun: "face with tears of joy" is about one face, "nest with eggs" one nest.
_AFTER_HEAD = ("with", "without", "in", "of", "over", "on", "under", "holding", "showing", "and", "for", "at")
_A_BEFORE_VOWEL = ("uni", "use", "usb", "eu", "one", "ewe", "ufo", "ukulele", "urn")  # said with a consonant
_AN_BEFORE_H = ("hour", "honest", "honour", "honor", "heir")  # silent h


def _plural(word: str) -> bool:
    return word.endswith("s") and not word.endswith(_SINGULAR_ENDINGS)


def article(name: str) -> str | None:
    """'a' or 'an' for a caption name, or None where no article fits: a plural head noun ("cherries",
    "two hearts", but not "face with tears of joy") or a time ("one o'clock", "one thirty")."""
    words = name.lower().split()
    if not words:
        return None
    head = words
    for i, w in enumerate(words[1:], 1):
        if w in _AFTER_HEAD:
            head = words[:i]
            break
    first, last = words[0], head[-1]
    if _plural(last) or (first in _NUMBER_WORDS and last in ("oclock", "thirty")):
        return None
    if first.startswith(_AN_BEFORE_H):
        return "an"
    if first[0] in "aeiou" and not first.startswith(_A_BEFORE_VOWEL):
        return "an"
    return "a"


def caption_name(icon: str) -> str:
    """An icon's name as captions write it: "dog-face" -> "dog face"."""
    return icon.replace("-", " ")


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def plain_phrasings(name: str) -> list[str]:
    """The phrasings of a concept with no style, in a fixed order: "dog face", "a dog face",
    "dog face emoji", "a dog face emoji", "the dog face emoji", "Dog face", "A dog face", "Dog face emoji"."""
    name = " ".join(name.split())
    art = article(name)
    out = [name]
    if art:
        out.append(f"{art} {name}")
    out.append(f"{name} emoji")
    if art:
        out.append(f"{art} {name} emoji")
    out += [f"the {name} emoji", _cap(name)]
    if art:
        out.append(_cap(f"{art} {name}"))
    out.append(_cap(f"{name} emoji"))
    return list(dict.fromkeys(out))  # a name that starts upper-case makes some of them equal


def phrasings(name: str, style: str) -> list[str]:
    """Every phrasing of a concept in one style: the corpus caption "NAME, STYLE" first, then the other
    styled phrasings ("a dog face, twemoji style", "the dog face emoji, twemoji style", ...), then the plain
    ones ("dog face", "a dog face", "Dog face emoji", ...). `name` is the caption name ("dog face"), `style`
    the caption style ("twemoji style")."""
    plain = plain_phrasings(name)
    return list(dict.fromkeys([f"{p}, {style}" for p in plain] + plain))
