"""Caption and retrieval metrics against hand-computed values and pycocoevalcap.

The tokenizer is compared with pycocoevalcap's own ``PTBTokenizer`` (the
CoreNLP jar through Java) when pycocoevalcap and Java are there; those tests
skip otherwise.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from streamcap.errors import ConfigError
from streamcap.training.evaluation import metrics
from streamcap.training.evaluation.metrics import (
    audio_text_retrieval,
    bleu,
    caption_metrics,
    cider_d,
    fense,
    java_available,
    meteor,
    ptb_tokenize,
    ptb_tokens_jar,
    ptb_tokens_python,
    retrieval_metrics,
    rouge_l,
    tokenize,
    vocabulary_size,
)


def test_tokenize_lowercases_splits_clitics_and_drops_punctuation() -> None:
    assert tokenize("A dog's barking, loudly!") == "a dog 's barking loudly"
    assert tokenize("It doesn't stop.") == "it does n't stop"


@pytest.mark.parametrize(("text", "expected"), [
    ("A high-pitched whistle", "a high-pitched whistle"),
    ("at 3.5 kHz, 30,000 feet and 6:30", "at 3.5 khz 30,000 feet and 6:30"),
    ("rock & roll", "rock & roll"),
    ("I cannot, I'm gonna, they wanna", "i can not i 'm gon na they wan na"),
    ("a \"straight\" and \u201ccurly\u201d \u2018quote\u2019", "a straight and curly quote"),
    ("birds (loudly) chirp [twice] {x}",
     "birds -lrb- loudly -rrb- chirp -lsb- twice -rsb- -lcb- x -rcb-"),
    ("the dog's and the dog\u2019s", "the dog 's and the dog 's"),
    ("don't, won't, can\u2019t", "do n't wo n't ca n't"),
    ("wait... then\u2026 stop . . . go", "wait then stop go"),
    ("a bell \u2014 then -- silence - end", "a bell then silence end"),
    ("Caf\u00e9 na\u00efve Z\u00fcrich", "caf\u00e9 na\u00efve z\u00fcrich"),
    ("50% of $5, 1/2 and \u00bd", "50 % of $ 5 1/2 and 1/2"),
    ("e.g. Mr. Smith at 5 p.m. now", "e.g. mr. smith at 5 p.m. now"),
    ("o'clock rock'n'roll '90s ma'am", "o'clock rock 'n' roll '90s ma'am"),
])
def test_tokenize_follows_the_ptb_rules(text: str, expected: str) -> None:
    assert tokenize(text) == expected


def test_ptb_tokenize_looks_across_captions_like_the_jar_does() -> None:
    # A one-letter "acronym" before a sentence start loses its period only then.
    assert ptb_tokenize(["the letter z.", "The end"]) == ["the letter z", "the end"]
    assert ptb_tokenize(["the letter z.", "the end"]) == ["the letter z.", "the end"]
    assert ptb_tokenize(["a\nb", "", "c\r\nd"]) == ["a b", "", "c d"]


def test_ptb_tokenize_rejects_bad_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="unknown tokenizer 'ptb'.*python, jar"):
        ptb_tokenize(["a dog"], tokenizer="ptb")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="one str"):
        ptb_tokenize("a dog")
    monkeypatch.setattr(metrics.shutil, "which", lambda name: None)
    if metrics.ptb_jar_path() is not None:
        with pytest.raises(ConfigError, match="needs Java"):
            ptb_tokens_jar(["a dog"])


_HAND_CAPTIONS = [
    "A high-pitched whistle blows while a dog barks.",
    "A man speaks at 3.5 kHz over the hum of a fan.",
    "Rock & roll music plays loudly in the background.",
    "Someone says they cannot hear the radio.",
    "A kid yells \"I'm gonna win!\" and laughs.",
    "People who wanna talk keep whispering.",
    "A woman says 'hello' and a door closes.",
    "A \u201ccurly\u201d quote and a \u2018single\u2019 one.",
    "Birds chirp (loudly) as the wind blows.",
    "The dog's bark echoes; the cat's meow follows.",
    "Don't stop the music, it's too good.",
    "Rain falls... then thunder rumbles.",
    "A car passes by\u2026 and fades away.",
    "Caf\u00e9 chatter with na\u00efve piano music.",
    "A bell rings \u2014 then silence.",
    "A bell rings -- then silence.",
    "A bell rings - then silence.",
    "Water drips into a sink at 2 a.m. in the house.",
    "A T.V. plays in the next room.",
    "Mr. Smith talks to Dr. Jones about the U.S. economy.",
    "Crowd noise, cheering, applause, etc.",
    "Birds, insects, frogs etc. are heard at night.",
    "A clock ticks; it's 5 o'clock.",
    "A 50% chance of rain is announced on the radio.",
    "Someone pays $5 at a cash register.",
    "A train's horn sounds twice (toot, toot).",
    "Footsteps on a wooden floor [creaking].",
    "The kids' toys rattle in a box.",
    "Water's running while dishes clink.",
    "Wind blows hard \u2013 trees rustle.",
    "A man says \"what's up?\" and laughs.",
    "The 1990s pop song plays on a car stereo.",
    "A jet flies overhead at 30,000 feet.",
    "A 12-year-old girl sings happily.",
    "Someone types on a keyboard: click, click, click.",
    "A dog barks!!! Then it stops.",
    "Is that a bird? It sounds like a crow.",
    "She's laughing while he's talking.",
    "They'll be arriving soon, a voice says.",
    "We've heard this engine before; I'd say it's a motorcycle.",
    "You're hearing rain on a tin roof.",
    "A rooster crows at dawn/sunrise and/or noon.",
    "The temperature is 20\u00b0C, says the forecaster.",
    "A child shouts \u00abhello\u00bb across the yard.",
    "A machine beeps: beep-beep-beep.",
    "A man coughs, sniffs & clears his throat.",
    "A door creaks open.... slowly.",
    "Thunder rumbles . . . in the distance.",
    "Dogs' barks and people's chatter fill the park.",
    "Someone whistles the tune of 'Happy Birthday'.",
    "A man says, \u201cI can't believe it.\u201d",
    "Music plays on a radio: rock'n'roll from the '60s.",
    "An alarm clock buzzes at 6:30.",
    "The person gotta leave, a boy says \"lemme see\" and giggles.",
    "Y'all hear that? Ma'am, please wait.",
    "A car won't start; the dog isn't barking anymore.",
    "Someone says \u201cdon\u2019t\u201d and the dog\u2019s bark stops.",
    "{muffled} voices behind a wall",
    "A 4x4 truck drives off-road over gravel.",
    "A bird sings, e.g. a robin; heavy machinery, i.e. bulldozers.",
    "A radio host talks about the NBA & NFL; the score is 2-1.",
    "a dog barks while a man talks",
    "",
    "A car drives past.A dog barks. Two people talk:one laughs.",
    "Applause\u2014loud applause\u2014fills the hall.",
    "Rain + thunder = storm ~ 10 times.",
    "Sound of a 1/2 full bottle being shaken in Z\u00fcrich.",
    "A woman says: \"I dunno\". Static crackles from a walkie-talkie.",
    "the letter z.",
    "The end",
]
_SUBJECTS = ["A dog", "The dog", "A man", "Two women", "A crowd", "Birds", "A car", "The engine",
             "A baby", "Children", "Rain", "Wind", "A train", "Water", "An old man", "Someone",
             "A motorcycle", "The audience", "A rooster", "Thunder", "Frogs", "A kettle"]
_VERBS = ["barks", "speaks", "sings", "chirps", "passes by", "rumbles", "revs", "cries", "laughs",
          "falls", "blows", "honks", "drips", "whistles", "ticks", "is heard", "hums", "claps",
          "cheers", "whispers", "shouts", "idles"]
_TAILS = ["in the background", "in the distance", "nearby", "loudly", "repeatedly",
          "while birds chirp", "on a busy street", "indoors", "over and over", "at night",
          "while a dog's barking", "and it's raining", "then stops", "and fades out",
          "with a high-pitched squeal", "at 2.5 seconds", "in a 3-minute clip", "(faintly)",
          "\u2014 briefly", "-- briefly", "& echoes", "etc.", "e.g. twice",
          "near the U.S. border", "for 10-15 seconds", "at 100 km/h", "... twice"]
_JOINS = [", ", " and ", " while ", "; ", ". ", " as ", " then ", " \u2013 "]
_ENDS = [".", "", "!", "?", "...", " .", ".\"", ")", "\u2026"]


def _captions(seed: int, n: int = 240) -> list[str]:
    """The hand-written captions and ``n`` generated ones (clauses, joins, ends, case)."""
    rng = random.Random(seed)
    out = list(_HAND_CAPTIONS)
    for _ in range(n):
        text = ""
        for k in range(rng.randint(1, 3)):
            clause = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}"
            if rng.random() < 0.7:
                clause += " " + rng.choice(_TAILS)
            if k:
                join = rng.choice(_JOINS)
                text += join + (clause if join == ". " else clause[0].lower() + clause[1:])
            else:
                text = clause
        text += rng.choice(_ENDS)
        r = rng.random()
        out.append(text.lower() if r < 0.15 else f"\"{text}\"" if r < 0.2
                   else f"({text})" if r < 0.25 else text)
    return out


def _coco_ptb(captions: list[str]) -> list[str]:
    """pycocoevalcap's own PTBTokenizer on one batch (skips without it or Java)."""
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed (streamcap[eval])")
    if java_available() is not None:
        pytest.skip(f"Java unavailable: {java_available()}")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out: list[str] = PTBTokenizer().tokenize({0: [{"caption": c} for c in captions]})[0]
    return out


