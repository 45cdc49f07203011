"""One small tokenizer interface over tokenizer.json (tokenizers), tokenizer.model (sentencepiece) and
the vocabulary stored in a GGUF file, plus chat templates.

    tok = load_tokenizer("checkpoints/SmolLM2-135M-Instruct")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    ids = tok.encode(prompt, bos=False)  # chat templates write their own bos token, if any
    text = tok.decode(ids)

A GGUF file has no tokenizer.json: `tokenizer_files_from_gguf` rebuilds tokenizer.json and
tokenizer_config.json from its metadata, so a converter can write them beside the weights.
"""

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import sentencepiece
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

# Tokens that end generation whenever the vocabulary has them, on top of eos and generation_config.json's
# eos_token_id: the end-of-text and end-of-turn markers of common chat formats (ChatML, Llama 3, Gemma).
# Ambiguous ones such as "<|end|>" (Phi-3 ends a turn with it, gpt-oss ends a message and goes on) are
# left to generation_config.json.
STOP_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>")
# The named special tokens transformers hands to chat templates as variables.
TEMPLATE_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class Tokenizer:
    def __init__(
        self,
        backend: "tokenizers.Tokenizer | sentencepiece.SentencePieceProcessor",
        config: dict | None = None,  # tokenizer_config.json merged over special_tokens_map.json
        generation_config: dict | None = None,
        chat_template: str | None = None,
    ):
        config, generation_config = config or {}, generation_config or {}
        self.backend = backend
        self.chat_template = chat_template
        self.is_sentencepiece = isinstance(backend, sentencepiece.SentencePieceProcessor)
        if self.is_sentencepiece:
            self.vocab_size = backend.vocab_size()
            # sentencepiece never matches control pieces (<s>, </s>) in text; we split them out ourselves
            self.special = {backend.id_to_piece(i): i for i in range(self.vocab_size) if backend.is_control(i)}
            default_bos, default_eos = (i if i >= 0 else None for i in (backend.bos_id(), backend.eos_id()))
            longest_first = sorted(self.special, key=len, reverse=True)
            self._special_re = re.compile("|".join(map(re.escape, longest_first))) if self.special else None
        else:
            self.vocab_size = backend.get_vocab_size(with_added_tokens=True)  # ids run from 0 to vocab_size - 1
            added = backend.get_added_tokens_decoder()
            self.special = {token.content: i for i, token in added.items() if token.special}
            default_bos = default_eos = None
        self._special_by_id = {i: token for token, i in self.special.items()}

        # tokenizer_config.json writes a special token as "<s>" or as {"content": "<s>", "lstrip": false, ...}
        text = {k: v["content"] if isinstance(v, dict) else v for k, v in config.items() if k in TEMPLATE_TOKENS}
        self.template_tokens = names = {k: v for k, v in text.items() if v is not None}
        self.bos_id = self.token_id(names["bos_token"]) if "bos_token" in names else default_bos
        self.eos_id = self.token_id(names["eos_token"]) if "eos_token" in names else default_eos
        generation_eos = generation_config.get("eos_token_id")
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        if self.eos_id is None and generation_eos:
            self.eos_id = generation_eos[0]
        for name, i in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if i is not None and name not in self.template_tokens:
                self.template_tokens[name] = backend.id_to_piece(i) if self.is_sentencepiece else backend.id_to_token(i)

        stop_tokens = [self.token_id(token) for token in STOP_TOKENS]
        self.stop_ids = {i for i in [self.eos_id, *generation_eos, *stop_tokens] if i is not None}

        # Whether encode() adds bos unless told, as transformers (5.x) decides: for a tokenizer.json its
        # post-processor alone (add_bos_token in tokenizer_config.json is ignored then); for sentencepiece,
        # add_bos_token, defaulting to True as for Llama, Mistral and Gemma.
        if not self.is_sentencepiece:
            processed, plain = backend.encode("a").ids, backend.encode("a", add_special_tokens=False).ids
            add_bos = len(processed) > len(plain) and processed[0] == self.bos_id
        else:
            add_bos = bool(config.get("add_bos_token", True))
        self.add_bos = add_bos and self.bos_id is not None
        # add_eos_token is ignored on purpose: a prompt that ends in eos asks the model to stop.

    def token_id(self, token: str) -> int | None:
        # the id of a token spelled exactly so in the vocabulary (e.g. "<|im_end|>"), else None
        if self.is_sentencepiece:
            i = self.backend.piece_to_id(token)
            return i if self.backend.id_to_piece(i) == token else None
        return self.backend.token_to_id(token)

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        if self.is_sentencepiece:
            ids, start = [], 0
            for match in self._special_re.finditer(text) if self._special_re else ():
                ids += self.backend.encode(text[start : match.start()]) + [self.special[match.group()]]
                start = match.end()
            ids += self.backend.encode(text[start:])
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos if bos is None else bos:
            if self.bos_id is None:
                raise ValueError("This tokenizer has no bos token; encode with bos=False")
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]  # also accepts a tensor
        if not self.is_sentencepiece:
            return self.backend.decode(ids, skip_special_tokens=False)
        # sentencepiece drops control pieces when decoding; transformers keeps them, and so do we
        pieces, run = [], []
        for i in ids:
            if i in self._special_by_id:
                pieces += [self.backend.decode(run), self._special_by_id[i]]
                run = []
            else:
                run.append(i)
        return "".join(pieces + [self.backend.decode(run)])

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        # kwargs become template variables too (tools=[...], enable_thinking=False, ...)
        if self.chat_template is None:
            raise ValueError(
                "This tokenizer has no chat template (none in tokenizer_config.json, chat_template.jinja or the "
                "GGUF metadata): write the prompt yourself, or add a chat_template.jinja beside the tokenizer"
            )
        # Like transformers: keys set to None are dropped, since templates test for presence, not for None.
        messages = [{k: v for k, v in message.items() if v is not None} for message in messages]
        variables = {"tools": None, "documents": None, **self.template_tokens, **kwargs}
        template = _compile_template(self.chat_template)
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)


