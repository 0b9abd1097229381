"""Parity of xclip_core.tokenizer.CLIPTokenizer with the reference, transformers.CLIPTokenizer (5.x)."""

from __future__ import annotations

import json
import pickle
import random
import shutil
import unicodedata

import fsspec
import pytest
import torch

from xclip_core.tokenizer import DATA_DIR, CLIPTokenizer

transformers = pytest.importorskip("transformers")

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]  # known CLIP ids of "a photo of a cat"

HAND_PICKED = [
    "a photo of a cat",
    "A Photo Of A CAT",
    "",
    " ",
    "   \t\n  ",
    "\u00a0\u2003\u3000",
    "a person playing guitar",
    "a man is dancing on the stage while the crowd cheers",
    # accents, NFC vs NFD, combining characters
    "café crème brûlée à la mode",
    unicodedata.normalize("NFD", "café crème brûlée à la mode"),
    "e\u0301 vs \u00e9 and a\u030a vs \u00e5",
    "Z\u0351\u036b\u0343a\u0352l\u0357g\u0350o text",
    "Ångström, naïve coöperation, façade, jalapeño",
    "ÉCOLE NORMALE SUPÉRIEURE",
    "İstanbul ıi ß ẞ ǅ ﬁ ﬀ",
    "Ωμέγα ΑΛΦΑ σίσυφος",
    # CJK, Arabic, Hebrew, Hindi, Thai, Korean, Cyrillic
    "一只猫在沙发上睡觉",
    "東京タワーの夜景",
    "고양이가 소파에서 자고 있다",
    "قطة تنام على الأريكة",
    "חתול ישן על הספה",
    "एक बिल्ली सोफे पर सो रही है",
    "แมวนอนอยู่บนโซฟา",
    "Кошка спит на диване",
    "mixed 中文 and English 和 العربية",
    # emoji: plain, skin tones, ZWJ sequences, flags, keycaps, variation selectors
    "a dog 🐶 running 🏃",
    "👍🏻👍🏼👍🏽👍🏾👍🏿",
    "family 👨\u200d👩\u200d👧\u200d👦 and 🏳️\u200d🌈",
    "🇺🇸🇯🇵🇫🇷 flags",
    "1️⃣ 2️⃣ #️⃣ keycaps",
    "❤️ ♥ ❤ \ufe0f",
    "😀😃😄😁😆😅😂🤣",
    # punctuation runs
    "wow!!! really??? ... --- ***",
    "(parenthesized) [bracketed] {braced} <angled>",
    "a,b;c:d.e!f?g",
    "\"quoted\" 'single' `backtick`",
    "---===+++###@@@$$$%%%^^^&&&***",
    "C:\\Users\\name\\file.txt and /usr/bin/env",
    "https://example.com/path?query=1&x=y#frag",
    "email@example.com #hashtag @mention",
    "<|endoftext|>",
    "<|startoftext|> hello <|endoftext|> world",
    "<|ENDOFTEXT|> and <|EndOfText|>",
    "<|endoftext|><|endoftext|><|startoftext|>",
    "x<|endoftext|>y",
    # numbers
    "1234567890",
    "3.14159 and 2,718 and 1,000,000",
    "the 1st, 2nd, 3rd and 4th place",
    "1990s 80s '90s",
    "-42 +7 1e10 0x1F 50% $9.99 €5",
    "٣٤٥ ١٢ ৩৪ ௫",
    "½ ¼ ² ³ Ⅻ ⑤",
    # apostrophes and contractions
    "it's don't they're we've I'm you'll he'd",
    "IT'S DON'T THEY'RE WE'VE I'M YOU'LL HE'D",
    "it’s don’t they’re — curly quotes ‘single’ “double”",
    "'s 't 're 've 'm 'll 'd",
    "''''s rock'n'roll o'clock y'all",
    "the cat's toy and the cats' toys",
    # mixed case, whitespace
    "CamelCaseWords and snake_case_words and kebab-case-words",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u2009thin\u200bzero width",
    "multiple     spaces    between   words",
    "  leading and trailing spaces  ",
    "\n\n\nnewlines only at start",
    # HTML entities, mojibake
    "Tom &amp; Jerry &lt;3 &quot;cartoon&quot; &#39;ok&#39; &nbsp;",
    "cafÃ© crÃ¨me â€™ â€œ â€\x9d",
    "Ã©Ã¨Ãª Ã¼ Ã¶",
    "\ufffd replacement and \x00 null \x07 bell \x1b escape",
    "soft\u00adhyphen and zero\u200cwidth non\u200djoiner",
    "\ufeffbyte order mark",
    # long texts (truncation)
    "a " * 74,
    "a " * 75,
    "a " * 76,
    "a " * 77,
    "a " * 200,
    " ".join(["the quick brown fox jumps over the lazy dog"] * 12),
    "supercalifragilisticexpialidocious " * 20,
    "🐱" * 60,
    "一只猫" * 50,
]


