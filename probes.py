"""
Coherence probes: does a model keep track of who has the ball, whose pet is whose, where they went, he or she,
and how someone feels? Bits per byte barely notices a model that forgets who holds the ball; these items do.

    python bench.py probes --checkpoint=out/ckpt.pt          # per kind, beside chance and an untrained model

An item is a TinyStories-style prefix, the right next word and a wrong one that fits the grammar as well (no a/an,
number or case to give it away). The model's answer is the candidate whose tokens get the higher total
log-probability after the prefix. Items come in mirrored pairs: the same story with the two roles swapped, so the
right word of one is the wrong word of the other. A model that prefers one name, or one word, gets one of the pair
right; and in half of each kind's templates the right word is the last candidate the prefix mentions, in the other
half it is not, so copying the last one mentioned scores half too. Chance is 50% for every kind.

The items are made from the templates below with names, things and places drawn from lists. The dev set (used to
choose the presets) and the held-out set draw from disjoint halves of every list. None of it is training data: the
models train on TinyStories text only.

After the items, a copy check (copy_check): whether a model can look a token up in its context at all.
"""
import random
import string

# Every template: (text, right slot, wrong slot). {A_he}, {A_his}, {A_His} are A's pronouns. A mirrored item swaps
# A and B, X and Y, and so on (SWAPS), so the right slot's value becomes the wrong one's.
KINDS = {
    "give": ("who has the thing after a give", [
        ("{A} and {B} were playing in the park. {A} had a {X}. {A} gave the {X} to {B}. Now the {X} belonged to",
         "B", "A"),
        ("{A} and {B} were playing in the park. {B} had a {X}, and {A} wanted it. {A} asked nicely, so {A} got the {X} "
         "from {B}. Now the {X} belonged to", "A", "B"),
    ]),
    "swap": ("what each one has after a swap", [
        ("{A} had a {X} and {B} had a {Y}. They wanted to try something new, so they swapped toys. Now {A} had the",
         "Y", "X"),
        ("{A} had a {X} and {B} had a {Y}. They wanted to try something new, so they swapped toys. Now {B} had the",
         "X", "Y"),
    ]),
    "pet": ("whose pet is whose", [
        ("{A} had a {P} and {B} had a {Q}. One morning, {A} took {A_his} pet out to play. {A_His} pet was a", "P", "Q"),
        ("{A} had a {P} and {B} had a {Q}. One morning, {B} took {B_his} pet out to play. {B_His} pet was a", "Q", "P"),
    ]),
    "creature": ("what kind of animal a named character is", [
        ("Once upon a time, there was a {P} named {N} and a {Q} named {M}. {N} and {M} were best friends. One day, {N} "
         "went out to find some food. {N} was a hungry little", "P", "Q"),
        ("Once upon a time, there was a {P} named {N} and a {Q} named {M}. {N} and {M} were best friends. One day, {M} "
         "went out to find some food. {M} was a hungry little", "Q", "P"),
    ]),
    "speaker": ("who said what", [
        ('{A} and {B} went to the toy room. {A} said, "I want to play with the {X}." {B} said, "I want to play with '
         'the {Y}." So {A} picked up the', "X", "Y"),
        ('{A} and {B} went to the toy room. {A} said, "I want to play with the {X}." {B} said, "I want to play with '
         'the {Y}." So {B} picked up the', "Y", "X"),
    ]),
    "instead": ("where they went after but and instead", [
        ("{A} wanted to go to the {L}. But it started to rain, so Mom said they would go to the {K} instead. {A} and "
         "Mom got in the car and went to the", "K", "L"),
        ('{A} wanted to go to the {L}, but Mom said, "Let\'s go to the {K} today, not the {L}." So {A} and Mom got in '
         "the car and went to the", "K", "L"),
    ]),
    "order": ("what happened first", [
        ("{A} had a busy day. First, {A} went to the {L}. Then, {A} went to the {K}. The first place {A} went to was "
         "the", "L", "K"),
        ("{A} had a busy day. First, {A} went to the {L}. Then, {A} went to the {K}. The last place {A} went to was "
         "the", "K", "L"),
    ]),
    "pronoun": ("he or she, his or her, some words after the name", [
        ("{A} went to the {L} on a sunny day. The sky was blue and the birds sang in the tall trees. {A} ran and "
         "played for a long time. When the sun went down,", "A_he", "B_he"),
        ("{A} had a little {P}. Every day, {A} and the {P} played in the yard. One day, the {P} ran away, and {A} "
         "looked for it everywhere. At last, {A} found", "A_his", "B_his"),
    ]),
    "feeling": ("how someone feels after what happened", [
        ("One day, {A} {X}. {A} felt very", "X_feel", "Y_feel"),
        ("It was a big day for {A}. When {A} {X}, {A_he} was very", "X_feel", "Y_feel"),
    ]),
    "put": ("where a thing was put", [
        ("{A} put the {X} in the {C} and the {Y} in the {D}. Later, {A} wanted to play with the {X}, so {A_he} looked "
         "in the", "C", "D"),
        ("{A} put the {X} in the {C} and the {Y} in the {D}. Later, {A} wanted to play with the {Y}, so {A_he} looked "
         "in the", "D", "C"),
    ]),
    "color": ("which thing has which color", [
        ("{A} had a {c} {X} and a {d} {Y}. {A} liked to play with them every day. The {X} was", "c", "d"),
        ("{A} had a {c} {X} and a {d} {Y}. {A} liked to play with them every day. The {Y} was", "d", "c"),
    ]),
}
SWAPS = [("A", "B"), ("X", "Y"), ("P", "Q"), ("N", "M"), ("L", "K"), ("C", "D"), ("c", "d")]

