"""The tiny world: a toy language of questions about topics, answers a tiny policy can learn, and the
synthetic preference that the tiny judge (ranker) is trained on.

What the tiny judge prefers, and why: answers that close with a friendly sign-off ("Hope this helps!")
and carry no "um" fillers. The base policy, trained on answers that have the sign-off only 30% of the
time and fillers 30% of the time, already writes both kinds, so self-play can find its own better answers
and make them more likely: exactly what SPPO does with a real policy and PairRM. The preference is about
content, not length, so the length-controlled win rate should move with the raw one.
"""
import random

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


def make_prompts(rng, n):
    """n distinct-looking question prompts (topics and phrasings drawn at random)."""
    return [rng.choice(QUESTIONS).format(t=rng.choice(list(TOPICS))) for _ in range(n)]


def topic_of(prompt):
    return next((t for t in TOPICS if t in prompt), None)


def make_answer(rng, prompt, p_sign_off=P_SIGN_OFF, p_filler=P_FILLER):
    """One answer of 1-3 sentences about the prompt's topic, in the style of the base policy's data."""
    t = topic_of(prompt) or rng.choice(list(TOPICS))
    parts = []
    for _ in range(rng.randint(1, 3)):
        a, b = rng.sample(TOPICS[t], 2)
        s = rng.choice(SENTENCES).format(t=t, T=t.capitalize(), a=a, b=b)
        if rng.random() < p_filler:
            s = f"{FILLER} {s[0].lower()}{s[1:]}"
        parts.append(s)
    if rng.random() < p_sign_off:
        parts.append(SIGN_OFF)
    return " ".join(parts)


def judge_score(response):
    """The synthetic preference: +1 for closing with the sign-off, -1 for each filler."""
    return float(response.rstrip().endswith(SIGN_OFF)) - response.count(FILLER)


def corpus(seed, n):
    """(prompt, answer) pairs for training the base policy and the tokenizer."""
    rng = random.Random(seed)
    return [(p, make_answer(rng, p)) for p in make_prompts(rng, n)]


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
