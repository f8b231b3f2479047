"""Documents the project writes itself (no borrowed text): a station logbook for demos and
tests, filler for needle-in-a-haystack. Deterministic for a given seed."""
from __future__ import annotations

import random

_PLACES = ["the north ridge", "the harbour", "the weather mast", "the greenhouse", "the east jetty",
           "the pump house", "the radio hut", "the old quarry", "the seal colony", "the tide gauge"]
_EVENTS = [
    ("replaced a cracked pane at {place}", "maintenance"),
    ("logged a gust of {n} knots at {place}", "weather"),
    ("counted {n} seals near {place}", "wildlife"),
    ("repaired the generator belt after {n} hours of running", "maintenance"),
    ("measured a tide {n} centimetres above the forecast at {place}", "weather"),
    ("harvested {n} kilograms of potatoes from {place}", "supplies"),
    ("heard a supply ship on the radio, {n} hours late", "supplies"),
    ("found {n} storm petrel nests at {place}", "wildlife"),
    ("recalibrated the barometer, which had drifted by {n} hectopascals", "maintenance"),
    ("saw fog roll in over {place} for {n} hours", "weather"),
]
_NAMES = ["Ines", "Tomas", "Aiko", "Bram", "Oluwa", "Maren"]
_MONTHS = ["March", "April", "May", "June"]


def station_logbook(days: int = 60, seed: int = 0) -> str:
    """A markdown logbook of a small island research station: one entry per day."""
    rng = random.Random(seed)
    lines = ["# Logbook of Skerry Island research station", "",
             "Six people keep the station running through spring. Each day one of them writes "
             "what happened: the weather, the wildlife, repairs and supplies.", ""]
    for day in range(days):
        month, date = _MONTHS[day // 30 % len(_MONTHS)], day % 30 + 1
        writer = _NAMES[day % len(_NAMES)]
        lines.append(f"## {month} {date}")
        for _ in range(rng.randint(2, 4)):
            template, _kind = rng.choice(_EVENTS)
            lines.append(f"{writer} {template.format(place=rng.choice(_PLACES), n=rng.randint(2, 60))}.")
        if day % 10 == 9:
            lines.append(f"Ten-day note: the team met in the radio hut; {rng.choice(_NAMES)} asked for "
                         f"more spare parts and {rng.choice(_NAMES)} proposed a new watch rota.")
        lines.append("")
    return "\n".join(lines)


def filler(sentences: int, seed: int = 0) -> list[str]:
    """Neutral sentences to hide a needle in."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        template, _ = rng.choice(_EVENTS)
        out.append(f"{rng.choice(_NAMES)} {template.format(place=rng.choice(_PLACES), n=rng.randint(2, 60))}.")
    return out
