"""A preference written as Python, for SmolLM2-135M-Instruct's answers (rank.py and evaluate.py with
--ranker examples/smollm2/rule.py:score).

What a person asking a small model short questions wants, and what it can reach within a short budget:
    finished     the answer ends on its own within MAX_WORDS: its last line ends a sentence, a list item or
                 a code block. The rule reads text only, and an answer cut off by the token limit may end
                 on a full stop by chance; at the demo's budget (192 tokens, ~140 words of prose) a cut
                 answer is longer than MAX_WORDS, so it never counts as finished                    +1
    on topic     the share of the prompt's content words that the answer uses                       +1 x share
    length       near TARGET_WORDS: -0.5 per doubling or halving away from it, so a one-line
                 "Sure!" loses as surely as a ramble                                           -0.5 |log2(w / T)|
    no loops     repeated sentences or lines (a small model's failure) cost their share          -2 x share
    empty        fewer than 3 words                                                                  -3

Each term is bounded, so no single trick (padding, stopping early, echoing the prompt) wins alone: echoing the
prompt is short and repeats it, stopping early loses on length, rambling gets cut and loses "finished".
"""
import math
import re

TARGET_WORDS = 40
MAX_WORDS = 100
STOP = set("a an and are as at be by can do does for from give how i in is it me my of on or should that the "
           "this to what when which who why with write you your explain list describe short simple".split())
FINAL = re.compile(r"""([.!?)\]"'`*]|```)\s*$""")


def content_words(text):
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 2 and w not in STOP}


def repeated_share(text):
    """The share of sentences (or lines) that repeat an earlier one, after normalising case and spacing."""
    parts = [p.strip().lower() for p in re.split(r"(?<=[.!?])\s+|\n+", text) if len(p.strip()) > 8]
    return 1 - len(set(parts)) / len(parts) if parts else 0.0


def score(prompt: str, response: str) -> float:
    words = len(response.split())
    if words < 3:
        return -3.0
    finished = 1.0 if words <= MAX_WORDS and FINAL.search(response.strip()) else 0.0
    asked = content_words(prompt)
    on_topic = len(asked & content_words(response)) / len(asked) if asked else 0.0
    length = -0.5 * abs(math.log2(words / TARGET_WORDS))
    return finished + on_topic + length - 2.0 * repeated_share(response)