def _generated(n: int, seed: int = 0) -> list[str]:
    """Random strings mixing every class of character above, of varied lengths."""
    rng = random.Random(seed)
    pieces = [
        "cat", "Dog", "RUNNING", "photo", "of", "a", "the", "video", "x", "q",
        "it's", "don't", "we'll", "I'd", "you're", "they've", "I'm", "’s", "'",
        "0", "7", "42", "3.5", "1,000", "3rd", "2nd", "1990s",
        "!", "?", "...", "!!", "--", "&amp;", "&", "#", "@", "(", ")", "\"", "<", ">", "|",
        " ", "  ", "\t", "\n", "\u00a0", "\u3000", "\u200b", "\u200d",
        "é", "e\u0301", "ñ", "ü", "Å", "ß", "İ", "ø", "\u0301", "\u0308",
        "猫", "東京", "한국", "عربي", "עברית", "हिन्दी", "ไทย", "Москва",
        "🐱", "👍🏽", "👨\u200d👩\u200d👧", "🏳️\u200d🌈", "🇯🇵", "❤️",
        "Ã©", "â€™", "\ufffd", "<|endoftext|>", "<|startoftext|>",
    ]  # fmt: skip
    out = []
    for _ in range(n):
        count = rng.choice([1, 2, 3, 5, 8, 13, 30, 60, 120])
        seps = ["", " ", " ", " ", "  ", "\t", "\n"]
        out.append("".join(rng.choice(pieces) + rng.choice(seps) for _ in range(count)))
    return out


CORPUS = HAND_PICKED + _generated(250)
SHORT_CORPUS = HAND_PICKED + _generated(30, seed=1)  # for the tests about loading


@pytest.fixture(scope="module")
def ours() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained()


@pytest.fixture(scope="module")
def saved_dir(ours, tmp_path_factory):
    directory = tmp_path_factory.mktemp("saved")
    ours.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reference(saved_dir):
    """transformers' tokenizer, loaded from our save_pretrained output (so this also checks that output)."""
    return transformers.CLIPTokenizer.from_pretrained(saved_dir)


def _hf(reference, texts, **kwargs):
    return dict(reference(texts, **kwargs))


def test_corpus_is_large_and_varied():
    assert len(set(CORPUS)) >= 200
    assert sum(len(t) > 300 for t in CORPUS) >= 20


def test_known_ids(ours, reference):
    assert ours("a photo of a cat", padding=False, return_tensors=None)["input_ids"] == CAT_IDS
    assert reference("a photo of a cat")["input_ids"] == CAT_IDS
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49406, 49407, 49407)
    assert (ours.vocab_size, ours.model_max_length) == (49408, 77)


