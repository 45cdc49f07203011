"""tokenizer.py, as a specification: our Tokenizer gives the ids, the text and the chat prompts that
transformers gives, whether it was loaded from a tokenizer.json, from a sentencepiece tokenizer.model, or
from tokenizer files rebuilt out of a GGUF file's metadata."""

import json
import random
import shutil
from types import SimpleNamespace

import gguf
import jinja2
import pytest
import sentencepiece
import tokenizers
from transformers import AutoTokenizer

from tokenizer import Tokenizer, load_tokenizer, tokenizer_files_from_gguf

TEXTS = [
    "The quick brown fox jumps over the lazy dog. It wasn't the fox's fault, they'll say.",
    "def add(a, b):\n    if a:\n        return a + b\n\treturn None  # tab\n",
    "12345 3.14 1,000,000 and 2024-01-31",
    "Café naïve résumé, Zürich; 你好，世界! こんにちは 😀🎉👍🏽 Ελληνικά",
    "many   spaces\n\n\nand\r\nnewlines  \n   ",
    "  leading and trailing spaces  ",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there!"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "7"},
        {"role": "user", "content": "Another one, with ünïcödé?"},
    ],
    [
        {"role": "user", "content": "Write a haiku."},
        {"role": "assistant", "content": "Leaves fall\nsilently"},
        {"role": "user", "content": "Thanks"},
    ],
]


def assert_same_as_transformers(ours: Tokenizer, reference) -> None:
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text).input_ids, text
        assert ours.decode(ids) == reference.decode(ids), text
    for messages in CONVERSATIONS:
        for add_generation_prompt in (True, False):
            expected = reference.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert ours.apply_chat_template(messages, add_generation_prompt) == expected


def write_files(folder, files: dict[str, str]):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def fake_reader(meta: dict) -> SimpleNamespace:
    # what tokenizer_files_from_gguf uses of a gguf.GGUFReader: fields[name].contents()
    return SimpleNamespace(fields={name: SimpleNamespace(contents=lambda v=v: v) for name, v in meta.items()})


# ----------------------------------------------------------------------------- SmolLM2 (GGUF, byte-level BPE)


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf):
    return gguf.GGUFReader(smollm2_gguf)


@pytest.fixture(scope="module")
def reference(smollm2_gguf):
    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="module")
def gguf_dir(smollm2_reader, tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("smollm2_gguf"), tokenizer_files_from_gguf(smollm2_reader))


@pytest.fixture(scope="module")
def hf_dir(reference, tmp_path_factory):
    folder = tmp_path_factory.mktemp("smollm2_hf")
    reference.save_pretrained(folder)
    return folder


def test_gguf_tokenizer_matches_transformers(gguf_dir, reference):
    assert_same_as_transformers(load_tokenizer(gguf_dir), reference)


def test_gguf_special_tokens(gguf_dir):
    tok = load_tokenizer(gguf_dir)
    assert tok.add_bos is False  # tokenizer.ggml.add_bos_token is false in SmolLM2's GGUF
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)
    assert tok.stop_ids == {2, 0}  # eos <|im_end|> and <|endoftext|>
    assert tok.encode("<|im_start|>user") == [1, tok.encode("user")[0]]  # special tokens stay whole
    assert tok.encode("hi", bos=True)[0] == 1


def test_smollm_pre_tokenizer_splits_every_digit(gguf_dir):
    # llama.cpp's "smollm" pre-tokenizer isolates each \p{N} character before GPT-2's regex, as the original
    # tokenizer.json's Digits(individual_digits=True) does, for non-ASCII digits too
    backend = tokenizers.Tokenizer.from_file(str(gguf_dir / "tokenizer.json"))
    text = "x 12345 ١٢٣ ⅷ²"
    words = [text[a:b] for _, (a, b) in backend.pre_tokenizer.pre_tokenize_str(text)]
    assert words == ["x", " ", "1", "2", "3", "4", "5", " ", "١", "٢", "٣", " ", "ⅷ", "²"]


@pytest.mark.parametrize(
    "pre, words",
    [
        ("llama-bpe", ["Hello", " ", "123", "45", " world", "!!\n\n", "I", "'M", " ok"]),
        ("qwen2", ["Hello", " ", "1", "2", "3", "4", "5", " world", "!!\n\n", "I", "'M", " ok"]),
        ("gpt2", ["Hello", " 12345", " world", "!!", "\n", "\n", "I", "'", "M", " ok"]),
    ],
)
def test_byte_level_pre_tokenizers(smollm2_reader, pre, words):
    meta = {name: field.contents() for name, field in smollm2_reader.fields.items() if name.startswith("tokenizer.")}
    files = tokenizer_files_from_gguf(fake_reader({**meta, "tokenizer.ggml.pre": pre}))
    backend = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
    text = "Hello 12345 world!!\n\nI'M ok"
    assert [text[a:b] for _, (a, b) in backend.pre_tokenizer.pre_tokenize_str(text)] == words


def test_hf_tokenizer_json_matches_transformers(hf_dir):
    assert (hf_dir / "tokenizer.json").exists()
    ours = load_tokenizer(hf_dir)
    assert_same_as_transformers(ours, AutoTokenizer.from_pretrained(hf_dir))
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (1, 2, False)


