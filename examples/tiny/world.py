"""The tiny world: a toy language of questions about topics, answers a tiny policy can learn, and the
synthetic preference that the tiny judge (ranker) is trained on.

What the tiny judge prefers, and why: answers that close with a friendly sign-off ("Hope this helps!")
and carry no "um" fillers. The base policy, trained on answers that have the sign-off only 30% of the
time and fillers 30% of the time, already writes both kinds, so self-play can find its own better answers
and make them more likely: exactly what SPPO does with a real policy and PairRM. The preference is about
content, not length, so the length-controlled win rate should move with the raw one.

That is world v1, the tests' (build.py --world-version 1): its decisive judge makes verdicts easy to check,
and it saturates within two iterations. World v2, the demo's (build.py's default), grades answers instead:
partial credit on four qualities (sign-off, opening, fillers, detail) and a judge that prefers by how much
better an answer is, with a mild liking for length on top, as real judges have; judge_score(y, 2) stays the
true quality, without the length term.
"""
import math
import random
import re

TOPICS = {
    "cats": ["soft", "playful", "curious", "quiet", "independent"],
    "dogs": ["loyal", "friendly", "energetic", "loud", "clever"],
    "rivers": ["long", "cold", "wide", "calm", "fast"],
    "mountains": ["tall", "rocky", "cold", "quiet", "old"],
    "books": ["long", "useful", "old", "thick", "exciting"],
    "music": ["loud", "calm", "happy", "old", "lively"],
    "trees": ["tall", "green", "old", "strong", "quiet"],
    "cities": ["busy", "loud", "large", "bright", "crowded"],
    "oceans": ["deep", "blue", "wide", "cold", "calm"],
    "birds": ["small", "fast", "colorful", "loud", "light"],
    "apples": ["sweet", "red", "crisp", "fresh", "green"],
    "trains": ["fast", "long", "loud", "useful", "busy"],
    "stars": ["bright", "distant", "old", "hot", "tiny"],
    "gardens": ["green", "quiet", "colorful", "fresh", "calm"],
    "computers": ["fast", "useful", "clever", "complex", "small"],
    "bicycles": ["light", "fast", "useful", "quiet", "simple"],
    "clouds": ["white", "soft", "light", "grey", "large"],
    "forests": ["green", "dark", "quiet", "old", "large"],
    "horses": ["strong", "fast", "calm", "loyal", "large"],
    "bridges": ["long", "strong", "old", "useful", "tall"],
    "deserts": ["hot", "dry", "wide", "quiet", "empty"],
    "islands": ["small", "green", "warm", "calm", "distant"],
    "robots": ["clever", "strong", "useful", "complex", "loud"],
    "cakes": ["sweet", "soft", "fresh", "rich", "tasty"],
}
QUESTIONS = ["Tell me about {t}.", "What are {t} like?", "Describe {t}.", "Say something about {t}.",
             "Why do people like {t}?", "What do you know about {t}?", "Can you explain {t}?",
             "Give me a few facts about {t}.", "Talk about {t}.", "How would you describe {t}?"]
SENTENCES = ["{T} are {a}.", "Many {t} are {a} and {b}.", "I think {t} are {a}.", "Some {t} are very {a}.",
             "Most {t} are {a}, and some are {b}.", "People say {t} are {a}."]
SIGN_OFF = "Hope this helps!"
FILLER = "Um,"

P_SIGN_OFF = 0.3  # how often the base policy's training answers close with the sign-off
P_FILLER = 0.3  # how often a sentence in them opens with a filler

# World v2 (build.py --world-version 2): graded preference, and a judge that mildly likes length.
OPENING = "Sure!"
DETAILED = [SENTENCES[1], SENTENCES[4]]  # the sentences that name two qualities
PLAIN = [x for x in SENTENCES if x not in DETAILED]
# the base policy's data: each quality present now and then, so self-play can find it and make it likelier
BASE_V2 = dict(p_sign_off=0.3, p_filler=0.3, p_open=0.15, p_detail=0.2)
LENGTH_BIAS = 0.006  # judged points per character
SHARPNESS = 1.2  # how decisive the v2 judge is per point of judged score


