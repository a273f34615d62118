"""Write the demo's training text: synthetic English generated here from a small grammar (no downloads).

    python tools/make_corpus.py                       # writes trainers/demo/corpus.txt (about 300 KB)
    python tools/make_corpus.py --kb 50 --out /tmp/x.txt

The text is deterministic for a given --seed, so the committed file can be regenerated exactly. It is
plain ASCII: a village chronicle of short paragraphs with recurring characters, places and habits, so a
small byte-level model has structure to learn (spelling, agreement, names, punctuation).
"""

from __future__ import annotations

import argparse
import os
import random

NAMES = ["Ada", "Bram", "Cora", "Dell", "Edwin", "Fay", "Gus", "Hilde", "Ivo", "June", "Kit", "Lena", "Milo",
         "Nora", "Otto", "Pia", "Quill", "Rosa", "Sam", "Tess"]
ROLES = ["baker", "miller", "smith", "weaver", "fisher", "shepherd", "carpenter", "potter", "teacher", "doctor",
         "sailor", "gardener"]
PLACES = ["the harbour", "the mill", "the market", "the old bridge", "the orchard", "the school", "the forge",
          "the chapel", "the meadow", "the lighthouse", "the inn", "the river bank", "the north road", "the square"]
TIMES = ["At dawn", "In the morning", "Before noon", "At midday", "In the afternoon", "Towards evening",
         "At dusk", "Late at night", "On market day", "After the rain", "In early spring", "When the snow came"]
ADJECTIVES = ["quiet", "busy", "cold", "bright", "grey", "warm", "windy", "narrow", "crowded", "empty", "green",
              "muddy", "golden", "old", "new", "tidy"]
OBJECTS = ["a basket of apples", "a loaf of bread", "a coil of rope", "a letter", "a lantern", "a bolt of cloth",
           "a jar of honey", "a sack of flour", "a fishing net", "a new hammer", "a clay pot", "a map of the coast",
           "a bundle of wool", "a pail of milk", "a small wooden boat", "a book of songs"]
VERBS_PAST = [("carried", "to"), ("brought", "to"), ("sold", "at"), ("found", "near"), ("mended", "at"),
              ("left", "at"), ("painted", "behind"), ("hid", "under"), ("bought", "at"), ("counted", "in")]
FEELINGS = ["glad", "tired", "worried", "proud", "curious", "hungry", "cheerful", "restless", "patient", "surprised"]
WEATHER = ["The sky was {adj} and the wind came from the sea.", "Rain fell on {place} all day.",
           "The air over {place} was {adj} and still.", "Fog rolled in from the water and hid {place}.",
           "The sun stood high above {place}.", "Snow lay thin on the roofs and on {place}."]
SAYINGS = ["Slow hands make straight seams.", "A full net is a heavy net.", "Bread waits for no one.",
           "Every bridge was once a plank.", "The river keeps its own time.", "Count twice, cut once.",
           "A lantern is a small sun.", "Who plants pears plants for heirs."]


class Village:
    """Characters with fixed roles and homes, so facts repeat across the text."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.role = {n: rng.choice(ROLES) for n in NAMES}
        self.home = {n: rng.choice(PLACES) for n in NAMES}

    def who(self) -> str:
        return self.rng.choice(NAMES)

    def sentence(self) -> str:
        r, a, b = self.rng, self.who(), self.who()
        kind = r.randrange(9)
        if kind == 0:
            return f"{a} the {self.role[a]} lived near {self.home[a]}."
        if kind == 1:
            verb, prep = r.choice(VERBS_PAST)
            return f"{r.choice(TIMES)}, {a} {verb} {r.choice(OBJECTS)} {prep} {r.choice(PLACES)}."
        if kind == 2:
            return r.choice(WEATHER).format(adj=r.choice(ADJECTIVES), place=r.choice(PLACES))
        if kind == 3 and a != b:
            return f"{a} asked {b}, \"Have you seen {r.choice(OBJECTS)}?\" and {b} said, \"Try {self.home[b]}.\""
        if kind == 4:
            return f"{a} felt {r.choice(FEELINGS)}, because the day at {r.choice(PLACES)} had been {r.choice(ADJECTIVES)}."
        if kind == 5:
            count = r.randint(2, 12)
            return f"The {self.role[a]} counted {count} {'boats' if count > 1 else 'boat'} by {r.choice(PLACES)}."
        if kind == 6:
            return f"As the old saying goes: {r.choice(SAYINGS)}"
        if kind == 7 and a != b:
            return f"{a} and {b} walked from {self.home[a]} to {self.home[b]} and talked about the {self.role[b]}."
        return f"{r.choice(PLACES).capitalize()} was {r.choice(ADJECTIVES)} that day."

    def paragraph(self, day: int) -> str:
        body = " ".join(self.sentence() for _ in range(self.rng.randint(3, 7)))
        return f"Day {day}. {body}"


def generate(kb: int, seed: int) -> str:
    village = Village(random.Random(seed))
    parts, size, day = [], 0, 1
    while size < kb * 1000:
        para = village.paragraph(day)
        parts.append(para)
        size += len(para) + 2
        day += 1
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(here, "..", "trainers", "demo", "corpus.txt"))
    parser.add_argument("--kb", type=int, default=300, help="approximate size in kilobytes (default 300)")
    parser.add_argument("--seed", type=int, default=1864)
    args = parser.parse_args(argv)
    text = generate(args.kb, args.seed)
    with open(args.out, "w", encoding="ascii") as f:
        f.write(text)
    print(f"wrote {len(text):,} bytes to {os.path.normpath(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
