"""The CLIP tokenizer: training, the two saved formats, the id layout, and parity with HF."""

import itertools
import json
import os
import unicodedata

import numpy as np
import pytest

from unclip_jax.models.clip_tokenizer import BOS_TOKEN, EOS_TOKEN, ClipTokenizer

SIZES = ("small", "large")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "center", "bottom left", "bottom right")
BACKGROUNDS = ("gray", "white", "black")
TEMPLATES = (
    "a {size} {colour} {shape} in the {position} on a {background} background",
    "a photo of a {colour} {shape}, {size}, {position}, {background} background",
)
CAPTIONS = [
    t.format(size=s, colour=c, shape=sh, position=p, background=b)
    for t, s, c, sh, p, b in itertools.product(
        TEMPLATES, SIZES, COLOURS, SHAPES, POSITIONS, BACKGROUNDS
    )
]
# Captions a user may write at sampling time: capitals, extra spaces, punctuation, digits,
# contractions, unseen words, non-Latin letters and an emoji, an empty one and a long one.
PROBES = [
    "A small red circle in the top left on a gray background",
    "  The   LARGE\tblue  square ,at the   center!!  ",
    "it's 2 triangles; they'll overlap... (maybe) 100%",
    "a zebra-striped dodecahedron",
    "Ünïcode café 日本語 🙂 naïve",
    "",
    " ".join(CAPTIONS[:3]),
]
L = 16


@pytest.fixture(scope="module")
def trained() -> ClipTokenizer:
    return ClipTokenizer.train(CAPTIONS, vocab_size=1024)


def _ids(tok: ClipTokenizer, texts=PROBES, context_length=L) -> np.ndarray:
    return tok(texts, context_length=context_length)[0]


# ---------------------------------------------------------------------------------------------
# Training and the saved formats
# ---------------------------------------------------------------------------------------------
def test_trained_vocab_has_openai_layout_and_is_small(trained):
    n = trained.vocab_size
    # 512 byte symbols, some merges (a handful of caption words saturate well below 1024), specials.
    assert 514 < n <= 1024
    assert trained.tokenizer.id_to_token(0) == "!"
    assert trained.tokenizer.id_to_token(256) == "!</w>"
    assert (trained.bos_id, trained.eos_id, trained.pad_id) == (n - 2, n - 1, n - 1)
    # Caption words are single tokens once trained: bos + 12 words + eos.
    _, mask = trained("a small red circle in the top left on a gray background", context_length=L)
    assert int(mask.sum()) == 14


def test_vocab_size_is_an_upper_bound_and_has_a_floor():
    assert ClipTokenizer.train(CAPTIONS, vocab_size=530).vocab_size == 530
    with pytest.raises(ValueError, match="514"):
        ClipTokenizer.train(CAPTIONS, vocab_size=256)


def test_training_is_deterministic():
    # BpeTrainer alone breaks ties between equally frequent pairs by hash-map order; this
    # in-process repeat caught that before the "</w>" symbols were pinned.
    runs = [ClipTokenizer.train(CAPTIONS, vocab_size=1024).tokenizer.to_str() for _ in range(4)]
    assert all(r == runs[0] for r in runs)


def test_save_then_load_gives_the_same_ids_from_either_format(trained, tmp_path):
    trained.save(str(tmp_path))
    assert {"tokenizer.json", "vocab.json", "merges.txt"} <= set(os.listdir(tmp_path))
    want = _ids(trained)
    from_json = ClipTokenizer.from_dir(str(tmp_path))
    np.testing.assert_array_equal(_ids(from_json), want)
    assert from_json.vocab_size == trained.vocab_size
    assert from_json.model_max_length == 77

    os.remove(tmp_path / "tokenizer.json")
    from_files = ClipTokenizer.from_dir(str(tmp_path))
    np.testing.assert_array_equal(_ids(from_files), want)
    assert (from_files.bos_id, from_files.eos_id, from_files.pad_id) == (
        trained.bos_id,
        trained.eos_id,
        trained.pad_id,
    )
    assert from_files.vocab_size == trained.vocab_size


def test_save_keeps_other_files_in_the_directory(trained, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "tokenizer.json").write_text("stale")
    trained.save(str(tmp_path))
    assert (tmp_path / "config.json").read_text() == "{}"
    np.testing.assert_array_equal(_ids(ClipTokenizer.from_dir(str(tmp_path))), _ids(trained))


def test_special_tokens_and_max_length_come_from_the_config_files(trained, tmp_path):
    trained.save(str(tmp_path))
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(model_max_length=32, pad_token="!")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").unlink()
    tok = ClipTokenizer.from_dir(str(tmp_path))
    assert tok.model_max_length == 32
    assert tok.pad_id == tok.tokenizer.token_to_id("!") == 0
    ids, mask = tok("a circle", context_length=8)
    np.testing.assert_array_equal(ids[0, 4:], 0)
    np.testing.assert_array_equal(mask[0], [1, 1, 1, 1, 0, 0, 0, 0])