def make_prompts(rng, n):
    """n distinct-looking question prompts (topics and phrasings drawn at random)."""
    return [rng.choice(QUESTIONS).format(t=rng.choice(list(TOPICS))) for _ in range(n)]


def topic_of(prompt):
    return next((t for t in TOPICS if t in prompt), None)


def make_answer(rng, prompt, p_sign_off=P_SIGN_OFF, p_filler=P_FILLER, p_open=0.0, p_detail=None):
    """One answer of 1-3 sentences about the prompt's topic, in the style of the base policy's data.
    p_open and p_detail are world v2's (the opening, the share of two-adjective sentences); left at their
    defaults they draw nothing from rng, so world v1's answers stay exactly as they were."""
    t = topic_of(prompt) or rng.choice(list(TOPICS))
    parts = [OPENING] if p_open and rng.random() < p_open else []
    for _ in range(rng.randint(1, 3)):
        a, b = rng.sample(TOPICS[t], 2)
        pool = SENTENCES if p_detail is None else DETAILED if rng.random() < p_detail else PLAIN
        s = rng.choice(pool).format(t=t, T=t.capitalize(), a=a, b=b)
        if rng.random() < p_filler:
            s = f"{FILLER} {s[0].lower()}{s[1:]}"
        parts.append(s)
    if rng.random() < p_sign_off:
        parts.append(SIGN_OFF)
    return " ".join(parts)


def judge_score(response, version=1):
    """The true quality of an answer, by the world's rule (what the report calls the hidden score).
    v1: +1 for closing with the sign-off, -1 for each filler.
    v2: partial credit on several qualities: +1 sign-off, +0.5 an opening "Sure!", -0.5 per filler, and up to
        +0.5 for detail (the share of sentences that name two qualities of the topic). Best: 2."""
    if version == 1:
        return float(response.rstrip().endswith(SIGN_OFF)) - response.count(FILLER)
    text = response.strip()
    body = text.removeprefix(OPENING).removesuffix(SIGN_OFF)
    sentences = [x for x in re.split(r"(?<=\.)\s+", body.strip()) if x]
    detail = sum(" and " in x for x in sentences) / max(1, len(sentences))
    return (float(text.endswith(SIGN_OFF)) + 0.5 * text.startswith(OPENING) - 0.5 * text.count(FILLER)
            + 0.5 * detail)


def judged_score(response, version=1):
    """What the judge's verdicts follow: v1 the true quality; v2 also a mild liking for length, as PairRM and
    GPT-4 judges have (LENGTH_BIAS points per character: an extra sentence of ~25 characters is worth 0.15)."""
    return judge_score(response, version) + (LENGTH_BIAS * len(response) if version == 2 else 0.0)


def preference(a, b, version=1):
    """P(the judge prefers a to b), the label the ranker is trained on.
    v1: 1, 0, or 1/2 on a tie (a hard preference: any improvement wins outright, so win rates saturate fast).
    v2: sigmoid(SHARPNESS (J(a) - J(b))), Bradley-Terry on the judged score: a small improvement wins a little
        more often than not and only a large one wins almost always, so the win rate grows with the gain."""
    d = judged_score(a, version) - judged_score(b, version)
    if version == 1:
        return 0.5 if d == 0 else float(d > 0)
    return 1.0 / (1.0 + math.exp(-SHARPNESS * d))


def corpus(seed, n, version=1):
    """(prompt, answer) pairs for training the base policy and the tokenizer."""
    rng = random.Random(seed)
    rates = {} if version == 1 else BASE_V2
    return [(p, make_answer(rng, p, **rates)) for p in make_prompts(rng, n)]


def fit(model, steps, lr, batch_loss, seed, name, log=print):
    """The toy training loop both tiny models share: AdamW, one-cycle schedule, `steps` random batches.
    batch_loss(generator) draws a batch with the seeded generator and returns its loss."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        loss = batch_loss(g)
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"  {name} step {step:4d}/{steps}  loss {loss.item():.3f}")
    model.eval()