class _GenerationTag(jinja2.ext.Extension):
    # `{% generation %}...{% endgeneration %}` marks assistant text for training masks; we only render it.
    tags = frozenset({"generation"})

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters (<, >, &), which chat templates do not expect
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache
def _compile_template(source: str) -> jinja2.Template:
    # The same environment transformers renders templates in: templates come from the Hub, so sandboxed.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _read_chat_template(folder: Path, config: dict) -> str | None:
    if (folder / "chat_template.jinja").exists():  # where transformers >= 4.50 saves it; it wins
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template") or _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named: [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def load_tokenizer(checkpoint_dir: str | Path) -> Tokenizer:
    folder = Path(checkpoint_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"Tokenizer folder {folder} does not exist")
    if (folder / "tokenizer.json").exists():
        backend = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "tokenizer.model").exists():
        backend = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    else:
        raise FileNotFoundError(
            f"No tokenizer.json or tokenizer.model in {folder}: copy the checkpoint's tokenizer files there "
            "(for a GGUF, write them with tokenizer.tokenizer_files_from_gguf)"
        )
    config = {**_read_json(folder / "special_tokens_map.json"), **_read_json(folder / "tokenizer_config.json")}
    generation_config = _read_json(folder / "generation_config.json")
    return Tokenizer(backend, config, generation_config, _read_chat_template(folder, config))


# ----------------------------------------------------------------------------- GGUF vocabularies

# Split regexes of byte-level BPE vocabularies, as in their original tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (  # the same but one digit at a time
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_BYTE_LEVEL_PRE = ("default", "gpt-2", "gpt2", "smollm", "starcoder", "llama-bpe", "llama3", "qwen2")


def _byte_level_pre(pre: str) -> tuple:
    # tokenizer.ggml.pre -> (normalizer, pre-tokenizer, ignore_merges), as the original tokenizer.json has them
    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # with GPT-2's own split regex
    if pre in ("default", "gpt-2", "gpt2"):
        return None, gpt2, False
    if pre in ("smollm", "starcoder"):  # each digit alone, then GPT-2's regex (llama.cpp: "\p{N}", then gpt2)
        return None, pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2]), False
    if pre in ("llama-bpe", "llama3", "qwen2"):
        split = pre_tokenizers.Split(Regex(_QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT), behavior="isolated")
        to_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        pre_tokenizer = pre_tokenizers.Sequence([split, to_bytes])
        # Qwen2 NFC-normalizes; Llama 3 looks a whole word up in the vocabulary before merging (llama.cpp too)
        return (normalizers.NFC(), pre_tokenizer, False) if pre == "qwen2" else (None, pre_tokenizer, True)
    raise ValueError(f"Unsupported GGUF tokenizer.ggml.pre {pre!r}; supported: {', '.join(_BYTE_LEVEL_PRE)}")


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte alphabet: printable bytes stand for themselves, the others are shifted past 255
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(shifted)}


