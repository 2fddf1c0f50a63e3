"""The CLIP text tokenizer: byte-level BPE with a "</w>" end-of-word suffix, on `tokenizers`.

`ClipTokenizer.from_dir` reads a Hugging Face CLIP checkpoint directory offline: its
`tokenizer.json` when there is one, else `vocab.json` + `merges.txt` built into the pipeline that
transformers' `convert_slow_tokenizer.CLIPConverter` builds. `ClipTokenizer.train` fits a small
vocabulary of the same kind to a caption set (a CLIP trained from scratch on `shapes` needs a few
hundred tokens, not OpenAI's 49,408). `save` writes the layout both loaders read back.

Id layout of a trained vocabulary, as in OpenAI's: the 256 byte symbols, the same 256 with
"</w>", one token per merge, then <|startoftext|> and <|endoftext|>.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
DEFAULT_MODEL_MAX_LENGTH = 77

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

# CLIPConverter's split: contractions, letter runs, single digits, other non-space runs.
_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# transformers writes int(1e30) as model_max_length when a checkpoint sets none.
_NO_MAX_LENGTH = 10**6
_SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


@functools.cache
def _bytes_to_unicode() -> tuple[str, ...]:
    """The 256 byte symbols in OpenAI CLIP's vocabulary order (printable bytes first).

    Byte b maps to chr(b) when printable, else to chr(256 + n) for the n-th unprintable byte;
    this is the map the ByteLevel pre-tokenizer uses, in the order OpenAI lists the vocabulary.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + n) for n, b in enumerate(rest)})
    return tuple(chars[b] for b in [*printable, *rest])


def _clip_pipeline(tokenizer: Tokenizer) -> None:
    """Set CLIPConverter's normalizer, pre-tokenizer and decoder on `tokenizer` in place."""
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()


def _clip_bpe(vocab: Mapping[str, int], merges: Sequence[tuple[str, str]], unk: str) -> BPE:
    return BPE(
        vocab=dict(vocab),
        merges=list(merges),
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD,
        fuse_unk=False,
        unk_token=unk,
    )


def _token_content(value: Any) -> str | None:
    """The token string of a config entry: a plain string or a serialized AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_token(value: str | dict[str, Any]) -> AddedToken:
    """A special AddedToken, keeping the flags a serialized AddedToken dict carries."""
    if isinstance(value, str):
        return AddedToken(value, special=True)
    flags = {k: value[k] for k in ("single_word", "lstrip", "rstrip", "normalized") if k in value}
    return AddedToken(value["content"], special=True, **flags)


def _special_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/pad/unk entries as transformers 5 resolves them from the two config files.

    With an `added_tokens_decoder` in tokenizer_config.json, the names come from the config and
    the flags from the decoder, and special_tokens_map.json is not read; without one (older
    checkpoints) special_tokens_map.json overrides the config.
    """
    entries = {k: config[k] for k in _SPECIAL_KEYS if config.get(k) is not None}
    decoder = config.get("added_tokens_decoder")
    if decoder:
        by_content = {v["content"]: v for v in decoder.values() if isinstance(v, dict)}
        entries = {k: by_content.get(_token_content(v), v) for k, v in entries.items()}
    else:
        entries.update({k: special_map[k] for k in _SPECIAL_KEYS if special_map.get(k) is not None})
    entries.setdefault("bos_token", BOS_TOKEN)
    entries.setdefault("eos_token", EOS_TOKEN)
    entries.setdefault("unk_token", EOS_TOKEN)
    entries.setdefault("pad_token", entries["eos_token"])
    return entries


