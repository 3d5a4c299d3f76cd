"""The corpus vocabulary: which emoji, which scene objects, which background colours.

Its own small module so that the evaluation (which reads scenes by these names and colours) does not
import the corpus builder with its npm/resvg machinery.
"""
from __future__ import annotations

# Curated so a ~20M-parameter teacher can learn it on CPU: whole objects with distinct shapes and
# colours. People & Body (mostly skin-tone/gender variants), Flags and Symbols (keycaps, arrows,
# signs that differ only by a glyph) add many near-duplicates and little visual variety.
DEFAULT_CATEGORIES = ("Smileys & Emotion", "Animals & Nature", "Food & Drink")
# `data build --categories wide`: the default three plus the categories of things a person asks for by name
# (a rocket, a car, a crown, a balloon, the sun). Still no People & Body (its variants), Flags or Symbols.
WIDE_CATEGORIES = DEFAULT_CATEGORIES + ("Travel & Places", "Activities", "Objects")
CATEGORY_SETS = {"default": DEFAULT_CATEGORIES, "wide": WIDE_CATEGORIES}
# Icon names dropped from any category: skin-tone variants, flags (and the few icons with a flag in them:
# mailboxes with lowered/raised flag, flag in hole) and keycaps. Fluent's skin tones are named "...-light",
# "...-medium-dark" etc., but no twemoji icon is, so taking the icons both sets have drops them too.
EXCLUDE_WORDS = ("skin-tone", "flag", "keycap")
# Gender variants are named with these as whole hyphen-separated words ("man-biking", "woman-biking",
# "family-man-girl", "men-holding-hands"); "snowman", "mans-shoe" or "womans-hat" are objects and stay.
# All of them sit in People & Body, so today this drops nothing in either category set: it is a guard.
GENDER_WORDS = ("man", "woman", "men", "women")

COLORS = {  # background colours for scenes, named as captions say them
    "white": (255, 255, 255), "red": (220, 50, 50), "blue": (50, 90, 220), "green": (60, 170, 70),
    "yellow": (240, 210, 60), "purple": (140, 70, 190), "orange": (240, 140, 40), "black": (20, 20, 20),
    "gray": (128, 128, 128), "pink": (240, 150, 190),
}
# Scene objects: a small, visually distinct vocabulary so that spatial relations are learnable.
SCENE_OBJECTS = (
    "red-apple", "dog-face", "cat-face", "banana", "grapes", "sun", "fire", "rocket", "star",
    "heart-suit", "pizza", "ghost", "frog", "tomato", "watermelon", "four-leaf-clover",
    "cherries", "penguin", "snowflake", "lemon", "fish", "rose", "mushroom", "crescent-moon",
)
