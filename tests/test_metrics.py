"""Caption and retrieval metrics against hand-computed values (and pycocoevalcap if installed)."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest

from streamcap.errors import ConfigError
from streamcap.training.metrics import (
    audio_text_retrieval,
    bleu,
    caption_metrics,
    cider_d,
    fense,
    java_available,
    meteor,
    retrieval_metrics,
    rouge_l,
    tokenize,
    vocabulary_size,
)


def test_tokenize_lowercases_splits_clitics_and_drops_punctuation() -> None:
    assert tokenize("A dog's barking, loudly!") == "a dog 's barking loudly"
    assert tokenize("It doesn't stop.") == "it does n't stop"


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
    assert bleu(cands, refs) == pytest.approx(Bleu(4).compute_score(gts, res, verbose=0)[0])
    assert rouge_l(cands, refs)[0] == pytest.approx(Rouge().compute_score(gts, res)[0])
    assert cider_d(cands, refs)[0] == pytest.approx(Cider().compute_score(gts, res)[0])


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
