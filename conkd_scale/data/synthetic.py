"""A small built-in synthetic dataset in exactly the real ReDial on-disk layout.

``write_synthetic(out_dir, seed=0)`` writes files that the ReDial loader reads unchanged::

    out_dir/train_data.jsonl valid_data.jsonl test_data.jsonl   (80/10/10 of the conversations)
    out_dir/movies_with_mentions.csv                             (movieId,movieName,nbMentions)
    out_dir/kg/dbpedia/entity2id.json item_ids.json relation2id.json dbpedia_subkg.json
    out_dir/kg/kbrd/id2entity.pkl                                (movieId int -> URI or None)
    out_dir/kg/kbrd/entity2entityId.pkl movie_ids.pkl subkg.pkl  (the same graph, KBRD layout)
    out_dir/SYNTHETIC.json                                       (seed, parameters, counts)

Generative story
----------------
1. Items (movies) get KG attributes: one or two genres out of 8, 2-3 actors and one director.
   Actors and directors have a "home" genre and mostly play in movies of that genre, so the
   attributes are correlated. About 5% of movies have no KG node (``id2entity`` maps them to
   None), as in the real data. Every item has a hidden popularity (Zipf-like, skewed).
2. Each seeker has hidden preferences: a liked genre and sometimes a favourite actor.
3. The seeker greets, states the preference in text ("I love horror movies.", "Anything with
   Anna Carter.") and mentions 1-2 movies they liked (``@id``) that have those attributes.
4. The recommender mixes chit-chat ("Hi, how are you?") with 1-3 recommendation turns; each
   mentions 1-2 new movies chosen, by popularity, among the movies that share a genre, actor
   or director with the seeker's liked movies (through the KG), and names the shared attribute.
5. The seeker reacts (seen / liked / not seen), the two close the chat; some messages come
   in pairs from the same sender. Conversations have 6-12 messages.

Real-data quirks reproduced: conversations whose messages lack ``messageId``/``timeOffset``,
``initiatorQuestions``/``respondentQuestions`` that are empty lists instead of dicts,
consecutive messages by one sender, sparse integer movie ids, ``\\r\\n`` CSV line ends.

Because recommended movies share KG attributes with the movies mentioned before them, a
KG-aware recommender (context items + the KG) clearly beats a popularity ranking at R@10,
while popularity is itself far better than chance. The text uses a small template vocabulary
so that a tiny language model learns it on a CPU in minutes.

Determinism: only ``random.Random(seed)`` is used, iteration is over sorted or constructed
lists, and JSON is written with fixed separators; the same arguments give byte-identical
files. The whole directory is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import csv
import io
import json
import pickle
import random
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from conkd_scale.utils.errors import ConfigError, DataError
from conkd_scale.utils.io import atomic_dir

__all__ = ["GENERATOR_VERSION", "MARKER_FILE", "write_synthetic"]

GENERATOR_VERSION = 1
MARKER_FILE = "SYNTHETIC.json"
SPLITS = ("train", "valid", "test")

_RES = "<http://dbpedia.org/resource/{}>"
_ONT = "<http://dbpedia.org/ontology/{}>"
RELATIONS = {
    _ONT.format("genre"): 0,
    _ONT.format("starring"): 1,
    _ONT.format("director"): 2,
    "self_loop": 3,
}
_GENRE_REL, _STAR_REL, _DIR_REL, _SELF_REL = 0, 1, 2, 3

# (DBpedia resource name, word used in text)
GENRES: tuple[tuple[str, str], ...] = (
    ("Horror_film", "horror"),
    ("Comedy_film", "comedy"),
    ("Science_fiction_film", "sci-fi"),
    ("Romance_film", "romance"),
    ("Thriller_film", "thriller"),
    ("Animation", "animated"),
    ("Drama_(film_and_television)", "drama"),
    ("Action_film", "action"),
)

_ADJ = (
    "Midnight", "Silent", "Broken", "Golden", "Hidden", "Last", "Dark", "Crimson", "Frozen",
    "Wild", "Lost", "Electric", "Quiet", "Burning", "Secret", "Iron", "Velvet", "Hollow",
    "Distant", "Savage", "Lucky", "Paper", "Glass", "Northern",
)  # fmt: skip
_NOUN = (
    "Harbor", "River", "Garden", "Empire", "Signal", "Horizon", "Station", "Mirror", "Kingdom",
    "Promise", "Storm", "Letter", "Circus", "Voyage", "Island", "Frontier", "Orchard", "Lantern",
    "Engine", "Summer", "Shadow", "Castle", "Highway", "Carnival",
)  # fmt: skip
_FIRST = (
    "Anna", "Ben", "Clara", "David", "Elena", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate",
    "Leo", "Maya", "Nick", "Olivia", "Paul", "Rosa", "Sam", "Tara", "Victor", "Wendy", "Adam",
    "Bella", "Carl",
)  # fmt: skip
_LAST = (
    "Carter", "Holt", "Reyes", "Fischer", "Lane", "Moreau", "Novak", "Quinn", "Sato", "Tanner",
    "Vance", "Walsh", "Young", "Brooks", "Dalton", "Ellis", "Foster", "Grant", "Hayes", "Keller",
)  # fmt: skip

# ---- text templates (small, varied vocabulary) -------------------------------------------
_SEEKER_HELLO = ("Hi!", "Hello.", "Hi, how are you?", "Hey there!", "Hello, how is it going?")
_REC_HELLO = (
    "Hi, how are you?",
    "Hello! What kind of movies do you like?",
    "Hi! What are you in the mood for today?",
    "Hey! I am doing well. What kind of movie are you looking for?",
    "Hello, I can help you find a movie. What do you like?",
)
_SEEKER_GENRE = (
    "I love {g} movies.",
    "I am in the mood for a {g} movie.",
    "I really like {g} movies.",
    "Can you recommend a good {g} movie?",
    "I am looking for a {g} movie tonight.",
)
_SEEKER_ACTOR = (
    "Anything with {a}.",
    "I like movies with {a} in them.",
    "I am a big fan of {a}.",
)
_SEEKER_LIKED = (
    "I really liked {m}.",
    "My favorite is {m}.",
    "I loved {m}.",
    "Something like {m} would be great.",
    "I saw {m} last week and loved it.",
)
_SEEKER_LIKED2 = ("I really liked {m} and {n}.", "I loved {m} and also {n}.")
_SEEKER_ALSO = ("I also liked {m}.", "Oh, and I loved {m} too.")
_REC_CHAT = (
    "Oh nice, good choice.",
    "That is a great one.",
    "I know what you mean.",
    "Great taste!",
    "Ok, let me think.",
    "Sure, I have a few ideas.",
)
_REC_GENRE = (
    "Have you seen {m}? It is a great {g} movie.",
    "You might like {m}, it is a fun {g} movie.",
    "How about {m}? It is one of my favorite {g} movies.",
    "I would recommend {m}, a really good {g} movie.",
)
_REC_ACTOR = (
    "You might like {m}, it has {a} in it.",
    "Have you seen {m}? {a} is great in it.",
    "How about {m}? It stars {a}.",
)
_REC_DIRECTOR = (
    "Have you seen {m}? It was directed by {d}.",
    "You should try {m}, {d} directed it.",
)
_REC_TWO = (
    "You might like {m} or {n}, both are great {g} movies.",
    "Have you seen {m} or {n}? They are both really good.",
)
_SEEKER_SEEN_LIKED = ("Yes, I saw it, it was great!", "I have seen it and I loved it.")
_SEEKER_SEEN_DISLIKED = ("I have seen it, it was not my favorite.", "Yes, but I did not like it.")
_SEEKER_NOT_SEEN = (
    "No, I have not seen it. Sounds good!",
    "I have not seen that one, I will check it out.",
    "No, but that sounds interesting.",
    "Not yet, thanks for the idea.",
)
_SEEKER_BYE = (
    "Thanks, bye!",
    "Thank you so much, have a good day.",
    "Great, thanks for the help!",
    "Thanks, I will watch it tonight.",
)
_REC_BYE = (
    "You are welcome, enjoy!",
    "Bye! Have a nice day.",
    "Glad I could help, enjoy the movie!",
    "Have fun watching!",
)
_REC_EXTRA = ("It is one of my favorites.", "I hope you like it.", "It is a classic.")


@dataclass
class _Movie:
    movie_id: int
    title: str  # "Midnight Harbor (1994)"
    uri: str | None  # None: no KG node
    genres: list[int]
    actors: list[int]
    director: int
    weight: float  # hidden popularity

    @cached_property
    def attrs(self) -> frozenset[tuple[str, int]]:
        return frozenset(
            [("g", g) for g in self.genres]
            + [("a", a) for a in self.actors]
            + [("d", self.director)]
        )


@dataclass
class _World:
    movies: list[_Movie]
    actors: list[str]
    directors: list[str]
    by_genre: dict[int, list[int]] = field(default_factory=dict)  # genre -> movie indices


def _pick(rng: random.Random, seq: tuple[str, ...] | list[str]) -> str:
    return seq[rng.randrange(len(seq))]


def _weighted(rng: random.Random, idx: list[int], weights: list[float]) -> int:
    return rng.choices(idx, weights=weights, k=1)[0]


def _names(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct person names (first + last, then with a middle initial if needed)."""
    combos = [f"{f} {last}" for f in _FIRST for last in _LAST]
    rng.shuffle(combos)
    out = combos[:n]
    k = 0
    while len(out) < n:  # only for very large worlds
        out.append(f"{combos[k % len(combos)]} {chr(65 + (k // len(combos)) % 26)}.")
        k += 1
    return out