def _token_dict(token: AddedToken) -> dict[str, Any]:
    """An AddedToken as transformers serializes it in tokenizer_config.json."""
    return {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
        "special": token.special,
    }


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _merge_pairs(merges: Sequence[str | Sequence[str]]) -> list[tuple[str, str]]:
    """tokenizer.json merges as pairs: "a b" strings in older files, [a, b] lists since 0.20."""
    return [tuple(m.split(" ")) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _read_merges(path: str) -> list[tuple[str, str]]:
    """merges.txt as (left, right) pairs, skipping the "#version" header as `tokenizers` does."""
    merges = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(
                    f"{path}:{n}: a merge is two tokens separated by a space: {line!r}"
                )
            merges.append((parts[0], parts[1]))
    return merges


class ClipTokenizer:
    """CLIP's tokenizer: text -> fixed-length (input_ids, attention_mask) int32 arrays.

    Wraps a `tokenizers.Tokenizer` whose encodings carry no special tokens; `__call__` adds
    <|startoftext|> ... <|endoftext|>, truncates and pads. Special tokens are added to the
    backend as special AddedTokens, as transformers does, so their literal text in a caption
    encodes to their id.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        bos_token: str | dict[str, Any] = BOS_TOKEN,
        eos_token: str | dict[str, Any] = EOS_TOKEN,
        pad_token: str | dict[str, Any] = EOS_TOKEN,
        unk_token: str | dict[str, Any] = EOS_TOKEN,
        model_max_length: int | None = DEFAULT_MODEL_MAX_LENGTH,
    ):
        """Wrap `tokenizer`; tokens are strings or serialized AddedToken dicts (HF configs)."""
        self._tokenizer = tokenizer
        # A tokenizer.json may carry its own truncation/padding; ours are applied in __call__.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        specials = {"bos": bos_token, "eos": eos_token, "pad": pad_token, "unk": unk_token}
        self._special = {k: _token_content(v) for k, v in specials.items()}
        # transformers adds every named special token; ones already in the vocab keep their id.
        tokenizer.add_special_tokens([_added_token(v) for v in specials.values()])
        self._ids = {}
        for name, token in self._special.items():
            token_id = tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"The {name} token {token!r} has no id in the tokenizer.")
            self._ids[name] = token_id
        if tokenizer.post_processor is None:
            # CLIPConverter's "hack to have a ByteLevel and TemplateProcessor": Roberta-style
            # <bos> A <eos>. Only transformers uses it; __call__ adds the specials itself.
            tokenizer.post_processor = processors.RobertaProcessing(
                (self._special["eos"], self.eos_id),
                (self._special["bos"], self.bos_id),
                False,
                False,
            )
        self.model_max_length = model_max_length

    # -----------------------------------------------------------------------------------------
    # Loading
    # -----------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str) -> ClipTokenizer:
        """Load from a Hugging Face CLIP checkpoint directory, offline.

        Uses `tokenizer.json` if present, else builds CLIPConverter's tokenizer from
        `vocab.json` + `merges.txt`. Special tokens and `model_max_length` come from
        `tokenizer_config.json` and `special_tokens_map.json`, read as transformers 5 reads
        them; the defaults are OpenAI's: <|startoftext|>, and <|endoftext|> for eos, pad, unk.
        """
        path = os.fspath(path)
        looked_for = f"{TOKENIZER_FILE}, or {VOCAB_FILE} + {MERGES_FILE}"
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"No CLIP tokenizer directory at {path!r} (looked for {looked_for})."
            )
        config_file = os.path.join(path, CONFIG_FILE)
        config = _read_json(config_file) if os.path.isfile(config_file) else {}
        map_file = os.path.join(path, SPECIAL_TOKENS_FILE)
        special_map = _read_json(map_file) if os.path.isfile(map_file) else {}
        specials = _special_tokens(config, special_map)
        max_length = config.get("model_max_length", DEFAULT_MODEL_MAX_LENGTH)
        if max_length is not None:
            max_length = int(max_length) if int(max_length) < _NO_MAX_LENGTH else None

        tokenizer_file = os.path.join(path, TOKENIZER_FILE)
        vocab_file = os.path.join(path, VOCAB_FILE)
        merges_file = os.path.join(path, MERGES_FILE)
        if os.path.isfile(tokenizer_file):
            tokenizer = Tokenizer.from_file(tokenizer_file)
        elif os.path.isfile(vocab_file) and os.path.isfile(merges_file):
            unk = _token_content(specials["unk_token"])
            tokenizer = cls._build(_read_json(vocab_file), _read_merges(merges_file), unk=unk)
        else:
            present = [
                n
                for n in (TOKENIZER_FILE, VOCAB_FILE, MERGES_FILE)
                if os.path.isfile(os.path.join(path, n))
            ]
            raise FileNotFoundError(
                f"No CLIP tokenizer in {path!r}: looked for {looked_for}; found "
                f"{', '.join(present) or 'none of them'}."
            )
        return cls(tokenizer, model_max_length=max_length, **specials)

    @staticmethod
    def _build(
        vocab: Mapping[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        unk: str,
    ) -> Tokenizer:
        """CLIPConverter.converted(): BPE + NFC/whitespace/lowercase + split + ByteLevel."""
        tokenizer = Tokenizer(_clip_bpe(vocab, merges, unk))
        _clip_pipeline(tokenizer)
        return tokenizer  # __init__ adds the special tokens and the post-processor

    # -----------------------------------------------------------------------------------------
    # Training
    # -----------------------------------------------------------------------------------------
    @classmethod
    def train(
        cls, captions: Iterable[str], *, vocab_size: int, min_frequency: int = 2
    ) -> ClipTokenizer:
        """Fit a CLIP-style byte-level BPE to `captions` with `tokenizers`' BpeTrainer.

        `vocab_size` counts everything: the 512 byte symbols (with and without "</w>", so any
        text encodes without <unk>), the merges and the two special tokens; it is at least 514
        and an upper bound, reached only if the captions have enough pairs seen
        `min_frequency` times. The result is deterministic for the same captions.
        """
        base = _bytes_to_unicode()
        suffixed = [c + END_OF_WORD for c in base]
        if vocab_size < 2 * len(base) + 2:
            raise ValueError(
                f"vocab_size={vocab_size} is below the {2 * len(base) + 2} byte symbols and "
                "special tokens every CLIP byte-level vocabulary holds."
            )
        tokenizer = Tokenizer(_clip_bpe({}, [], EOS_TOKEN))
        _clip_pipeline(tokenizer)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            # The "</w>" symbols go in as special tokens so they all exist with fixed ids: left
            # to the trainer they get ids in hash-map order, and ties between equally frequent
            # pairs (common in template captions) are broken by id, so merges varied per run.
            special_tokens=[*suffixed, BOS_TOKEN, EOS_TOKEN],
            initial_alphabet=list(base),
            end_of_word_suffix=END_OF_WORD,
            continuing_subword_prefix="",
            show_progress=False,
        )
        tokenizer.train_from_iterator(captions, trainer)

        # Re-lay the ids out as OpenAI's: bytes, bytes + "</w>", merges, then specials.
        merges = _merge_pairs(json.loads(tokenizer.to_str())["model"]["merges"])
        vocab = {token: i for i, token in enumerate([*base, *suffixed])}
        for left, right in merges:
            vocab.setdefault(left + right, len(vocab))
        vocab[BOS_TOKEN] = len(vocab)
        vocab[EOS_TOKEN] = len(vocab)
        built = cls._build(vocab, merges, unk=EOS_TOKEN)
        return cls(built)

    # -----------------------------------------------------------------------------------------
    # Encoding and decoding
    # -----------------------------------------------------------------------------------------
    def __call__(
        self, texts: str | Sequence[str], *, context_length: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokenize to (input_ids, attention_mask), both int32 (B, context_length).

        Each row is <bos> tokens <eos> then pad ids, mask 1 on the real tokens. A caption too
        long keeps its first context_length - 2 tokens and still ends in <eos>, as transformers'
        truncation=True, max_length=context_length does. A single string gives B = 1.
        """
        if context_length < 2:
            raise ValueError(f"context_length must hold <bos> and <eos>, got {context_length}.")
        if isinstance(texts, str):
            texts = [texts]
        encodings = self._tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
        input_ids = np.full((len(encodings), context_length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(encodings), context_length), dtype=np.int32)
        for row, encoding in enumerate(encodings):
            ids = [self.bos_id, *encoding.ids[: context_length - 2], self.eos_id]
            input_ids[row, : len(ids)] = ids
            mask[row, : len(ids)] = 1
        return input_ids, mask

    def encode(self, text: str) -> list[int]:
        """The ids of `text`'s tokens, without <bos>/<eos>."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int] | np.ndarray, *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`: words joined by single spaces, as CLIP's decode gives them."""
        text = self._tokenizer.decode(
            [int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens
        )
        # The ByteLevel decoder leaves the "</w>" markers; they are the word breaks.
        return text.replace(END_OF_WORD, " ").strip()

    def decode_batch(self, ids: np.ndarray, *, skip_special_tokens: bool = True) -> list[str]:
        """`decode` of each row of a (B, L) id array."""
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in ids]

    @property
    def tokenizer(self) -> Tokenizer:
        """The wrapped `tokenizers.Tokenizer`."""
        return self._tokenizer

    @property
    def bos_id(self) -> int:
        """Id of <|startoftext|> (or the checkpoint's bos token)."""
        return self._ids["bos"]

    @property
    def eos_id(self) -> int:
        """Id of <|endoftext|> (or the checkpoint's eos token)."""
        return self._ids["eos"]

    @property
    def pad_id(self) -> int:
        """Id of the pad token: eos in OpenAI's CLIP, "!" in some checkpoints."""
        return self._ids["pad"]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included: the text encoder's embedding rows."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    # -----------------------------------------------------------------------------------------
    # Saving
    # -----------------------------------------------------------------------------------------
    def save(self, path: str) -> None:
        """Write the Hugging Face layout into `path`, creating it; other files there stay.

        tokenizer.json for `tokenizers` / transformers' fast class, vocab.json + merges.txt for
        the slow one, tokenizer_config.json and special_tokens_map.json for the special tokens.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._tokenizer.save(os.path.join(path, TOKENIZER_FILE))

        model = json.loads(self._tokenizer.to_str())["model"]
        if model.get("type") == "BPE":
            vocab = dict(model["vocab"])
            # Added tokens outside the BPE vocab (none in OpenAI's or ours) keep their ids.
            for token_id, token in self._tokenizer.get_added_tokens_decoder().items():
                vocab.setdefault(token.content, token_id)
            vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
            merges = _merge_pairs(model["merges"])
            with open(os.path.join(path, VOCAB_FILE), "w", encoding="utf-8") as f:
                json.dump(vocab, f, ensure_ascii=False)
            with open(os.path.join(path, MERGES_FILE), "w", encoding="utf-8") as f:
                f.write("#version: 0.2\n")
                f.writelines(f"{left} {right}\n" for left, right in merges)

        added_tokens = self._tokenizer.get_added_tokens_decoder()
        added = {str(i): _token_dict(t) for i, t in sorted(added_tokens.items())}
        names = dict(zip(_SPECIAL_KEYS, ("bos", "eos", "pad", "unk"), strict=True))
        # As transformers writes them: names in the config, flags in added_tokens_decoder and
        # in special_tokens_map.json (which older readers use).
        special_map = {
            key: {
                k: v for k, v in _token_dict(added_tokens[self._ids[n]]).items() if k != "special"
            }
            for key, n in names.items()
        }
        config = {
            "tokenizer_class": "CLIPTokenizer",
            **{key: self._special[n] for key, n in names.items()},
            # int(1e30) is transformers' "no limit".
            "model_max_length": self.model_max_length or int(1e30),
            "do_lower_case": True,
            "errors": "replace",
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": added,
        }
        with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        with open(os.path.join(path, SPECIAL_TOKENS_FILE), "w", encoding="utf-8") as f:
            json.dump(special_map, f, indent=2, ensure_ascii=False)