def test_tokenizer_agrees_with_pycocoevalcap_on_varied_captions() -> None:
    captions = _captions(7)
    assert len(captions) >= 300
    expected = _coco_ptb(captions)
    for tokenizer in ("python", "jar"):
        got = ptb_tokenize(captions, tokenizer=tokenizer)  # type: ignore[arg-type]
        differ = [(c, g, e) for c, g, e in zip(captions, got, expected, strict=True) if g != e]
        assert differ == [], f"{tokenizer}: {len(differ)} of {len(captions)} differ"


_EDGE_CASES = [
    "high-pitched well-known state-of-the-art co-operate re-enter e-mail x-ray",
    "3.5 3,5 3:30 .5 -5 +5 5-10 1990-2000 10th 2nd 1/2 1-1/2 1 1/2 24/7 5/5/2020",
    "U.S. a.m. p.m. Mr. Smith Dr. Who etc. e.g. i.e. vs. St. Paul",
    "the end. Then more. I. am x y z.",
    "I cannot Cannot gotta lemme gimme dunno 'tis 'twas 'Tis TIS",
    "dog's dogs' James's it's its don't can't won't shouldn't ain't isn't they'd we'll I'm",
    "\"quoted\" 'single' ``latex'' \"a\" 'a' \u201c spaced \u201d ' spaced ' don''t ''hi''",
    "\u201ccurly double\u201d \u2018curly single\u2019 it\u2019s don\u2019t O\u2019Brien",
    "\u201fx\u201f \u00abab\u00bb \u2039c\u203a \u201ed\u201c \u201ae\u2018 \u201bf",
    "(paren) [bracket] {brace} <angle> a<b a>b -> <3 :) :( :-) (:",
    "wait... wait.... wait . . . wait\u2026 a---b ---- -----",
    "rock & roll AT&T at&t R&D S&P-500 Q&A &amp; &lt; C++ C# c++",
    "50% $5 \u00a35 \u20ac5 \u00a55 \u00a25 #1 #hashtag @home user@example.com",
    "http://a.b/c?d=e www.example.com song.mp3, clip.wav hello.world end.The wow!nice",
    "caf\u00e9 na\u00efve r\u00e9sum\u00e9 jalape\u00f1o",
    "x\u00b2 3\u00d74 \u00bd \u00bc \u00be \u00b0C",
    "a * b a*b a / b a\\b a|b a~b a^b a=b a+b a_b a__b hello!!! what?? why?! ok; fine: yes,",
    "o'clock rock'n'roll y'all ma'am c'mon li'l '90s 90's 1990's Dunkin' rockin' 'em 'cause",
    "555-1234 12 123 456 (555) 123-4567 ca. 5 no. 5 approx. 3 mid-1990s pro- anti- co- op",
    "emoji \U0001F600 here\ttab  two  spaces \u00a0nbsp",
    "and so on etc.",
    "A dog barks etc.",
    "a dog barks etc. A cat",
    "U.S.",
    "The T.V. The dog",
]