def _titles(rng: random.Random, n: int) -> list[str]:
    combos = [f"{a} {b}" for a in _ADJ for b in _NOUN]
    rng.shuffle(combos)
    out: list[str] = []
    part = 1
    while len(out) < n:
        suffix = "" if part == 1 else f" {part}"
        out.extend(c + suffix for c in combos[: n - len(out)])
        part += 1
    return out


def _uri_name(text: str) -> str:
    return text.replace(" ", "_").replace(".", "")


def _build_world(rng: random.Random, n_items: int) -> _World:
    n_genres = len(GENRES)
    n_actors = max(24, n_items // 3)
    n_directors = max(12, n_items // 6)
    people = _names(rng, n_actors + n_directors)
    actors, directors = people[:n_actors], people[n_actors:]
    actor_home = [i % n_genres for i in range(n_actors)]
    director_home = [i % n_genres for i in range(n_directors)]
    home_actors = {g: [a for a in range(n_actors) if actor_home[a] == g] for g in range(n_genres)}
    home_dirs = {
        g: [d for d in range(n_directors) if director_home[d] == g] for g in range(n_genres)
    }

    titles = _titles(rng, n_items)
    # Hidden popularity: a Zipf-like weight over a random order of the items.
    ranks = list(range(n_items))
    rng.shuffle(ranks)
    no_kg = max(1, round(0.05 * n_items))
    no_kg_set = set(rng.sample(range(n_items), no_kg))

    movies: list[_Movie] = []
    movie_id = 100000
    for k in range(n_items):
        movie_id += rng.randint(1, 40)
        year = rng.randint(1970, 2019)
        g1 = k % n_genres if k < n_genres else rng.randrange(n_genres)
        genres = [g1]
        if rng.random() < 0.4:
            genres.append(rng.choice([g for g in range(n_genres) if g != g1]))
        n_cast = rng.randint(2, 3)
        cast: list[int] = []
        while len(cast) < n_cast:
            pool = home_actors[g1] if rng.random() < 0.8 else list(range(n_actors))
            a = rng.choice(pool)
            if a not in cast:
                cast.append(a)
        pool = home_dirs[g1] if rng.random() < 0.9 else list(range(n_directors))
        director = rng.choice(pool)
        title = f"{titles[k]} ({year})"
        uri = None if k in no_kg_set else _RES.format(f"{_uri_name(titles[k])}_({year}_film)")
        weight = 1.0 / (ranks[k] + 1) ** 0.7
        movies.append(_Movie(movie_id, title, uri, genres, cast, director, weight))
    world = _World(movies, actors, directors)
    for i, m in enumerate(movies):
        for g in m.genres:
            world.by_genre.setdefault(g, []).append(i)
    return world


def _shared(a: _Movie, liked: list[_Movie]) -> int:
    return sum(len(a.attrs & b.attrs) for b in liked)


def _choose_recs(
    rng: random.Random, world: _World, liked: list[int], used: set[int], genre: int, k: int
) -> list[int]:
    """``k`` new movies that share KG attributes with the liked ones (popularity-weighted)."""
    movies = world.movies
    liked_m = [movies[i] for i in liked]
    out: list[int] = []
    for _ in range(k):
        if rng.random() < 0.08:  # an off-profile popular pick now and then
            cand = [i for i in range(len(movies)) if i not in used and i not in out]
            w = [movies[i].weight for i in cand]
        else:
            cand, w = [], []
            for i, m in enumerate(movies):
                if i in used or i in out:
                    continue
                s = _shared(m, liked_m) if liked_m else int(genre in m.genres)
                if s > 0:
                    cand.append(i)
                    w.append(m.weight * s**3)
        if not cand:
            break
        out.append(_weighted(rng, cand, w))
    return out


def _rec_text(
    rng: random.Random, world: _World, recs: list[int], liked: list[int], genre: int
) -> str:
    movies = world.movies
    m = movies[recs[0]]
    mention = f"@{m.movie_id}"
    if len(recs) == 2:
        n = f"@{movies[recs[1]].movie_id}"
        return _pick(rng, _REC_TWO).format(m=mention, n=n, g=GENRES[genre][1])
    liked_attrs: set[tuple[str, int]] = set()
    for i in liked:
        liked_attrs |= movies[i].attrs
    shared = sorted(m.attrs & liked_attrs)
    people = [x for x in shared if x[0] in ("a", "d")]
    if people and rng.random() < 0.6:
        kind, j = rng.choice(people)
        if kind == "a":
            return _pick(rng, _REC_ACTOR).format(m=mention, a=world.actors[j])
        return _pick(rng, _REC_DIRECTOR).format(m=mention, d=world.directors[j])
    g = next((j for kind, j in shared if kind == "g"), m.genres[0])
    return _pick(rng, _REC_GENRE).format(m=mention, g=GENRES[g][1])


def _conversation(
    rng: random.Random, world: _World, conv_id: str, seeker: int, recommender: int
) -> dict[str, Any]:
    movies = world.movies
    msgs: list[tuple[int, str]] = []  # (sender, text)
    questions: dict[int, dict[str, int]] = {}  # movie index -> answers, first-mention order
    S, R = seeker, recommender

    def note(i: int, suggested: int, seen: int, liked: int) -> None:
        if i not in questions:
            questions[i] = {"suggested": suggested, "seen": seen, "liked": liked}

    # Hidden preferences.
    genre = rng.randrange(len(GENRES))
    in_genre = world.by_genre.get(genre) or list(range(len(movies)))
    actor: int | None = None
    if rng.random() < 0.35:
        cast = sorted({a for i in in_genre for a in movies[i].actors})
        actor = rng.choice(cast)
    liked: list[int] = []
    pool = [i for i in in_genre if actor is None or actor in movies[i].actors] or in_genre
    liked.append(_weighted(rng, pool, [movies[i].weight for i in pool]))
    if rng.random() < 0.5:
        rest = [i for i in in_genre if i not in liked]
        if rest:
            liked.append(_weighted(rng, rest, [movies[i].weight for i in rest]))
    mention_now = liked if rng.random() > 0.1 else []  # 10%: liked movies come up later

    # Greeting.
    msgs.append((S, _pick(rng, _SEEKER_HELLO)))
    msgs.append((R, _pick(rng, _REC_HELLO)))
    # Preference statement, sometimes split over two consecutive seeker messages.
    pref = _pick(rng, _SEEKER_GENRE).format(g=GENRES[genre][1])
    if actor is not None:
        pref += " " + _pick(rng, _SEEKER_ACTOR).format(a=world.actors[actor])
    if mention_now:
        ms = [f"@{movies[i].movie_id}" for i in mention_now]
        if len(ms) == 2:
            like = _pick(rng, _SEEKER_LIKED2).format(m=ms[0], n=ms[1])
        else:
            like = _pick(rng, _SEEKER_LIKED).format(m=ms[0])
        for i in mention_now:
            note(i, 0, 1, 1)
        if rng.random() < 0.4:
            msgs.append((S, pref))
            msgs.append((S, like))
        else:
            msgs.append((S, f"{pref} {like}"))
    else:
        msgs.append((S, pref))

    # Recommendation rounds within the 12-message budget (closing takes 2).
    used = set(liked)
    rounds = rng.choice((1, 2, 2, 3))
    pending = [i for i in liked if i not in mention_now]
    for r in range(rounds):
        cost_left = 12 - 2 - len(msgs)
        if cost_left < 2 or (r > 0 and cost_left < 3 and rng.random() < 0.5):
            break
        k = 2 if rng.random() < 0.15 else 1
        recs = _choose_recs(rng, world, [i for i in liked if i in questions], used, genre, k)
        if not recs:
            break
        used.update(recs)
        text = _rec_text(rng, world, recs, [i for i in liked if i in questions], genre)
        if cost_left >= 3 and rng.random() < 0.3:
            msgs.append((R, _pick(rng, _REC_CHAT)))  # chit-chat, then the recommendation
        msgs.append((R, text))
        u = rng.random()
        if u < 0.15:
            reply, seen, lk = _pick(rng, _SEEKER_SEEN_LIKED), 1, 1
        elif u < 0.25:
            reply, seen, lk = _pick(rng, _SEEKER_SEEN_DISLIKED), 1, 0
        else:
            reply, seen, lk = _pick(rng, _SEEKER_NOT_SEEN), 0, 2
        for i in recs:
            note(i, 1, seen, lk)
        if pending:
            i = pending.pop(0)
            reply += " " + _pick(rng, _SEEKER_ALSO).format(m=f"@{movies[i].movie_id}")
            note(i, 0, 1, 1)
        msgs.append((S, reply))
    if pending:  # liked movies never mentioned: mention them before closing
        for i in pending:
            note(i, 0, 1, 1)
        ms = " ".join(f"@{movies[i].movie_id}" for i in pending)
        msgs.append((S, _pick(rng, _SEEKER_LIKED).format(m=ms)))

    # Closing (sometimes a short extra recommender message first).
    if len(msgs) <= 8 and rng.random() < 0.4:
        msgs.append((R, _pick(rng, _REC_EXTRA)))
    msgs.append((S, _pick(rng, _SEEKER_BYE)))
    msgs.append((R, _pick(rng, _REC_BYE)))
    while len(msgs) < 6:
        msgs.insert(2, (R, _pick(rng, _REC_CHAT)))
    if len(msgs) > 12:  # cannot happen with the budget above; kept as a guard
        raise AssertionError(f"conversation {conv_id} has {len(msgs)} messages")

    # Serialise in the original schema (and key order).
    bare = rng.random() < 0.08  # quirk: messages carry only text and senderWorkerId
    t = 0
    messages: list[dict[str, Any]] = []
    for sender, text in msgs:
        if bare:
            messages.append({"text": text, "senderWorkerId": sender})
        else:
            messages.append(
                {"messageId": 0, "text": text, "timeOffset": t, "senderWorkerId": sender}
            )
        t += rng.randint(5, 60)
    mentions = {str(movies[i].movie_id): movies[i].title for i in questions}
    init_q: dict[str, Any] | list[Any] = {
        str(movies[i].movie_id): dict(a) for i, a in questions.items()
    }
    resp_q: dict[str, Any] | list[Any] = {}
    for i, a in questions.items():
        b = dict(a)
        if rng.random() < 0.1:
            b["liked"] = 2  # the two workers' answers do not always agree
        resp_q[str(movies[i].movie_id)] = b
    if rng.random() < 0.04:
        init_q = []
    if rng.random() < 0.02:
        resp_q = []
    return {
        "movieMentions": mentions,
        "respondentQuestions": resp_q,
        "messages": messages,
        "conversationId": conv_id,
        "respondentWorkerId": recommender,
        "initiatorWorkerId": seeker,
        "initiatorQuestions": init_q,
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)


def write_synthetic(
    out_dir: str | Path, *, seed: int = 0, conversations: int = 600, items: int = 120
) -> dict[str, Any]:
    """Write the synthetic dataset to ``out_dir`` (replacing an older synthetic one).

    Returns a summary: ``{"conversations": {split: n}, "messages", "items", "items_in_kg",
    "entities", "relations", "edges", "seed"}`` (``edges`` excludes the self-loop entries).
    Refuses to replace an existing non-empty directory that is not a synthetic dataset.
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed: expected an integer, got {seed!r}")
    if isinstance(conversations, bool) or not isinstance(conversations, int) or conversations < 10:
        raise ConfigError(f"conversations: expected an integer >= 10, got {conversations!r}")
    if isinstance(items, bool) or not isinstance(items, int) or items < 20:
        raise ConfigError(f"items: expected an integer >= 20, got {items!r}")
    out = Path(out_dir)
    if out.exists() and (
        not out.is_dir() or (any(out.iterdir()) and not (out / MARKER_FILE).exists())
    ):
        raise DataError(
            out,
            "exists and is not a synthetic dataset directory",
            hint="choose an empty or new directory; write_synthetic replaces its output whole",
        )

    rng = random.Random(seed)
    world = _build_world(rng, items)
    movies = world.movies

    n_workers = max(20, conversations // 5)
    convs: list[dict[str, Any]] = []
    for c in range(conversations):
        seeker = rng.randrange(n_workers)
        recommender = rng.randrange(n_workers - 1)
        recommender += recommender >= seeker
        convs.append(_conversation(rng, world, str(20000 + c), seeker, recommender))
    # Global message ids, in conversation order (absent in the "bare" conversations).
    mid = 1000
    for conv in convs:
        for m in conv["messages"]:
            if "messageId" in m:
                m["messageId"] = mid
            mid += 1

    order = list(range(conversations))
    rng.shuffle(order)
    n_train = round(0.8 * conversations)
    n_valid = round(0.1 * conversations)
    parts = {
        "train": sorted(order[:n_train]),
        "valid": sorted(order[n_train : n_train + n_valid]),
        "test": sorted(order[n_train + n_valid :]),
    }

    counts: dict[int, int] = {m.movie_id: 0 for m in movies}
    for conv in convs:
        for k in conv["movieMentions"]:
            counts[int(k)] += 1

    # Knowledge graph (UniCRS DBpedia JSON layout).
    uris = sorted(
        {m.uri for m in movies if m.uri is not None}
        | {_RES.format(GENRES[g][0]) for m in movies if m.uri for g in m.genres}
        | {_RES.format(_uri_name(world.actors[a])) for m in movies if m.uri for a in m.actors}
        | {_RES.format(_uri_name(world.directors[m.director])) for m in movies if m.uri}
    )
    ids = list(range(len(uris)))
    rng.shuffle(ids)
    entity2id = dict(zip(uris, ids, strict=True))
    subkg: dict[int, list[list[int]]] = {i: [[_SELF_REL, i]] for i in sorted(ids)}
    edges = 0
    for m in movies:
        if m.uri is None:
            continue
        h = entity2id[m.uri]
        for g in m.genres:
            subkg[h].append([_GENRE_REL, entity2id[_RES.format(GENRES[g][0])]])
        for a in m.actors:
            subkg[h].append([_STAR_REL, entity2id[_RES.format(_uri_name(world.actors[a]))]])
        subkg[h].append([_DIR_REL, entity2id[_RES.format(_uri_name(world.directors[m.director]))]])
        edges += len(m.genres) + len(m.actors) + 1
    item_ids = sorted(entity2id[m.uri] for m in movies if m.uri is not None)
    id2entity = {m.movie_id: m.uri for m in movies}

    summary: dict[str, Any] = {
        "conversations": {s: len(parts[s]) for s in SPLITS},
        "messages": sum(len(c["messages"]) for c in convs),
        "items": len(movies),
        "items_in_kg": len(item_ids),
        "entities": len(entity2id),
        "relations": len(RELATIONS),
        "edges": edges,
        "seed": seed,
    }

    with atomic_dir(out) as tmp:
        tmp.chmod(0o755)  # mkdtemp makes it private; the dataset is ordinary data
        for split in SPLITS:
            lines = "".join(_dumps(convs[i]) + "\n" for i in parts[split])
            _write_text(tmp / f"{split}_data.jsonl", lines)
        buf = io.StringIO()
        writer = csv.writer(buf)  # "\r\n" line ends, like the real file
        writer.writerow(["movieId", "movieName", "nbMentions"])
        for m in sorted(movies, key=lambda m: m.movie_id):
            writer.writerow([m.movie_id, m.title, counts[m.movie_id]])
        _write_text(tmp / "movies_with_mentions.csv", buf.getvalue())
        kg = tmp / "kg" / "dbpedia"
        _write_text(kg / "entity2id.json", _dumps(entity2id))
        _write_text(kg / "item_ids.json", _dumps(item_ids))
        _write_text(kg / "relation2id.json", _dumps(RELATIONS))
        _write_text(kg / "dbpedia_subkg.json", _dumps({str(h): e for h, e in subkg.items()}))
        # KBRD pickles: the movie link, plus the same graph in KBRD's layout (plain
        # containers only, protocol 4) so that either KG format loads.
        kbrd = tmp / "kg" / "kbrd"
        kbrd.mkdir(parents=True, exist_ok=True)
        kbrd_subkg = {h: [(r, t) for r, t in e] for h, e in subkg.items()}
        for name, obj in (
            ("id2entity.pkl", id2entity),
            ("entity2entityId.pkl", entity2id),
            ("movie_ids.pkl", item_ids),
            ("subkg.pkl", kbrd_subkg),
        ):
            (kbrd / name).write_bytes(pickle.dumps(obj, protocol=4))
        meta = {
            "generator": "conkd_scale.data.synthetic",
            "version": GENERATOR_VERSION,
            "seed": seed,
            "conversations": conversations,
            "items": items,
            "summary": summary,
        }
        _write_text(tmp / MARKER_FILE, json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return summary


DEFAULT_DIR = "runs/data/synthetic"
"""Where the jobs put the built-in default corpus when ``data_dir`` is not given."""


def ensure_synthetic(data_dir: str | Path, *, seed: int = 0) -> bool:
    """Write the default synthetic corpus into ``data_dir`` unless it exists; True if written."""
    if Path(data_dir).is_dir():
        return False
    print(f"generating the synthetic corpus in {data_dir}", flush=True)
    write_synthetic(data_dir, seed=seed)
    return True