GIRLS = ["Lily", "Mia", "Sue", "Anna", "Emma", "Lucy", "Amy", "Sara", "Kate", "Ella", "Zoe", "Jane", "Rose", "Molly",
         "Daisy", "Lisa", "Nora", "Ruby", "Grace", "Jenny"]
BOYS = ["Tom", "Ben", "Tim", "Max", "Sam", "Jack", "Leo", "Joe", "Dan", "Bob", "Jake", "Finn", "Luke", "Mark", "Paul",
        "Mike", "Nick", "Pete", "Toby", "Billy"]
TOYS = ["ball", "kite", "doll", "car", "truck", "book", "drum", "boat", "train", "robot", "puzzle", "puppet",
        "balloon", "hat", "cup", "shell"]
PETS = ["dog", "cat", "bird", "fish", "frog", "bunny", "puppy", "kitten", "turtle", "hamster", "duck", "pony"]
ANIMALS = ["frog", "bird", "bear", "fox", "mouse", "duck", "rabbit", "cat", "dog", "lion", "pig", "cow", "bee",
           "fish", "horse", "monkey"]
ANIMAL_NAMES = ["Pip", "Sunny", "Spot", "Fluffy", "Bubbles", "Coco", "Buddy", "Rex", "Whiskers", "Bella", "Lucky",
                "Ziggy", "Pepper", "Sparky", "Honey", "Snowy"]
PLACES = ["park", "beach", "zoo", "farm", "lake", "store", "library", "pool", "forest", "river", "garden",
          "playground", "museum", "bakery", "hill", "shop"]
CONTAINERS = ["box", "basket", "bag", "drawer", "closet", "bucket", "backpack", "cupboard"]
COLORS = ["red", "blue", "green", "yellow", "pink", "purple", "brown", "white", "black", "gold"]
# what happened, in words that fit after the name, and the feeling it brings
SAD = ["dropped {his} ice cream on the ground", "lost {his} favorite toy", "fell and hurt {his} knee",
       "could not find {his} dog", "saw that {his} new toy was broken", "had to stay inside all day",
       "lost {his} way in the big store", "saw {his} sand castle wash away"]
HAPPY = ["got a new toy for {his} birthday", "found {his} lost toy under the bed", "won a prize at school",
         "got a big hug from {his} mom", "saw a pretty rainbow in the sky", "ate a yummy cake with {his} friends",
         "went to the zoo with {his} dad", "made a new friend at the park"]
PRONOUNS = {"he": ("he", "she"), "his": ("his", "her"), "His": ("His", "Her")}  # (boy's, girl's)


def half(words, split):
    """The dev set's half of a list, or the held-out set's: every other word."""
    return words[split == "held-out"::2]


def draw(rng, split, kind):
    """One filling of the slots: two children (a girl and a boy, either first) and two of every list."""
    fill = dict(zip("AB", rng.sample([rng.choice(half(GIRLS, split)), rng.choice(half(BOYS, split))], 2)))
    lists = dict(X=TOYS, P=ANIMALS if kind == "creature" else PETS, N=ANIMAL_NAMES, L=PLACES, C=CONTAINERS, c=COLORS)
    for s, t in SWAPS[1:]:
        fill[s], fill[t] = rng.sample(half(lists[s], split), 2)
    if kind == "feeling":  # X: something sad that happened, Y: something happy
        fill["X"], fill["Y"] = rng.choice(half(SAD, split)), rng.choice(half(HAPPY, split))
    return fill


def slot_values(fill):
    """What a template reads: the filling, A's and B's pronouns, and what happened told with A's pronoun, with
    the feeling it brings (X_feel, Y_feel)."""
    values = dict(fill)
    for who in "AB":
        for form, (boy_word, girl_word) in PRONOUNS.items():
            values[f"{who}_{form}"] = girl_word if fill[who] in GIRLS else boy_word
    for s in "XY":
        if fill[s] in SAD + HAPPY:
            values[s] = fill[s].format(his=values["A_his"])
            values[f"{s}_feel"] = "sad" if fill[s] in SAD else "happy"
    return values


