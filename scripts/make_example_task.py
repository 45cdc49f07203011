"""Build the example lm-eval task in tasks/botchan/ from the text of Botchan (Project Gutenberg).

    python scripts/make_example_task.py        # writes tasks/botchan/botchan.jsonl

Each item is a passage of two sentences whose last word is held out: the context is the passage up to
that word, the choices are the word and three distractors (last words of other picked sentences).
The same file serves a multiple-choice cloze, a generative next-word task and a rolling perplexity
task (see the YAMLs beside it). Deterministic: the same text always gives the same file.
"""
import json
import random
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts.fetch_text import fetch  # noqa: E402

OUT = ROOT / "tasks" / "botchan" / "botchan.jsonl"
N_ITEMS = 40
N_CHOICES = 4
SEED = 1234


def book_sentences(text: str) -> list[str]:
    # the novel runs from "CHAPTER I" to Gutenberg's END marker; lines are hard-wrapped, so join them
    body = text.split("\nCHAPTER I\n", 1)[1].split("*** END OF THIS PROJECT GUTENBERG EBOOK", 1)[0]
    lines = [line for line in body.splitlines() if not re.fullmatch(r"CHAPTER [IVXL]+\.?", line.strip())]
    body = " ".join(" ".join(lines).split())
    return re.split(r'(?<=[.!?])\s+(?=[A-Z"])', body)


def make_items(text: str, n_items: int = N_ITEMS) -> list[dict]:
    sentences = book_sentences(text)
    # a candidate: a plain sentence of 10-35 words ending in a lower-case word of 4+ letters and a period
    picks = [
        i for i, s in enumerate(sentences)
        if i > 0 and 10 <= len(s.split()) <= 35 and re.search(r" [a-z]{4,}\.$", s) and '"' not in s
    ]  # fmt: skip
    if len(picks) < n_items:
        raise ValueError(f"only {len(picks)} usable sentences, need {n_items}")
    picks = [picks[k * len(picks) // n_items] for k in range(n_items)]  # spread over the whole book
    answers = [sentences[i].rsplit(" ", 1)[1].rstrip(".") for i in picks]
    items = []
    for n, (i, answer) in enumerate(zip(picks, answers)):
        rng = random.Random(SEED + n)
        others = sorted({a for a in answers if a.lower() != answer.lower()})
        choices = rng.sample(others, N_CHOICES - 1) + [answer]
        rng.shuffle(choices)
        context = sentences[i - 1] + " " + sentences[i].rsplit(" ", 1)[0]
        items.append({
            "id": n, "context": context, "answer": answer, "choices": choices,
            "label": choices.index(answer), "text": f"{context} {answer}.",
        })  # fmt: skip
    return items


def main() -> None:
    items = make_items(fetch("botchan.txt").read_text(encoding="utf-8-sig"))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items), encoding="utf-8")
    tmp.replace(OUT)
    print(f"wrote {len(items)} items to {OUT}")


if __name__ == "__main__":
    main()