# ---------------------------------------------------------------------------------------------
# The id layout
# ---------------------------------------------------------------------------------------------
def test_rows_are_bos_tokens_eos_then_pads(trained):
    ids, mask = trained(PROBES, context_length=L)
    assert ids.shape == mask.shape == (len(PROBES), L)
    assert ids.dtype == mask.dtype == np.int32
    for row, text in enumerate(PROBES):
        tokens = trained.encode(text)[: L - 2]
        n = len(tokens) + 2
        np.testing.assert_array_equal(ids[row, :n], [trained.bos_id, *tokens, trained.eos_id])
        np.testing.assert_array_equal(ids[row, n:], trained.pad_id)
        np.testing.assert_array_equal(mask[row], np.arange(L) < n)
    # The empty caption is <bos> <eos>.
    np.testing.assert_array_equal(mask[PROBES.index("")].sum(), 2)

    one, one_mask = trained(PROBES[0], context_length=L)
    np.testing.assert_array_equal(one, ids[:1])
    np.testing.assert_array_equal(one_mask, mask[:1])


def test_truncation_keeps_eos_as_the_last_token(trained):
    long = " ".join(CAPTIONS[:4])
    tokens = trained.encode(long)
    assert len(tokens) > L
    ids, mask = trained([long, "a circle"], context_length=L)
    np.testing.assert_array_equal(ids[0], [trained.bos_id, *tokens[: L - 2], trained.eos_id])
    np.testing.assert_array_equal(mask[0], 1)
    assert mask[1].sum() < L
    with pytest.raises(ValueError, match="context_length"):
        trained("a circle", context_length=1)


def test_unseen_and_unicode_text_encodes_without_unk_and_decodes_back(trained):
    texts = ["Ünïcode   café 日本語 🙂 naïve", "A ZEBRA-striped  dodecahedron", "x\u0308 q"]
    ids, mask = trained(texts, context_length=64)
    for row in range(len(texts)):
        real = ids[row, : mask[row].sum()]
        # <|endoftext|> is also the unk token: it may appear only as the final eos.
        assert (real[1:-1] != trained.eos_id).all()
    # Lowercased, whitespace collapsed, NFC composed; punctuation runs are their own words.
    assert trained.decode_batch(ids) == [
        "ünïcode café 日本語 🙂 naïve",
        "a zebra - striped dodecahedron",
        "ẍ q",
    ]


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------
def test_missing_directory_is_named(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(
        FileNotFoundError, match=r"nowhere.*tokenizer\.json.*vocab\.json.*merges\.txt"
    ):
        ClipTokenizer.from_dir(missing)


def test_directory_without_tokenizer_files_names_them(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*vocab\.json.*merges\.txt.*none"):
        ClipTokenizer.from_dir(str(tmp_path))
    trained.save(str(tmp_path))
    for name in ("tokenizer.json", "merges.txt"):
        os.remove(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"found vocab\.json"):
        ClipTokenizer.from_dir(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Parity with transformers and with OpenAI's BPE (the `peers` extra)
# ---------------------------------------------------------------------------------------------
HAND_MERGES = [
    ("t", "h"),
    ("th", "e</w>"),
    ("a", "t</w>"),
    ("c", "i"),
    ("ci", "r"),
    ("cir", "c"),
    ("l", "e</w>"),
    ("circ", "le</w>"),
    ("r", "e"),
    ("re", "d</w>"),
    ("o", "f</w>"),
    ("s", "q"),
    ("sq", "u"),
    ("a", "r"),
    ("ar", "e</w>"),
    ("squ", "are</w>"),
    ("'", "s</w>"),
    ("!", "!</w>"),
    ("e", "r"),
]


def _write_hand_vocab(path, special_tokens_map=None):
    """OpenAI's layout in miniature: bytes, bytes + "</w>", a few merges, the two specials."""
    base = list(_openai_bytes_to_unicode().values())
    tokens = [*base, *(c + "</w>" for c in base), *(a + b for a, b in HAND_MERGES)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8"
    )
    merges = "".join(f"{a} {b}\n" for a, b in HAND_MERGES)
    (path / "merges.txt").write_text("#version: 0.2\n" + merges, encoding="utf-8")
    if special_tokens_map is not None:
        (path / "special_tokens_map.json").write_text(json.dumps(special_tokens_map))
    return path


PARITY_PROBES = [
    *PROBES,
    "The cat's circle: THE red square at the circle!! Red, re-red, 3.14",
    "cafe\u0301 <|endoftext|> there",  # a combining accent (NFC) and a special token's text
    "the " * 80,
]
# Long enough that only the last probe is truncated, so every token of the others is compared.
PARITY_L = 64


def _hf_ids(hf_tok, texts, length):
    out = hf_tok(texts, padding="max_length", max_length=length, truncation=True)
    return np.asarray(out["input_ids"]), np.asarray(out["attention_mask"])


def _openai_entry(content):
    """A special token as openai/clip-vit-* special_tokens_map.json spells it."""
    return dict(content=content, lstrip=False, normalized=True, rstrip=False, single_word=False)


SPECIAL_TOKEN_MAPS = {
    "defaults": None,
    # OpenAI's checkpoints: serialized AddedTokens, matched on the normalized text.
    "openai": {
        "bos_token": _openai_entry(BOS_TOKEN),
        "eos_token": _openai_entry(EOS_TOKEN),
        "unk_token": _openai_entry(EOS_TOKEN),
        "pad_token": EOS_TOKEN,
    },
    # pad "!" as in e.g. Stable Diffusion 2's: "!" becomes a special token, in both.
    "pad!": {"pad_token": "!"},
}


@pytest.mark.peers
@pytest.mark.parametrize("special", SPECIAL_TOKEN_MAPS)
def test_hand_made_vocab_matches_transformers(tmp_path, special):
    transformers = pytest.importorskip(
        "transformers", reason="needs the peers extra: pip install -e '.[peers]'"
    )
    local = str(_write_hand_vocab(tmp_path / "hand", SPECIAL_TOKEN_MAPS[special]))
    ours = ClipTokenizer.from_dir(local)
    want_ids, want_mask = ours(PARITY_PROBES, context_length=PARITY_L)
    # In transformers 5 CLIPTokenizer and CLIPTokenizerFast are one `tokenizers`-backed class;
    # both names are checked so that a version with a distinct slow class is covered too.
    for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
        hf = cls.from_pretrained(local)
        hf_ids, hf_mask = _hf_ids(hf, PARITY_PROBES, PARITY_L)
        np.testing.assert_array_equal(want_ids, hf_ids, err_msg=cls.__name__)
        np.testing.assert_array_equal(want_mask, hf_mask, err_msg=cls.__name__)
        assert ours.pad_id == hf.pad_token_id

    # Our save of it (now with tokenizer.json) still reads the same in both.
    ours.save(str(tmp_path / "saved"))
    again = ClipTokenizer.from_dir(str(tmp_path / "saved"))
    np.testing.assert_array_equal(again(PARITY_PROBES, context_length=PARITY_L)[0], want_ids)
    hf = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path / "saved"))
    np.testing.assert_array_equal(_hf_ids(hf, PARITY_PROBES, PARITY_L)[0], want_ids)


@pytest.mark.peers
def test_trained_and_saved_tokenizer_loads_in_transformers(trained, tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="needs the peers extra: pip install -e '.[peers]'"
    )
    trained.save(str(tmp_path))
    want_ids, want_mask = trained(PARITY_PROBES, context_length=PARITY_L)
    hf = transformers.CLIPTokenizerFast.from_pretrained(str(tmp_path))
    hf_ids, hf_mask = _hf_ids(hf, PARITY_PROBES, PARITY_L)
    np.testing.assert_array_equal(want_ids, hf_ids)
    np.testing.assert_array_equal(want_mask, hf_mask)
    assert hf.model_max_length == 77
    assert len(hf) == trained.vocab_size
    # And from vocab.json + merges.txt alone, the files the slow class reads.
    os.remove(tmp_path / "tokenizer.json")
    hf = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))
    np.testing.assert_array_equal(_hf_ids(hf, PARITY_PROBES, PARITY_L)[0], want_ids)


