"""Generate the small datasets the quickstart recipes and tests train on.

Everything here is written by this project: invented names and template sentences, so the data
can be shipped in the repo. Deterministic (fixed seed): running it again rewrites identical files.

    python recipes/data/make_toy_data.py            # writes recipes/data/toy_ner/ and toy_cls/
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

FIRST = ["Mara", "Tobin", "Elsa", "Kofi", "Ilse", "Rohan", "Noor", "Piet", "Yara", "Dmitri", "Lena",
         "Oskar", "Ama", "Haru", "Signe", "Tavi", "Bruno", "Zofia", "Emeka", "Ines"]
LAST = ["Vandersloot", "Okafor", "Lindqvist", "Marchetti", "Hollis", "Nakagawa", "Brandt", "Ferreira",
        "Quist", "Adeyemi", "Castellan", "Moreau"]
ORG = [["Brightwater", "Labs"], ["Kestrel", "Systems"], ["Northwind", "Bank"], ["Orbisoft"],
       ["Halcyon", "Foods"], ["Tessellate"], ["Redfern", "Motors"], ["Lumen", "Health"],
       ["Granite", "Capital"], ["Veloxa"], ["Pinecrest", "University"], ["Copperleaf", "Media"]]
LOC = [["Aldmere"], ["Port", "Selwyn"], ["Varnholt"], ["Quillon", "Bay"], ["Estrava"], ["Norrlund"],
       ["San", "Tobiel"], ["Kalvik"], ["Westmarch"], ["Oru", "Valley"], ["Dunmore"], ["Belcastro"]]
MISC = [["Zerran"], ["Aldmerian"], ["Harvest", "Cup"], ["Norrish"], ["Solstice", "Summit"], ["Kalvikan"]]

# Sentence templates: words, and slots {PER} {ORG} {LOC} {MISC}.
TEMPLATES = [
    "{PER} joined {ORG} in {LOC} last spring .",
    "{ORG} opened a new office in {LOC} .",
    "According to {PER} , the {MISC} talks in {LOC} went well .",
    "{PER} met {PER} at the {MISC} conference .",
    "Shares of {ORG} rose after {PER} spoke in {LOC} .",
    "The team from {LOC} won the {MISC} on Sunday .",
    "{PER} , a spokesperson for {ORG} , declined to comment .",
    "Flights between {LOC} and {LOC} resume next week .",
    "{ORG} and {ORG} agreed to merge , {PER} said .",
    "The {MISC} festival drew visitors from {LOC} .",
    "She said the weather was mild and the roads were quiet .",
    "Prices were stable for the third month in a row .",
    "{PER} will lead the new research group at {ORG} .",
    "Officials in {LOC} said {PER} had resigned .",
]


def _person(rng: random.Random) -> list[str]:
    return [rng.choice(FIRST)] + ([rng.choice(LAST)] if rng.random() < 0.7 else [])


def ner_sentence(rng: random.Random) -> tuple[list[str], list[str]]:
    tokens, tags = [], []
    for word in rng.choice(TEMPLATES).split():
        if word.startswith("{") and word.endswith("}"):
            kind = word[1:-1]
            span = {"PER": _person(rng), "ORG": rng.choice(ORG), "LOC": rng.choice(LOC),
                    "MISC": rng.choice(MISC)}[kind]
            tokens += span
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(span) - 1)
        else:
            tokens.append(word)
            tags.append("O")
    return tokens, tags


TOPICS = {
    "sports": ["The {LOC} side won the match by two goals .", "{PER} scored twice in the final minutes .",
               "The coach praised the defence after the game .", "Fans filled the stadium for the derby ."],
    "business": ["{ORG} reported higher profits this quarter .", "Investors sold shares of {ORG} .",
                 "The bank raised interest rates again .", "{PER} was named chief executive of {ORG} ."],
    "science": ["Researchers at {ORG} mapped a distant galaxy .", "The new telescope measured faint signals .",
                "{PER} published a study on coral reefs .", "A vaccine trial in {LOC} showed promise ."],
}


def cls_sentence(rng: random.Random) -> tuple[str, str]:
    label = rng.choice(sorted(TOPICS))
    text = rng.choice(TOPICS[label])
    text = text.replace("{LOC}", " ".join(rng.choice(LOC))).replace("{ORG}", " ".join(rng.choice(ORG)))
    text = text.replace("{PER}", " ".join(_person(rng)))
    return text, label


def write_ner(folder: Path, sizes: dict[str, int], rng: random.Random) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        with open(folder / f"{split}.conll", "w") as fh:
            fh.write("-DOCSTART- O\n\n")
            for _ in range(n):
                tokens, tags = ner_sentence(rng)
                fh.write("".join(f"{t} {g}\n" for t, g in zip(tokens, tags)) + "\n")


def write_cls(folder: Path, sizes: dict[str, int], rng: random.Random) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        with open(folder / f"{split}.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["text", "label"])
            for _ in range(n):
                writer.writerow(cls_sentence(rng))


def main(out: Path = Path(__file__).parent) -> None:
    rng = random.Random(20261124)
    write_ner(out / "toy_ner", {"train": 600, "validation": 150, "test": 150}, rng)
    write_cls(out / "toy_cls", {"train": 300, "validation": 90, "test": 90}, rng)


if __name__ == "__main__":
    main()