def test_tokenizer_agrees_with_pycocoevalcap_on_edge_cases() -> None:
    expected = _coco_ptb(_EDGE_CASES)
    got = ptb_tokenize(_EDGE_CASES)
    assert [(c, g) for c, g, e in zip(_EDGE_CASES, got, expected, strict=True) if g != e] == []
    assert ptb_tokens_python(_EDGE_CASES) == ptb_tokens_jar(_EDGE_CASES)


def test_bleu_by_hand() -> None:
    # 3 candidate words, closest reference has 4: brevity penalty exp(1 - 4/3).
    bp = math.exp(1 - 4 / 3)
    scores = bleu(["a dog barks"], [["a dog barks loudly", "rain"]])
    assert scores[:3] == pytest.approx([bp, bp, bp])
    # No 4-grams at all: (0 + 1e-15) / (0 + 1e-9) enters the geometric mean.
    assert scores[3] == pytest.approx(bp * (1e-6) ** 0.25)


def test_bleu_clips_repeated_words() -> None:
    # "the the the" vs "the cat": unigram matches clipped to 1 of 3; longer than the ref: no BP.
    scores = bleu(["the the the"], [["the cat"]])
    assert scores[0] == pytest.approx(1 / 3)


def test_rouge_l_by_hand() -> None:
    mean, per = rouge_l(["a dog barks"], [["a dog barks loudly", "a cat"]])
    p, r = 1.0, 0.75
    expected = (1 + 1.44) * p * r / (r + 1.44 * p)
    assert per == pytest.approx([expected])
    assert mean == pytest.approx(expected)
    assert rouge_l(["x y"], [["a b"]])[0] == 0.0


