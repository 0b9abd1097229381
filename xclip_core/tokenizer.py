"""The CLIP text tokenizer used by X-CLIP, built on the Hugging Face ``tokenizers`` library.

It reproduces ``transformers.CLIPTokenizer`` of transformers 5.x (itself a ``tokenizers`` backend):

* normalizer: Unicode NFC, every run of whitespace replaced by one space, lower-casing;
* pre-tokenizer: CLIP's word regex (``'s 't 're 've 'm 'll 'd``, letter runs, single digits, runs of other
  non-space characters; whitespace dropped), then GPT-2 byte-level mapping;
* model: byte-level BPE whose word-final pieces end in ``</w>``;
* every text becomes ``<|startoftext|> ... <|endoftext|>``, padded with ``<|endoftext|>`` (id 49407) in the
  Hugging Face checkpoints; truncation keeps ``<|endoftext|>`` as the last token.

Like transformers (and unlike OpenAI's original ``SimpleTokenizer``), it does not run ``ftfy.fix_text`` or
``html.unescape`` on the text: ``"&amp;"`` stays three tokens, and mojibake is tokenized as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from xclip_core.sources import ModelSource

DATA_DIR = Path(__file__).resolve().parent / "data"
CONTEXT_LENGTH = 77
_LARGE_INTEGER = int(1e20)  # transformers stores "no limit" as model_max_length = int(1e30)
_WORD_REGEX = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
# In transformers' order: when two share a content (eos/unk/pad), the last one's flags win in the backend.
_DEFAULT_SPECIAL_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
_TOKEN_FLAGS = ("single_word", "lstrip", "rstrip", "normalized")


def _added_token(value: str | dict[str, Any] | AddedToken) -> AddedToken:
    """A special token from a config value: a string or a serialized ``AddedToken`` dict."""
    if isinstance(value, AddedToken):
        return value
    if isinstance(value, str):
        return AddedToken(value, special=True)
    flags = {flag: bool(value.get(flag, False)) for flag in _TOKEN_FLAGS}
    return AddedToken(value["content"], special=True, **flags)


def _token_json(token: AddedToken, type_field: bool) -> str | dict[str, Any]:
    """A special token for tokenizer_config.json / special_tokens_map.json, the way transformers reads it."""
    if not any(getattr(token, flag) for flag in _TOKEN_FLAGS):
        return token.content
    flags = {flag: getattr(token, flag) for flag in _TOKEN_FLAGS}
    state = {"content": token.content, "special": True, **flags}
    return {"__type": "AddedToken", **state} if type_field else state


class CLIPTokenizer:
    """CLIP byte-level BPE tokenizer, equivalent to ``transformers.CLIPTokenizer``.

    Build it with :meth:`from_pretrained`; ``CLIPTokenizer.from_pretrained()`` loads the standard OpenAI CLIP
    vocabulary bundled in ``xclip_core/data`` (the one every X-CLIP checkpoint uses). Stateless once built:
    safe to share between threads and to pickle (e.g. to Ray workers).
    """

    def __init__(
        self,
        vocab: dict[str, int],
        merges: list[tuple[str, str]],
        model_max_length: int = CONTEXT_LENGTH,
        special_tokens: dict[str, str | dict[str, Any] | AddedToken] | None = None,
    ):
        """``vocab``: token -> id; ``merges``: BPE merges by rank; ``special_tokens``: any of ``bos_token``,
        ``eos_token``, ``unk_token``, ``pad_token`` (strings or serialized ``AddedToken`` dicts)."""
        self.vocab = vocab
        self.merges = merges
        self.model_max_length = model_max_length
        tokens = {**_DEFAULT_SPECIAL_TOKENS, **(special_tokens or {})}
        self.special_tokens = {key: _added_token(tokens[key]) for key in _DEFAULT_SPECIAL_TOKENS}

        bpe = BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=self.unk_token,
        )
        self._tokenizer = tok = Tokenizer(bpe)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_WORD_REGEX), behavior="removed", invert=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(list(self.special_tokens.values()))
        tok.post_processor = processors.RobertaProcessing(
            (self.eos_token, self.eos_token_id),
            (self.bos_token, self.bos_token_id),
            trim_offsets=False,
            add_prefix_space=False,
        )

    # ----------------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls, src: str | os.PathLike | None = None, storage_options: dict[str, Any] | None = None
    ) -> CLIPTokenizer:
        """Load from a Hugging Face checkpoint directory (local path or fsspec URL such as ``s3://...``).

        Reads ``tokenizer.json`` if present, else ``vocab.json`` + ``merges.txt``; the optional
        ``tokenizer_config.json`` and ``special_tokens_map.json`` give ``model_max_length`` (77 when absent)
        and the special tokens. Only the BPE vocabulary and merges are taken from ``tokenizer.json``: the
        pipeline around them is always CLIP's, as in transformers. ``src=None`` loads the bundled OpenAI
        CLIP vocabulary.
        """
        source = ModelSource(DATA_DIR if src is None else src, storage_options)
        config = source.read_json("tokenizer_config.json") if source.exists("tokenizer_config.json") else {}
        # as in transformers, special_tokens_map.json overrides the config unless it has added_tokens_decoder
        if source.exists("special_tokens_map.json") and "added_tokens_decoder" not in config:
            config = {**config, **source.read_json("special_tokens_map.json")}

        if source.exists("tokenizer.json"):
            model = source.read_json("tokenizer.json").get("model", {})
            if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
                raise ValueError(f"{source.uri}/tokenizer.json holds no BPE model, so it is not CLIP's")
            vocab, merges = model["vocab"], model.get("merges", [])
        else:
            missing = [name for name in ("vocab.json", "merges.txt") if not source.exists(name)]
            if missing:
                raise FileNotFoundError(
                    f"{source.uri}: no CLIP tokenizer files: need tokenizer.json, or vocab.json and "
                    f"merges.txt (missing {' and '.join(missing)})"
                )
            vocab = source.read_json("vocab.json")
            lines = source.read_bytes("merges.txt").decode("utf-8").splitlines()
            merges = [line for line in lines if line and not line.startswith("#version")]

        pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{source.uri}: malformed BPE merges (each must be two tokens)")

        max_length = config.get("model_max_length")
        if not isinstance(max_length, (int, float)) or max_length > _LARGE_INTEGER:
            max_length = CONTEXT_LENGTH
        special = {key: config[key] for key in _DEFAULT_SPECIAL_TOKENS if config.get(key) is not None}
        return cls(vocab, pairs, model_max_length=int(max_length), special_tokens=special)

    def save_pretrained(
        self, directory: str | os.PathLike, storage_options: dict[str, Any] | None = None
    ) -> None:
        """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and ``special_tokens_map.json``:
        the Hugging Face layout that ``transformers.CLIPTokenizer.from_pretrained`` (and
        :meth:`from_pretrained`) reads. ``directory`` may be an fsspec URL."""
        target = ModelSource(directory, storage_options)
        target.fs.makedirs(target.root, exist_ok=True)
        special = {key: _token_json(token, type_field=False) for key, token in self.special_tokens.items()}
        config = {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": self.model_max_length,
            "clean_up_tokenization_spaces": False,
            **{key: _token_json(token, type_field=True) for key, token in self.special_tokens.items()},
        }
        vocab = dict(sorted(self.vocab.items(), key=lambda item: item[1]))
        files = {
            "vocab.json": json.dumps(vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
            "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False) + "\n",
        }
        for name, text in files.items():
            target.fs.pipe_file(target.path(name), text.encode("utf-8"))

    # ------------------------------------------------------------------------------------------ properties
    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (adds start/end tokens; no truncation or padding)."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (49408 for CLIP)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token(self) -> str:
        return self.special_tokens["bos_token"].content

    @property
    def eos_token(self) -> str:
        return self.special_tokens["eos_token"].content

    @property
    def unk_token(self) -> str:
        return self.special_tokens["unk_token"].content

    @property
    def pad_token(self) -> str:
        return self.special_tokens["pad_token"].content

    @property
    def bos_token_id(self) -> int:
        return self._tokenizer.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int:
        return self._tokenizer.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        return self._tokenizer.token_to_id(self.pad_token)

    # ------------------------------------------------------------------------------------------ encoding
    def __call__(
        self,
        text: str | list[str],
        padding: bool | str = "max_length",
        truncation: bool = True,
        max_length: int | None = None,
        return_tensors: str | None = "pt",
    ) -> dict[str, Any]:
        """Tokenize one text or a batch, with the same argument meanings as a transformers tokenizer call.

        Args:
            text: a string or a list of strings.
            padding: ``"max_length"`` (default) pads every sequence with the pad token to ``max_length``, i.e.
                to the 77-token context length the model expects; ``True``/``"longest"`` pads to the longest
                sequence of the batch; ``False``/``"do_not_pad"`` does not pad. (transformers defaults to
                ``False``; X-CLIP pipelines usually pass ``padding="max_length"`` or ``True`` explicitly.)
            truncation: cut sequences longer than ``max_length`` to ``max_length`` tokens, keeping
                ``<|endoftext|>`` as the last one (default ``True``).
            max_length: defaults to ``model_max_length`` (77).
            return_tensors: ``"pt"`` (default) for ``torch.long`` tensors of shape ``(batch, length)`` (a
                single string gives a batch of one); ``None`` for lists (a flat list for a single string).

        Returns:
            ``{"input_ids": ..., "attention_mask": ...}``; the mask is 1 on tokens and 0 on padding.
        """
        if padding not in (True, False, "longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be a bool, 'longest', 'max_length' or 'do_not_pad': {padding!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, not {return_tensors!r}")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("text must be a string or a list of strings")
        max_length = self.model_max_length if max_length is None else max_length
        if truncation and max_length < 2:
            raise ValueError(f"max_length={max_length} leaves no room for the start and end tokens")

        ids = [encoding.ids for encoding in self._tokenizer.encode_batch(texts)]
        if truncation:  # the end token stays last, as with the `tokenizers` truncation transformers uses
            ids = [seq if len(seq) <= max_length else seq[: max_length - 1] + seq[-1:] for seq in ids]
        if padding == "max_length":
            length = max_length
        elif padding in (True, "longest"):
            length = max(map(len, ids), default=0)
        else:
            length = 0
        mask = [[1] * len(seq) + [0] * (length - len(seq)) for seq in ids]
        ids = [seq + [self.pad_token_id] * (length - len(seq)) for seq in ids]

        if return_tensors is None:
            if isinstance(text, str):
                return {"input_ids": ids[0], "attention_mask": mask[0]}
            return {"input_ids": ids, "attention_mask": mask}
        if len({len(seq) for seq in ids}) > 1:
            raise ValueError("sequences differ in length; pass padding=True or 'max_length' to get tensors")
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }

    def decode(self, ids: list[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of a sequence of ids; special tokens (padding included) are dropped unless
        ``skip_special_tokens=False``."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    def __repr__(self) -> str:
        return f"CLIPTokenizer(vocab_size={self.vocab_size}, model_max_length={self.model_max_length})"