def test_bundled_vocab_matches_openai_layout():
    vocab = json.loads((DATA_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (DATA_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[0] == "#version: 0.2" and len(lines) == 1 + 48894
    assert sorted(vocab.values()) == list(range(49408))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["Ā"] == 188 and vocab["Ā</w>"] == 444
    # every merge adds the concatenation of its pair, in rank order, after the 512 byte tokens
    assert all(vocab[line.replace(" ", "")] == 512 + rank for rank, line in enumerate(lines[1:]))


def test_same_backend_pipeline(ours, reference):
    mine = json.loads(ours.backend_tokenizer.to_str())
    theirs = json.loads(reference.backend_tokenizer.to_str())
    for key in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "model", "added_tokens"):
        assert mine[key] == theirs[key], key


def test_saved_files_do_not_change_reference(reference):
    """transformers reading the bundled vocab.json/merges.txt directly agrees with it reading our copy."""
    direct = transformers.CLIPTokenizer.from_pretrained(DATA_DIR, model_max_length=77)
    kwargs = {"padding": "max_length", "truncation": True}
    assert _hf(direct, CORPUS, **kwargs) == _hf(reference, CORPUS, **kwargs)


@pytest.mark.parametrize("truncation", [True, False])
def test_parity_pad_to_max_length(ours, reference, truncation):
    got = ours(CORPUS, truncation=truncation, return_tensors=None)  # default padding="max_length"
    want = _hf(reference, CORPUS, padding="max_length", truncation=truncation)
    assert got == want
    if truncation:
        assert {len(ids) for ids in got["input_ids"]} == {77}
    else:
        assert max(len(ids) for ids in got["input_ids"]) > 77


@pytest.mark.parametrize("truncation", [True, False])
def test_parity_no_padding(ours, reference, truncation):
    got = ours(CORPUS, padding=False, truncation=truncation, return_tensors=None)
    assert got == _hf(reference, CORPUS, padding=False, truncation=truncation)


def test_parity_pad_to_longest_tensors(ours, reference):
    for start in range(0, len(CORPUS), 7):  # batches of different longest lengths
        batch = CORPUS[start : start + 7]
        got = ours(batch, padding=True)
        want = reference(batch, padding=True, truncation=True, return_tensors="pt")
        assert got["input_ids"].dtype == torch.long
        assert torch.equal(got["input_ids"], want["input_ids"])
        assert torch.equal(got["attention_mask"], want["attention_mask"])


@pytest.mark.parametrize("padding", ["max_length", True, False])
def test_parity_custom_max_length(ours, reference, padding):
    for max_length in (2, 5, 16, 100):
        got = ours(CORPUS, padding=padding, max_length=max_length, return_tensors=None)
        assert got == _hf(reference, CORPUS, padding=padding, truncation=True, max_length=max_length)


def test_parity_single_string(ours, reference):
    for text in HAND_PICKED:
        got = ours(text, return_tensors=None)
        assert got == _hf(reference, text, padding="max_length", truncation=True)
        tensors = ours(text)
        want = reference(text, padding="max_length", truncation=True, return_tensors="pt")
        assert tensors["input_ids"].shape == (1, 77)
        assert torch.equal(tensors["input_ids"], want["input_ids"])
        assert torch.equal(tensors["attention_mask"], want["attention_mask"])


def test_parity_decode(ours, reference):
    for ids in ours(CORPUS, padding=False, truncation=False, return_tensors=None)["input_ids"]:
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids, skip_special_tokens=False)
    assert ours.decode(ours("A Photo of a CAT!")["input_ids"][0]) == "a photo of a cat !"


def _copy_to(fs_url: str, files: dict[str, bytes]) -> None:
    fs, root = fsspec.core.url_to_fs(fs_url)
    for name, data in files.items():
        fs.pipe_file(f"{root}/{name}", data)


def _parity(tok: CLIPTokenizer, reference, texts=SHORT_CORPUS) -> None:
    assert tok(texts, return_tensors=None) == _hf(reference, texts, padding="max_length", truncation=True)


def test_from_memory_and_file_urls(saved_dir, reference):
    files = {path.name: path.read_bytes() for path in saved_dir.iterdir()}
    _copy_to("memory://xclip-test/tokenizer", files)
    _parity(CLIPTokenizer.from_pretrained("memory://xclip-test/tokenizer"), reference)
    _parity(CLIPTokenizer.from_pretrained(saved_dir.as_uri()), reference)
    assert saved_dir.as_uri().startswith("file://")


def test_from_tokenizer_json(tmp_path, reference):
    """transformers 5 saves tokenizer.json + tokenizer_config.json only; we read vocab and merges from it."""
    reference.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists() and not (tmp_path / "merges.txt").exists()
    _parity(CLIPTokenizer.from_pretrained(tmp_path), reference)


def test_hub_style_config_with_added_token_dicts(tmp_path):
    """Hub checkpoints (openai/clip-*, microsoft/xclip-*) store special tokens as AddedToken dicts."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA_DIR / name, tmp_path / name)

    def token(content: str) -> dict:
        flags = {"lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
        return {"content": content, **flags}

    specials = {
        "bos_token": token("<|startoftext|>"),
        "eos_token": token("<|endoftext|>"),
        "unk_token": token("<|endoftext|>"),
        "pad_token": "<|endoftext|>",
    }
    config = {k: {"__type": "AddedToken", **v} if isinstance(v, dict) else v for k, v in specials.items()}
    config.update(model_max_length=77, tokenizer_class="CLIPTokenizer", do_lower_case=True, errors="replace")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(specials))
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    texts = [*SHORT_CORPUS, "<|StartOfText|> shouting <|STARTOFTEXT|>", "a <|startoftext|>b", "<|EndOfText|>"]
    _parity(ours, reference, texts)
    assert (
        json.loads(ours.backend_tokenizer.to_str())["added_tokens"]
        == json.loads(reference.backend_tokenizer.to_str())["added_tokens"]
    )
    # the normalized=True flag survives our save_pretrained
    ours.save_pretrained(tmp_path / "again")
    _parity(CLIPTokenizer.from_pretrained(tmp_path / "again"), reference, texts)
    _parity(ours, transformers.CLIPTokenizer.from_pretrained(tmp_path / "again"), texts)


def test_other_pad_token_and_max_length(tmp_path):
    """Some CLIP checkpoints pad with "!" (id 0); model_max_length comes from tokenizer_config.json."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "!", "model_max_length": 32}))
    ours = CLIPTokenizer.from_pretrained(tmp_path)
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert (ours.pad_token_id, ours.model_max_length) == (0, 32)
    _parity(ours, reference)
    got = ours(SHORT_CORPUS, padding=True, return_tensors=None)
    assert got == _hf(reference, SHORT_CORPUS, padding=True, truncation=True)


def test_no_limit_model_max_length_means_context_length(tmp_path):
    """transformers writes model_max_length=int(1e30) for "no limit"; the model's limit is 77 tokens."""
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(DATA_DIR / name, tmp_path / name)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"model_max_length": int(1e30)}))
    assert CLIPTokenizer.from_pretrained(tmp_path).model_max_length == 77