def test_tokenizer_json_post_processor_decides_bos(hf_dir, tmp_path):
    # transformers ignores add_bos_token in tokenizer_config.json once there is a tokenizer.json: its
    # post-processor alone says whether bos is added, and we do the same
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    ours, reference = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.add_bos is False
    assert ours.encode("Hello") == reference("Hello").input_ids

    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    ours, reference = load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert ours.add_bos is True
    assert ours.encode("Hello") == reference("Hello").input_ids == [1] + ours.encode("Hello", bos=False)


def test_generation_config_eos_ids_are_stop_ids(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert load_tokenizer(tmp_path).stop_ids == {0, 2, 5}
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert 7 in load_tokenizer(tmp_path).stop_ids


# ----------------------------------------------------------------------------- chat templates


@pytest.fixture(scope="module")
def backend(gguf_dir):
    return tokenizers.Tokenizer.from_file(str(gguf_dir / "tokenizer.json"))


def test_chat_template_environment(backend):
    template = (
        "{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}{% endfor %}"
        "{{ bos_token }}|{{ strftime_now('%Y') | length }}|{{ tools is none }}"
        "{% if messages | length > 1 %}{{ raise_exception('only one message') }}{% endif %}"
    )
    tok = Tokenizer(backend, {"bos_token": "<|im_start|>"}, chat_template=template)
    # tojson keeps <, > and non-ASCII as they are (jinja's own filter escapes HTML); None values are dropped
    messages = [{"role": "user", "content": "<b>é</b>", "tool_calls": None}]
    assert tok.apply_chat_template(messages) == '"<b>é</b>"<|im_start|>|4|True'
    with pytest.raises(jinja2.TemplateError, match="only one message"):
        tok.apply_chat_template(messages * 2)


def test_chat_template_sources(hf_dir, tmp_path):
    shutil.copytree(hf_dir, tmp_path, dirs_exist_ok=True)
    (tmp_path / "chat_template.jinja").unlink()
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[0])

    config["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[0]) == "D"
    (tmp_path / "chat_template.jinja").write_text("J")  # the file wins, as in transformers
    assert load_tokenizer(tmp_path).apply_chat_template(CONVERSATIONS[0]) == "J"


# ----------------------------------------------------------------------------- sentencepiece


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    rng = random.Random(0)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "weights", "hello"]
    lines = [" ".join(rng.choices(words, k=rng.randint(3, 12))) + rng.choice([".", "!", ",", " 42", " 3.14"])
             for _ in range(400)]  # fmt: skip
    lines += ["def f(x):", "    return x + 1", "café naïve résumé"]
    folder = tmp_path_factory.mktemp("sp")
    # Llama-style: BPE, byte fallback, no normalization, whitespace kept as it is
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    return folder


SP_TEXTS = [t for t in TEXTS if "<|" not in t] + ["the quick brown fox", "hello\n\nworld  !"]


def test_sentencepiece_model_matches_sentencepiece(sp_dir):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    tok = load_tokenizer(sp_dir)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, True, 400)
    assert tok.stop_ids == {2}
    for text in SP_TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text
        assert tok.encode(text) == [1] + ids
    # control pieces written in the text are tokens (sentencepiece alone would spell them out), and decode
    # keeps them, as transformers does
    ids = tok.encode("hello</s>")
    assert ids == [1] + sp.encode("hello") + [2]
    assert tok.decode(ids) == "<s>hello</s>"


def test_sentencepiece_add_bos_token_is_honoured(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos is False
    assert tok.encode("hello", bos=True) == [1] + tok.encode("hello")


def test_gguf_sentencepiece_vocabulary_matches_sentencepiece(sp_dir, tmp_path):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    ids = range(sp.vocab_size())
    types = [3 if sp.is_control(i) else 2 if sp.is_unknown(i) else 6 if sp.is_byte(i) else 1 for i in ids]
    writer = gguf.GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")  # what llama.cpp's converter stores
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in ids])
    writer.add_token_scores([sp.get_score(i) for i in ids])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_chat_template("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()

    files = tokenizer_files_from_gguf(gguf.GGUFReader(tmp_path / "tiny.gguf"))
    tok = load_tokenizer(write_files(tmp_path / "out", files))
    assert (tok.bos_id, tok.eos_id, tok.add_bos) == (1, 2, True)  # llama.cpp adds bos unless told otherwise
    for text in SP_TEXTS:
        ids = tok.encode(text, bos=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.encode("hi</s>") == [1] + sp.encode("hi") + [2]
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


# ----------------------------------------------------------------------------- errors


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"No tokenizer.json or tokenizer.model in {tmp_path}"):
        load_tokenizer(tmp_path)


def test_unsupported_gguf_tokenizers_are_clear_errors():
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert'.*supported: gpt2, llama"):
        tokenizer_files_from_gguf(fake_reader({"tokenizer.ggml.model": "bert"}))
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "made-up", "tokenizer.ggml.tokens": ["a"]}
    with pytest.raises(ValueError, match="tokenizer.ggml.pre 'made-up'.*smollm.*llama-bpe.*qwen2"):
        tokenizer_files_from_gguf(fake_reader(meta))
