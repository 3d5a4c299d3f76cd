"""The corpus vocabulary: which emoji, which scene objects, which background colours.

Its own small module so that the evaluation (which reads scenes by these names and colours) does not
import the corpus builder with its npm/resvg machinery.
"""
from __future__ import annotations

# Curated so a ~20M-parameter teacher can learn it on CPU: whole objects with distinct shapes and
# colours. People & Body (mostly skin-tone/gender variants), Flags and Symbols (keycaps, arrows,
# signs that differ only by a glyph) add many near-duplicates and little visual variety.
DEFAULT_CATEGORIES = ("Smileys & Emotion", "Animals & Nature", "Food & Drink")
EXCLUDE_WORDS = ("skin-tone", "flag", "keycap")

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