def _openai_bytes_to_unicode() -> dict[int, str]:
    """OpenAI CLIP's bytes_to_unicode, restated here so the checks do not lean on ours."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _openai_bpe_ids(vocab, merges, text):
    """OpenAI CLIP's simple_tokenizer.encode, minus ftfy/html unescaping (no-ops here)."""
    regex = pytest.importorskip("regex", reason="needs the peers extra (transformers needs regex)")
    byte_encoder = _openai_bytes_to_unicode()
    ranks = {pair: i for i, pair in enumerate(merges)}
    pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
        regex.IGNORECASE,
    )
    text = regex.sub(r"\s+", " ", text).strip().lower()
    ids = []
    for token in regex.findall(pattern, text):
        if token in (BOS_TOKEN, EOS_TOKEN):  # OpenAI's bpe cache maps these to themselves
            ids.append(vocab[token])
            continue
        word = [byte_encoder[b] for b in token.encode("utf-8")]
        word[-1] += "</w>"
        while len(word) > 1:
            pairs = [(word[i], word[i + 1]) for i in range(len(word) - 1)]
            best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[t] for t in word]
    return ids


@pytest.mark.peers
@pytest.mark.parametrize("which", ["hand", "trained"])
def test_matches_openai_bpe_algorithm(trained, tmp_path, which):
    if which == "hand":
        tok = ClipTokenizer.from_dir(str(_write_hand_vocab(tmp_path)))
    else:
        tok = trained
    model = json.loads(tok.tokenizer.to_str())["model"]
    merges = [tuple(m) for m in model["merges"]]
    # NFC first: OpenAI gets it from ftfy.fix_text; none of the probes needs ftfy's other fixes.
    for text in PARITY_PROBES:
        want = _openai_bpe_ids(model["vocab"], merges, unicodedata.normalize("NFC", text))
        assert tok.encode(text) == want, text