def test_cider_d_by_hand() -> None:
    # Two clips with disjoint n-grams: idf = log 2 everywhere; unigram and bigram
    # cosines are 1, there are no 3/4-grams: mean over n = 0.5, x10 = 5.
    mean, per = cider_d(["a b", "c d"], [["a b"], ["c d"]])
    assert per == pytest.approx([5.0, 5.0])
    assert mean == pytest.approx(5.0)
    # A single clip: idf is log(1) - log(1) = 0, so CIDEr-D is 0.
    assert cider_d(["a b"], [["a b"]])[0] == 0.0
    # Length penalty: one extra bigram shrinks the score by exp(-1/72) at least.
    longer = cider_d(["a b b", "c d"], [["a b"], ["c d"]])[1][0]
    assert 0 < longer < 5.0 * math.exp(-1 / 72) + 1e-9


def test_metrics_reject_mismatched_inputs() -> None:
    with pytest.raises(ConfigError, match="2 candidates but 1"):
        bleu(["a", "b"], [["a"]])
    with pytest.raises(ConfigError, match=r"references\[0\]"):
        rouge_l(["a"], [[]])
    with pytest.raises(ConfigError, match="one str"):
        cider_d("a dog", [["a dog"]])


def test_vocabulary_size() -> None:
    assert vocabulary_size(["A dog barks.", "a dog runs", "Rain!"]) == 5