def mirrored(fill, template):
    """The filling with every pair of roles the template reads swapped: A and B, X and Y, and so on."""
    text, right, wrong = template
    used = {name.split("_")[0] for _, name, _, _ in string.Formatter().parse(text) if name} | {right[0], wrong[0]}
    out = dict(fill)
    for s, t in SWAPS:
        if s in used and t in used:
            out[s], out[t] = fill[t], fill[s]
    return out


def make_items(split="dev", per_kind=100, seed=0):
    """[(kind, prefix, right, wrong)]: per_kind items of every kind, in mirrored pairs of each template, no item
    twice."""
    assert split in ("dev", "held-out") and per_kind % (2 * 2) == 0
    rng = random.Random(f"{split}-{seed}")
    items = []
    for kind, (_, templates) in KINDS.items():
        seen = set()
        while len(seen) < per_kind:
            fill = draw(rng, split, kind)
            group = []
            for template in templates:
                text, right, wrong = template
                for values in (slot_values(fill), slot_values(mirrored(fill, template))):
                    group.append((kind, text.format(**values), " " + values[right], " " + values[wrong]))
            if not seen.intersection(group):  # every template equally often
                seen.update(group)
                items += group
    return items


def accuracy(items, logprob):
    """{kind: fraction right, ..., "all": over every item}; logprob(prefixes, continuations) -> a list of
    total log-probabilities of each continuation after its prefix."""
    prefixes = [p for _, p, _, _ in items] * 2
    scores = logprob(prefixes, [r for _, _, r, _ in items] + [w for _, _, _, w in items])
    # a tie (a model that cannot tell them apart) is half right
    n = len(items)
    right = [(scores[i] > scores[i + n]) + 0.5 * (scores[i] == scores[i + n]) for i in range(n)]
    result = {}
    for kind in KINDS:
        marks = [r for (k, _, _, _), r in zip(items, right) if k == kind]
        result[kind] = sum(marks) / len(marks)
    result["all"] = sum(right) / len(right)
    return result


def model_logprob(model, enc, device, batch_size=64):
    """logprob() for a GPT of model.py: each prefix follows an end-of-text token, as every story does in training;
    a sequence longer than the context keeps its last block_size tokens."""
    import torch

    block_size = model.config.block_size

    @torch.no_grad()
    def logprob(prefixes, continuations):
        model.eval()
        rows = []
        for prefix, cont in zip(prefixes, continuations):
            p, c = [enc.eot_token] + enc.encode_ordinary(prefix), enc.encode_ordinary(cont)
            ids = (p + c)[-(block_size + 1):]
            rows.append((ids, len(c)))
        out = []
        for i in range(0, len(rows), batch_size):
            batch = rows[i:i + batch_size]
            width = max(len(ids) for ids, _ in batch) - 1
            x = torch.full((len(batch), width), enc.eot_token, dtype=torch.long)
            for j, (ids, _) in enumerate(batch):  # padded on the right: causal attention never looks there
                x[j, :len(ids) - 1] = torch.tensor(ids[:-1])
            logits, _ = model(x.to(device))
            logp = torch.log_softmax(logits.float()[..., :model.config.vocab_size], dim=-1).cpu()
            for j, (ids, n) in enumerate(batch):
                targets = torch.tensor(ids[-n:])
                positions = torch.arange(len(ids) - 1 - n, len(ids) - 1)
                out.append(logp[j, positions, targets].sum().item())
        return out
    return logprob


def copy_check(model, enc, device, split="held-out"):
    """(nats per token on a passage read once, on the same passage read again right after it), over the set's
    prefixes, each cut to half the context. A model that looks a token up in its context and copies what followed
    it (an induction head) reads the passage the second time almost free; one that cannot reads it no better than
    the first time. Keeping track of who has what needs at least that look-up."""
    import torch
    import torch.nn.functional as F

    half_context = model.config.block_size // 2
    passages = dict.fromkeys(tuple(enc.encode_ordinary(p)[:half_context]) for _, p, _, _ in make_items(split))
    first, again = [], []
    model.eval()
    with torch.no_grad():
        for ids in map(list, passages):
            x = torch.tensor([[enc.eot_token] + ids + ids], device=device)
            logits, _ = model(x[:, :-1])
            nats = F.cross_entropy(logits[0, :, :model.config.vocab_size].float(), x[0, 1:], reduction="none")
            first.append(nats[:len(ids)].mean().item())
            again.append(nats[len(ids):].mean().item())
    return sum(first) / len(first), sum(again) / len(again)