def _byte_level_bpe(meta: dict) -> tokenizers.Tokenizer:
    normalizer, pre_tokenizer, ignore_merges = _byte_level_pre(meta.get("tokenizer.ggml.pre", "default"))
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(meta["tokenizer.ggml.tokens"])
    vocab = {}
    for i, (token, kind) in enumerate(zip(meta["tokenizer.ggml.tokens"], types)):
        # an ordinary token written as raw text gets the byte alphabet spelling BPE produces; control and
        # user-defined tokens keep theirs, since they are matched whole in the text, never built by merges
        if kind not in (3, 4) and not set(token) <= alphabet:
            token = "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(token, i)
    merges = [tuple(merge.split(" ", 1)) for merge in meta["tokenizer.ggml.merges"]]
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(meta: dict) -> tokenizers.Tokenizer:
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {token: i for i, token in reversed(list(enumerate(tokens)))}  # first id wins on duplicates
    # The file keeps scores, not merges. sentencepiece BPE merges the adjacent pair whose concatenation is
    # the best-scoring piece, so every split of a normal piece into two pieces is a merge ranked by its score.
    normal = {token for token, kind in zip(tokens, types) if kind == 1}
    ranked = sorted((-score, i) for i, (token, score, kind) in enumerate(zip(tokens, scores, types)) if kind == 1)
    merges = []
    for _, i in ranked:
        t = tokens[i]
        merges += [(t[:k], t[k:]) for k in range(1, len(t)) if t[:k] in normal and t[k:] in normal]
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else None
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
    # Spaces are spelled "▁". Like sentencepiece's dummy prefix, llama.cpp puts a space before the text and
    # after every special token, even where one is already there; a normalizer runs on exactly those pieces
    # (Metaspace would skip text that starts with a space). Decoding drops the space at the very start.
    prefix = meta.get("tokenizer.ggml.add_space_prefix", True)
    spaces = normalizers.Replace(" ", "▁")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), spaces]) if prefix else spaces
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


_GGUF_TOKENIZERS = {"gpt2": _byte_level_bpe, "llama": _sentencepiece_bpe}  # tokenizer.ggml.model -> builder


def tokenizer_files_from_gguf(reader: "gguf.GGUFReader") -> dict[str, str]:  # noqa: F821 (gguf only typed)
    meta = {name: field.contents() for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    model = meta.get("tokenizer.ggml.model")
    if model not in _GGUF_TOKENIZERS:
        raise ValueError(f"Unsupported GGUF tokenizer.ggml.model {model!r}; supported: {', '.join(_GGUF_TOKENIZERS)}")
    tok = _GGUF_TOKENIZERS[model](meta)
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    # token types 2 (unknown) and 3 (control) are special tokens, matched whole in the text ("<|im_start|>");
    # 4 (user-defined) is matched whole too, but is ordinary text ("<think>")
    tok.add_special_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k in (2, 3)])
    tok.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == 4])

    # llama.cpp adds bos to sentencepiece vocabularies whose file does not say otherwise
    config = {"add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))}
    if "tokenizer.ggml.add_eos_token" in meta:
        config["add_eos_token"] = bool(meta["tokenizer.ggml.add_eos_token"])
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if i is not None and 0 <= i < len(tokens):
            config[f"{name}_token"] = tokens[i]
    if config["add_bos_token"] and "bos_token" in config:  # a tokenizer.json's post-processor adds bos
        bos, bos_id = config["bos_token"], meta["tokenizer.ggml.bos_token_id"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    # "tokenizer.chat_template" is the default template; "tokenizer.chat_template.<name>" are named extras
    templates = [
        {"name": name.removeprefix("tokenizer.chat_template").lstrip(".") or "default", "template": template}
        for name, template in meta.items()
        if name == "tokenizer.chat_template" or name.startswith("tokenizer.chat_template.")
    ]
    if templates:
        only_default = len(templates) == 1 and templates[0]["name"] == "default"
        config["chat_template"] = templates[0]["template"] if only_default else templates
    config_text = json.dumps(config, indent=2, ensure_ascii=False)
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": config_text}