def _random_corpus(seed: int) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    words = ["a", "dog", "barks", "while", "rain", "falls", "then", "phone", "rings", "siren", "wails", "in", "the", "distance"]
    cands = [" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(25)]
    refs = [[" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(rng.randint(1, 5))]
            for _ in range(25)]
    return cands, refs


def test_own_metrics_equal_pycocoevalcap() -> None:
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed (streamcap[eval])")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    cands, refs = _random_corpus(1)
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [c] for i, c in enumerate(cands)}
    assert bleu(cands, refs) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0],
                                              rel=0, abs=1e-9)
    assert rouge_l(cands, refs)[0] == pytest.approx(Rouge().compute_score(gts, res)[0],
                                                    rel=0, abs=1e-9)
    assert cider_d(cands, refs)[0] == pytest.approx(Cider().compute_score(gts, res)[0],
                                                    rel=0, abs=1e-9)


def _grouped(seed: int) -> tuple[list[str], list[list[str]]]:
    """Varied captions as candidates with 2-5 references each."""
    rng = random.Random(seed)
    captions = [c for c in _captions(seed) if c.strip()]
    cands, refs = [], []
    while len(captions) >= 6:
        cands.append(captions.pop())
        refs.append([captions.pop() for _ in range(rng.randint(2, 5))])
    return cands, refs


def test_caption_metrics_equal_pycocoevalcap_end_to_end() -> None:
    """Raw captions in, pycocoevalcap's PTBTokenizer + Bleu + Cider as the reference."""
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap not installed (streamcap[eval])")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    cands, refs = _grouped(11)
    flat = _coco_ptb([r for rs in refs for r in rs])
    gts: dict[int, list[str]] = {}
    for i, rs in enumerate(refs):
        gts[i], flat = flat[:len(rs)], flat[len(rs):]
    res = {i: [c] for i, c in enumerate(_coco_ptb(cands))}
    expected = Bleu(4).compute_score(gts, res, verbose=0)[0]
    expected_cider = Cider().compute_score(gts, res)[0]
    for tokenizer in ("python", "jar"):
        out = caption_metrics(cands, refs, with_meteor=False,
                              tokenizer=tokenizer)  # type: ignore[arg-type]
        got = [out.scores[f"bleu_{k}"] for k in range(1, 5)]
        assert got == pytest.approx(expected, rel=0, abs=1e-9)
        assert out.scores["cider_d"] == pytest.approx(expected_cider, rel=0, abs=1e-9)


@pytest.mark.slow
def test_meteor_runs_or_says_why() -> None:
    score, reason = meteor(["a dog barks"], [["a dog barks"]])
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        assert score is None and reason is not None and "pycocoevalcap" in reason
        return
    if java_available() is not None:
        assert score is None and reason is not None
        pytest.skip(f"Java unavailable: {java_available()}")
    assert reason is None
    assert score == pytest.approx(1.0, abs=1e-3)


def test_caption_metrics_without_meteor_reports_spice_unavailable() -> None:
    out = caption_metrics(["A dog barks."], [["a dog barks", "a dog is barking"]],
                          with_meteor=False)
    assert out.scores["bleu_1"] == pytest.approx(1.0)
    assert out.scores["rouge_l"] == pytest.approx(1.0)
    assert out.scores["vocabulary"] == 3.0
    assert {"spice", "spider", "meteor"} <= set(out.unavailable)
    assert "meteor" not in out.scores