def test_round_trip(ours, saved_dir, tmp_path):
    loaded = CLIPTokenizer.from_pretrained(saved_dir)
    assert loaded.vocab == ours.vocab and loaded.merges == ours.merges
    assert loaded(CORPUS, return_tensors=None) == ours(CORPUS, return_tensors=None)
    loaded.save_pretrained(tmp_path)
    for path in saved_dir.iterdir():
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    for name in ("vocab.json", "merges.txt"):
        assert (saved_dir / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
    unpickled = pickle.loads(pickle.dumps(ours))  # e.g. shipped to Ray workers
    assert unpickled(CORPUS[:20], return_tensors=None) == ours(CORPUS[:20], return_tensors=None)


def test_missing_files_name_the_source(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"vocab\.json and merges\.txt") as err:
        CLIPTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)
    shutil.copy(DATA_DIR / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match=r"missing merges\.txt") as err:
        CLIPTokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="memory://nowhere/at-all"):
        CLIPTokenizer.from_pretrained("memory://nowhere/at-all")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="tokenizer.json"):
        CLIPTokenizer.from_pretrained(tmp_path)


def test_argument_errors(ours):
    with pytest.raises(ValueError, match="padding"):
        ours("x", padding="longest_first")
    with pytest.raises(ValueError, match="return_tensors"):
        ours("x", return_tensors="np")
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "a b c"], padding=False)
    with pytest.raises(TypeError):
        ours(["a", 3])
    assert ours.decode(ours("hello world")["input_ids"][0]) == "hello world"