def _embedder(table: dict[str, list[float]]):  # type: ignore[no-untyped-def]
    def embed(texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return np.array([table[t] for t in texts], dtype=np.float32)
    return embed


def test_fense_by_hand() -> None:
    table = {"good": [1.0, 0.0], "bad": [0.0, 1.0], "ref1": [1.0, 0.0], "ref2": [1.0, 1.0]}
    refs = [["ref1", "ref2"], ["ref1", "ref2"]]
    probs = {"good": 0.1, "bad": 0.95}
    out = fense(["good", "bad"], refs, _embedder(table),
                lambda texts: [probs[t] for t in texts])
    s_good = (1.0 + 1 / math.sqrt(2)) / 2
    s_bad = (0.0 + 1 / math.sqrt(2)) / 2
    assert out.flagged == [False, True]
    assert out.per_caption == pytest.approx([s_good, s_bad * 0.1])
    assert out.similarity == pytest.approx((s_good + s_bad) / 2)
    assert out.fense == pytest.approx((s_good + s_bad * 0.1) / 2)
    plain = fense(["good", "bad"], refs, _embedder(table))
    assert plain.fense == pytest.approx(plain.similarity)


def test_retrieval_metrics_by_hand() -> None:
    sim = [[0.9, 0.1, 0.2], [0.8, 0.5, 0.1], [0.9, 0.8, 0.1]]
    out = retrieval_metrics(sim, np.eye(3, dtype=bool))
    assert out.r1 == pytest.approx(1 / 3)
    assert out.r5 == 1.0 and out.r10 == 1.0
    assert out.map10 == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert out.median_rank == 2.0 and out.mean_rank == 2.0


def test_retrieval_map_with_several_relevant_and_beyond_ten() -> None:
    sim = np.linspace(1.0, 0.0, 12)[None, :]
    rel = np.zeros((1, 12), dtype=bool)
    rel[0, [0, 2]] = True
    assert retrieval_metrics(sim, rel).map10 == pytest.approx((1 + 2 / 3) / 2)
    rel = np.zeros((1, 12), dtype=bool)
    rel[0, 11] = True  # rank 12: outside the top 10
    out = retrieval_metrics(sim, rel)
    assert out.map10 == 0.0 and out.r10 == 0.0 and out.mean_rank == 12.0


def test_median_rank_is_the_numpy_median_of_one_based_ranks() -> None:
    # Queries whose relevant item is at 1-based ranks 1, 2, 3, 4: medR = 2.5 (the two middle
    # ranks averaged), not floor(median of 0-based ranks) + 1 = 2.
    sim = np.linspace(1.0, 0.0, 4)[None, :].repeat(4, axis=0)
    out = retrieval_metrics(sim, np.eye(4, dtype=bool))
    assert out.median_rank == 2.5 and out.mean_rank == 2.5
    # Odd count: the middle rank. Ranks 1, 1, 4 -> 1.
    rel = np.zeros((3, 4), dtype=bool)
    rel[0, 0] = rel[1, 0] = rel[2, 3] = True
    assert retrieval_metrics(sim[:3], rel).median_rank == 1.0


def test_retrieval_ties_break_by_index_and_bad_input() -> None:
    out = retrieval_metrics([[0.5, 0.5]], [[False, True]])
    assert out.r1 == 0.0 and out.mean_rank == 2.0
    with pytest.raises(ConfigError, match="no relevant"):
        retrieval_metrics([[0.5, 0.5]], [[False, False]])
    with pytest.raises(ConfigError, match="same"):
        retrieval_metrics([[0.5, 0.5]], [[True]])


def test_audio_text_retrieval_both_directions() -> None:
    # 2 audios, 4 texts (2 each); audio 1's texts rank second for audio 0.
    sim = np.array([[0.9, 0.8, 0.7, 0.1], [0.2, 0.1, 0.9, 0.8]])
    out = audio_text_retrieval(sim, [0, 0, 1, 1])
    assert out["audio_to_text"].r1 == 1.0
    assert out["audio_to_text"].map10 == pytest.approx(1.0)
    assert out["text_to_audio"].r1 == 1.0
    sim[0, 2] = 0.95  # text 2 now prefers audio 0
    out = audio_text_retrieval(sim, [0, 0, 1, 1])
    assert out["text_to_audio"].r1 == pytest.approx(3 / 4)
