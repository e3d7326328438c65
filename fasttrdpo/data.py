"""Preference data: loading (TRL, Anthropic-HH, OpenAI TL;DR formats), the synthetic task, collation.

`load_preference_dataset(source)` returns a `datasets.Dataset` with three columns `prompt`, `chosen`,
`rejected` (TRL's "explicit prompt" layout), whatever the format on disk: strings, or, for TRL's
conversational format, message lists (`[{"role": ..., "content": ...}, ...]`) that `tokenize_pair` renders
with the tokenizer's chat template exactly as TRL's DPOTrainer does.
`PreferenceCollator` turns such rows into the tensors the trainer feeds to `TRDPOLoss`: chosen rows
first, then rejected rows, labels already shifted with `ignore_index` on the prompt and the padding.
"""
from __future__ import annotations

import codecs
import gzip
import json
import logging
import os
import random
import string
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

_log = logging.getLogger("fasttrdpo")

HH_ASSISTANT = "\n\nAssistant:"
FORMATS = ("auto", "trl", "hh", "tldr")


class MalformedRowError(ValueError):
    """A row that cannot be converted; `row_index` is its 0-based position in the source."""

    def __init__(self, row_index: int, reason: str):
        super().__init__(f"row {row_index}: {reason}")
        self.row_index = row_index
        self.reason = reason


# ----------------------------------------------------------------------------------------------------
# Format conversion (one row at a time, so a bad row is reported with its index)
# ----------------------------------------------------------------------------------------------------

def _require_str(row: dict, key: str) -> str:
    if key not in row:
        raise ValueError(f"missing field {key!r}")
    value = row[key]
    if not isinstance(value, str):
        raise ValueError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def is_messages(value) -> bool:
    """TRL's test for conversational data: a list whose first element is a dict with a "role"."""
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _require_messages(value, key: str) -> list:
    if not is_messages(value):
        raise ValueError(f"field {key!r} must be a non-empty list of messages ({{'role': ..., 'content': ...}}), "
                         f"got {type(value).__name__}" + (" (empty)" if isinstance(value, list) else ""))
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ValueError(f"field {key!r}: message {i} must be a dict with a string 'role'")
    return value


def extract_conversation_prompt(chosen: list, rejected: list) -> tuple[list, list, list]:
    """Split two full conversations into (prompt, chosen, rejected) as TRL 1.16's `extract_prompt` does: the
    prompt is the messages before the first one that differs. (When neither conversation differs from the
    other within the shorter one's length, TRL takes all but the shorter one's last message: kept as is.)"""
    shorter = min(len(chosen), len(rejected))
    k = next((i for i in range(shorter) if chosen[i] != rejected[i]), shorter - 1)
    if k < 1:
        raise ValueError("'chosen' and 'rejected' differ from their first message: no shared prompt to extract "
                         "(give the prompt as its own 'prompt' message list)")
    return chosen[:k], chosen[k:], rejected[k:]


def conversational_triple(row: dict) -> tuple[list, list, list]:
    """(prompt, chosen, rejected) message lists of a conversational row: explicit prompt (a message list), or
    implicit (no prompt, or a text prompt beside full conversations, as TRL's `maybe_extract_prompt` treats
    it): the shared leading messages of chosen and rejected."""
    chosen, rejected = (_require_messages(row.get(k), k) for k in ("chosen", "rejected"))
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return _require_messages(prompt, "prompt"), chosen, rejected
    if prompt is not None and not isinstance(prompt, str):
        raise ValueError(f"field 'prompt' must be a list of messages (or absent), got {type(prompt).__name__}")
    return extract_conversation_prompt(chosen, rejected)


TEMPLATE_FIELDS = ("tools", "chat_template_kwargs")  # per-row arguments of the chat template (TRL's columns)


def _convert_conversation(row: dict) -> dict:
    prompt, chosen, rejected = conversational_triple(row)
    out = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    for key in TEMPLATE_FIELDS:
        if row.get(key) is not None:
            out[key] = row[key]
    return out


def _convert_trl(row: dict) -> dict:
    if is_messages(row.get("chosen")) or is_messages(row.get("rejected")):
        return _convert_conversation(row)
    prompt, chosen, rejected = (_require_str(row, k) for k in ("prompt", "chosen", "rejected"))
    if not chosen or not rejected:
        raise ValueError("empty 'chosen' or 'rejected' completion")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def split_hh_transcripts(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split two Anthropic-HH transcripts into (prompt, chosen, rejected).

    The prompt is the longest common prefix of the two transcripts cut back to (and including) its last
    "\\n\\nAssistant:"; the completions are the rest, so prompt + completion is the original text exactly.
    """
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"the two transcripts share no prefix ending in {HH_ASSISTANT!r}")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


def _convert_hh(row: dict) -> dict:
    prompt, chosen, rejected = split_hh_transcripts(_require_str(row, "chosen"), _require_str(row, "rejected"))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def tldr_prompt(info: dict) -> str:
    """The TL;DR prompt TRL's tldr_preference uses: subreddit, title, post, then "TL;DR:"."""
    post = info.get("post")
    if not isinstance(post, str):
        raise ValueError("field 'info.post' must be a string")
    parts = []
    if isinstance(info.get("subreddit"), str):
        parts.append(f"SUBREDDIT: r/{info['subreddit']}")
    if isinstance(info.get("title"), str):
        parts.append(f"TITLE: {info['title']}")
    parts.append(f"POST: {post}")
    return "\n\n".join(parts) + "\n\nTL;DR:"


def _convert_tldr(row: dict) -> dict:
    info = row.get("info")
    if not isinstance(info, dict):
        raise ValueError("field 'info' must be an object with a 'post'")
    summaries = row.get("summaries")
    if not isinstance(summaries, (list, tuple)) or len(summaries) != 2:
        raise ValueError("field 'summaries' must be a list of two summaries")
    texts = []
    for i, s in enumerate(summaries):
        text = s.get("text") if isinstance(s, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"summaries[{i}].text must be a non-empty string")
        # The completion follows "TL;DR:"; OpenAI's texts mostly start with a space, add one where not.
        texts.append(text if text[:1].isspace() else " " + text)
    choice = row.get("choice")
    if isinstance(choice, bool) or choice not in (0, 1):
        raise ValueError(f"field 'choice' must be 0 or 1, got {choice!r}")
    return {"prompt": tldr_prompt(info), "chosen": texts[choice], "rejected": texts[1 - choice]}


_CONVERTERS = {"trl": _convert_trl, "hh": _convert_hh, "tldr": _convert_tldr}


def detect_format(row: dict) -> str:
    """Name the format of one row: "trl", "hh" or "tldr" (ValueError if none fits)."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object, got {type(row).__name__}")
    keys = set(row)
    if {"prompt", "chosen", "rejected"} <= keys:
        return "trl"
    if {"info", "summaries", "choice"} <= keys:
        return "tldr"
    if {"chosen", "rejected"} <= keys and is_messages(row["chosen"]):
        return "trl"  # conversational, implicit prompt
    if {"chosen", "rejected"} <= keys:
        return "hh"
    raise ValueError(
        f"unknown preference format (fields {sorted(keys)}); expected prompt/chosen/rejected (TRL; text or "
        "message lists), chosen/rejected conversations (TRL, implicit prompt), "
        "chosen/rejected transcripts (Anthropic-HH) or info/summaries/choice (OpenAI TL;DR)")


def convert_rows(rows: Iterable[Any], *, format: str = "auto", skip_malformed: bool = False
                 ) -> tuple[list[dict], list[int]]:
    """Convert raw rows to prompt/chosen/rejected dicts. Returns (converted, skipped row indices).

    The format is detected from the first row unless given. A row that does not convert raises
    `MalformedRowError` (with its index), or is skipped and counted when `skip_malformed=True`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    out: list[dict] = []
    skipped: list[int] = []
    fmt = None if format == "auto" else format
    conversational = None  # the first converted row decides; a column cannot mix text and message lists
    text_prompts_dropped = 0
    for i, row in enumerate(rows):
        try:
            if isinstance(row, Exception):  # a line that failed to parse (see _read_json_rows)
                raise ValueError(str(row))
            if fmt is None:
                fmt = detect_format(row)
            if not isinstance(row, dict):
                raise ValueError(f"expected an object, got {type(row).__name__}")
            converted = _CONVERTERS[fmt](row)
            is_conv = isinstance(converted["chosen"], list)
            if conversational is None:
                conversational = is_conv
            elif is_conv != conversational:
                raise ValueError("a conversational row (message lists) among plain-text rows" if is_conv else
                                 "a plain-text row among conversational rows (message lists)")
            text_prompts_dropped += is_conv and isinstance(row.get("prompt"), str)
            out.append(converted)
        except ValueError as err:
            if not skip_malformed:
                raise MalformedRowError(i, f"{err} (format {fmt or 'undetected'})") from None
            skipped.append(i)
    if text_prompts_dropped:
        _log.warning("%d row(s) have a text 'prompt' beside full chosen/rejected conversations: the text is not "
                     "used, the prompt is the conversations' shared leading messages (TRL's maybe_extract_prompt)",
                     text_prompts_dropped)
    return out, skipped


# ----------------------------------------------------------------------------------------------------
# Reading sources
# ----------------------------------------------------------------------------------------------------

def _read_bytes(path: str) -> bytes:
    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            return f.read()
    with open(path, "rb") as f:
        return f.read()


def _unicode_problem(value) -> str | None:
    """Why a parsed JSON value holds text that is not valid Unicode (a lone surrogate, from a
    `\\udXXX` escape or from an invalid UTF-8 byte kept by surrogateescape), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as err:
            return (f"text is not valid Unicode: {value[err.start]!r} at position {err.start} of a string "
                    "(an invalid UTF-8 byte in the file, or a lone UTF-16 surrogate escape)")
    elif isinstance(value, dict):
        for k, v in value.items():
            problem = _unicode_problem(k) or _unicode_problem(v)
            if problem:
                return problem
    elif isinstance(value, list):
        for v in value:
            problem = _unicode_problem(v)
            if problem:
                return problem
    return None


def _parse_jsonl_line(line: str):
    """One jsonl row, or a ValueError saying why it is malformed."""
    try:  # the raw bytes of the line (surrogateescape restores any invalid byte)
        line.encode("utf-8", "surrogateescape").decode("utf-8")
    except UnicodeDecodeError as err:
        bad = line.encode("utf-8", "surrogateescape")[err.start]
        return ValueError(f"invalid UTF-8 (byte 0x{bad:02x} at byte {err.start} of the line)")
    try:
        return json.loads(line)
    except json.JSONDecodeError as err:
        return ValueError(f"invalid JSON ({err.msg} at column {err.colno})")


def _read_json_rows(path: str) -> list[Any]:
    """Rows of a .json (a list, or {"data"/"train": [...]}) or .jsonl file, optionally gzipped.

    A row that is not valid JSON, or whose text is not valid Unicode (invalid UTF-8 bytes, a lone
    surrogate escape), becomes a ValueError placed at its row index, so that the converter reports
    (or skips) it like any other malformed row. A leading UTF-8 byte-order mark is dropped.
    """
    data = _read_bytes(path)
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8):]
    # surrogateescape: an invalid byte fails its own row (found below), not the whole file.
    text = data.decode("utf-8", errors="surrogateescape")
    stripped = text.lstrip()
    base = path[:-3] if path.endswith(".gz") else path
    rows: list[Any] | None = None
    if base.endswith(".json") and stripped.startswith(("[", "{")):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None  # maybe jsonl saved as .json: fall through
        if isinstance(parsed, list):
            rows = parsed
        elif isinstance(parsed, dict):
            rows = next((parsed[k] for k in ("data", "train", "rows") if isinstance(parsed.get(k), list)), [parsed])
    if rows is None:
        # Lines end at "\n" only: str.splitlines would also cut at U+2028, U+0085, ... which JSON
        # strings may hold raw.
        rows = [_parse_jsonl_line(line) for line in text.split("\n") if line.strip()]
    out = []
    for row in rows:
        problem = None if isinstance(row, Exception) else _unicode_problem(row)
        out.append(ValueError(problem) if problem else row)
    return out


def _read_parquet_rows(path: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def load_preference_dataset(source: str, split: str = "train", *, format: str = "auto",
                            skip_malformed: bool = False, return_skipped: bool = False, **hub_kwargs):
    """Load preference pairs as a `datasets.Dataset` with columns prompt, chosen, rejected: strings, or message
    lists for TRL's conversational format (explicit prompt, or implicit: full chosen/rejected conversations whose
    shared leading messages become the prompt), plus TRL's per-row `tools` / `chat_template_kwargs` when rows
    carry them. All rows are text, or all are conversational.

    source: a local file (.jsonl, .json, .parquet, each optionally .gz except parquet), or a Hugging Face
        dataset id (needs a reachable hub; `split` and `hub_kwargs` go to `datasets.load_dataset`).
        For local files `split` is ignored (a file is one split).
    format: "auto" (detected from the first row), "trl", "hh" (Anthropic-HH transcripts) or "tldr"
        (OpenAI summarize-from-feedback comparisons).
    skip_malformed: False raises `MalformedRowError` naming the first bad row; True skips bad rows,
        logs how many (and which), and, with `return_skipped=True`, returns (dataset, skipped_indices).
    """
    import datasets

    if not isinstance(source, str) or not source:
        raise TypeError(f"source must be a non-empty path or dataset id, got {source!r}")
    if os.path.exists(source):
        if os.path.isdir(source):
            raise ValueError(f"source {source!r} is a directory; pass a .jsonl/.json/.parquet file")
        base = source[:-3] if source.endswith(".gz") else source
        if base.endswith((".jsonl", ".json")):
            rows = _read_json_rows(source)
        elif source.endswith(".parquet"):
            rows = _read_parquet_rows(source)
        else:
            raise ValueError(f"source {source!r}: unsupported file type (expected .jsonl, .json, "
                             ".parquet, optionally .gz for the JSON ones)")
    else:
        if source.endswith((".jsonl", ".json", ".parquet", ".gz")):
            raise FileNotFoundError(f"source {source!r}: no such file")
        rows = datasets.load_dataset(source, split=split, **hub_kwargs)
    converted, skipped = convert_rows(rows, format=format, skip_malformed=skip_malformed)
    if skipped:
        _log.warning("load_preference_dataset(%s): skipped %d malformed row(s) of %d (first: %s)",
                     source, len(skipped), len(converted) + len(skipped), skipped[:10])
    if not converted:
        raise ValueError(f"source {source!r}: no usable preference rows")
    columns = ("prompt", "chosen", "rejected") + tuple(k for k in TEMPLATE_FIELDS if any(k in r for r in converted))
    ds = datasets.Dataset.from_dict({k: [r.get(k) for r in converted] for k in columns})
    return (ds, skipped) if return_skipped else ds


# ----------------------------------------------------------------------------------------------------
# The synthetic task (embedded default)
# ----------------------------------------------------------------------------------------------------

def synthetic_example(rng: random.Random, min_len: int = 5, max_len: int = 8) -> dict:
    """One pair of the synthetic task: reverse a word of distinct random letters.

    prompt "<letters>=" ; chosen = the letters reversed ; rejected = the reversal with one or two letters
    replaced by their left neighbour (the right one at position 0), i.e. a "stutter" that repeats a
    letter. The ground truth is a deterministic function of the prompt; since the prompt's letters are
    distinct, a correct answer never repeats a letter and every rejected answer does, a rule a tiny
    model picks up in a few dozen steps and that holds on prompts it has never seen.
    """
    if not 2 <= min_len <= max_len <= 26:
        raise ValueError(f"need 2 <= min_len <= max_len <= 26, got {min_len}, {max_len}")
    n = rng.randint(min_len, max_len)
    word = "".join(rng.sample(string.ascii_lowercase, n))
    answer = word[::-1]
    wrong = list(answer)
    for pos in rng.sample(range(n), rng.randint(1, 2)):
        wrong[pos] = wrong[pos - 1] if pos > 0 else wrong[1]
    return {"prompt": word + "=", "chosen": answer, "rejected": "".join(wrong)}


def synthetic_preference_dataset(n: int = 2048, seed: int = 0, **kwargs):
    """`n` pairs of the synthetic task as a `datasets.Dataset` (prompt, chosen, rejected)."""
    import datasets

    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(seed)
    rows = [synthetic_example(rng, **kwargs) for _ in range(n)]
    return datasets.Dataset.from_dict({k: [r[k] for r in rows] for k in ("prompt", "chosen", "rejected")})


# ----------------------------------------------------------------------------------------------------
# Tokenization and collation
# ----------------------------------------------------------------------------------------------------

TRUNCATION_MODES = ("keep_prompt_end", "keep_start")


@dataclass
class TokenizedPair:
    prompt: list[int]    # prompt + chosen / prompt + rejected are the sequences the model sees
    chosen: list[int]    # completion tokens (+ EOS unless truncated)
    rejected: list[int]


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _leading_special_count(tokenizer, prompt: str, prompt_ids: list[int]) -> int:
    """How many of `prompt_ids` are special tokens the tokenizer put in front of the text (a BOS): the ids
    before the prompt's own tokens (tokenized without special tokens) start."""
    plain = tokenizer(text=prompt, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    k = 0
    while k < len(prompt_ids) and prompt_ids[k] in special and not (plain and prompt_ids[k:k + len(plain)] == plain):
        k += 1
    return k


def _tokenize_untruncated(tokenizer, prompt: str, chosen: str, rejected: str, add_eos: bool
                          ) -> tuple[list[int], list[int], list[int]]:
    """TRL 1.16's DPOTrainer tokenization of a non-conversational row: EOS appended to each completion as
    text (unless it already ends with it), prompt, prompt + chosen and prompt + rejected tokenized with the
    tokenizer's special tokens (BOS), and the prompt cut where those three stop sharing a prefix (a BPE merge
    across the prompt/completion boundary, or a suffix the tokenizer adds to the prompt alone, belongs to
    the completions). So prompt + chosen is exactly the tokenization of the whole text."""
    if add_eos:
        eos = tokenizer.eos_token
        if eos is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token (needed to end the completions; add_eos=False skips it)")
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    encode = lambda text: list(tokenizer(text=text)["input_ids"])  # noqa: E731
    p, pc, pr = encode(prompt), encode(prompt + chosen), encode(prompt + rejected)
    n = min(_common_prefix_length(p, pc), _common_prefix_length(p, pr))
    return p[:n], pc[n:], pr[n:]


def _render_ids(tokenizer, messages: list, template_kwargs: dict, **kwargs) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs,
                                              **template_kwargs)["input_ids"])


def _tokenize_conversation(tokenizer, prompt: list, chosen: list, rejected: list, template_kwargs: dict
                           ) -> tuple[list[int], list[int], list[int]]:
    """TRL 1.16's DPOTrainer tokenization of a conversational row: the prompt rendered by the chat template with
    the generation prompt, prompt + chosen and prompt + rejected rendered as whole conversations (the template's
    end-of-turn tokens end the completions: no EOS is added), all tokenized by `apply_chat_template` (special
    tokens come from the template text alone), and the prompt cut where the three stop sharing a prefix (a
    template that renders the generation prompt differently from a finished turn leaves that part to the
    completions)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"conversational rows (message lists) need a tokenizer with a chat template, and this "
            f"{type(tokenizer).__name__} has none (tokenizer.chat_template is None): set tokenizer.chat_template to a "
            "Jinja template, use the model's chat tokenizer, or give prompt/chosen/rejected as plain text")
    p = _render_ids(tokenizer, prompt, template_kwargs, add_generation_prompt=True)
    pc = _render_ids(tokenizer, prompt + chosen, template_kwargs)
    pr = _render_ids(tokenizer, prompt + rejected, template_kwargs)
    n = min(_common_prefix_length(p, pc), _common_prefix_length(p, pr))
    return p[:n], pc[n:], pr[n:]


def _template_kwargs(tools, chat_template_kwargs) -> dict:
    """apply_chat_template's extra arguments as TRL builds them (a JSON string `tools` is parsed)."""
    if isinstance(tools, str):
        tools = json.loads(tools)
    if chat_template_kwargs is not None and not isinstance(chat_template_kwargs, dict):
        raise TypeError(f"chat_template_kwargs must be a dict, got {type(chat_template_kwargs).__name__}")
    return {"tools": tools, **(chat_template_kwargs or {})}


def _tokenize_any(tokenizer, prompt, chosen, rejected, *, add_eos: bool | None, tools=None,
                  chat_template_kwargs=None) -> tuple[list[int], list[int], list[int], int]:
    """(prompt ids, chosen ids, rejected ids, leading special ids of the prompt) of a text or conversational
    row, untruncated."""
    if is_messages(chosen) or is_messages(rejected) or isinstance(prompt, list):
        if add_eos:
            raise ValueError("add_eos applies to plain-text rows: a chat template ends each turn itself "
                             "(TRL adds no EOS to conversational rows)")
        prompt, chosen, rejected = conversational_triple({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        p, c, r = _tokenize_conversation(tokenizer, prompt, chosen, rejected,
                                         _template_kwargs(tools, chat_template_kwargs))
        # the template writes the BOS as text; keep it first when the prompt is cut
        bos = getattr(tokenizer, "bos_token_id", None)
        return p, c, r, int(bos is not None and p[:1] == [bos])
    if tools is not None or chat_template_kwargs is not None:
        raise ValueError("tools / chat_template_kwargs apply to conversational rows (message lists) only")
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        if not isinstance(value, str):
            raise TypeError(f"{key} must be a string or a list of messages, got {type(value).__name__}")
    p, c, r = _tokenize_untruncated(tokenizer, prompt, chosen, rejected, True if add_eos is None else add_eos)
    return p, c, r, _leading_special_count(tokenizer, prompt, p)


def _truncate(p: list[int], c: list[int], r: list[int], lead: int, *, max_length: int,
              max_prompt_length: int | None, truncation_mode: str) -> TokenizedPair | None:
    """Cut a pair to max_length tokens per sequence (`lead`: the prompt's leading special ids, kept); None when
    truncation_mode="keep_start" leaves no completion token (TRL drops such rows)."""
    longer = max(len(c), len(r))
    if len(p) + longer <= max_length:
        return TokenizedPair(p, c, r)
    if truncation_mode == "keep_start":  # TRL's collator: each sequence keeps its first max_length tokens
        if len(p) >= max_length:
            return None
        room = max_length - len(p)
        return TokenizedPair(p, c[:room], r[:room])
    cap = max_length // 2 if max_prompt_length is None else max_prompt_length
    keep = min(len(p), max(max_length - longer, cap))
    lead = min(lead, keep)  # the BOS stays first
    p = p[:lead] + p[len(p) - (keep - lead):]
    room = max_length - len(p)
    return TokenizedPair(p, c[:room], r[:room])


def _check_lengths(max_length: int, max_prompt_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    if max_prompt_length is not None:
        if truncation_mode != "keep_prompt_end":
            raise ValueError("max_prompt_length applies to truncation_mode='keep_prompt_end' only, got "
                             f"max_prompt_length={max_prompt_length} with truncation_mode={truncation_mode!r}")
        if not 1 <= max_prompt_length < max_length:
            raise ValueError(f"max_prompt_length must be in [1, max_length), got {max_prompt_length}")


def tokenize_pair(tokenizer, prompt: str | list, chosen: str | list, rejected: str | list, *, max_length: int,
                  max_prompt_length: int | None = None, add_eos: bool | None = None,
                  truncation_mode: str = "keep_prompt_end", tools: list | str | None = None,
                  chat_template_kwargs: dict | None = None) -> TokenizedPair:
    """Tokenize one pair exactly as TRL 1.16's DPOTrainer does, then fit it into max_length tokens.

    Plain text (TRL's): EOS is appended to each completion as text (add_eos, default True); prompt,
    prompt + chosen and prompt + rejected are tokenized WITH the tokenizer's special tokens (Llama/Mistral/Gemma
    get their BOS); the prompt ends where the three token lists stop sharing a prefix.
    Conversational (message lists `[{"role": ..., "content": ...}]`, TRL's too): the tokenizer's chat template
    renders the prompt with the generation prompt, and prompt + chosen / prompt + rejected as whole
    conversations; the prompt again ends where the three stop sharing a prefix. No EOS is added (the template
    ends the turn; add_eos=True is an error). `prompt` may be None (implicit prompt): chosen and rejected are
    then full conversations and their shared leading messages are the prompt. `tools` and
    `chat_template_kwargs` go to the template as TRL passes them. A tokenizer without a chat template is a
    ValueError. A pair whose prompt + longer completion fits max_length gets exactly TRL's token ids.

    Truncation of a pair that does not fit, per `truncation_mode`:
      "keep_prompt_end" (default): the prompt keeps its END (and its leading special tokens, i.e. the BOS),
          down to max(max_length - longer completion, max_prompt_length) tokens (max_prompt_length
          defaults to max_length // 2); then each completion keeps its START to fit max_length (losing its
          EOS if cut). A completion is never dropped entirely.
      "keep_start": TRL's default: each sequence keeps its first max_length tokens. A prompt that alone
          fills max_length leaves no completion token: ValueError here (tokenize_dataset drops such rows,
          as TRL does). max_prompt_length does not apply.
    """
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    p, c, r, lead = _tokenize_any(tokenizer, prompt, chosen, rejected, add_eos=add_eos, tools=tools,
                                  chat_template_kwargs=chat_template_kwargs)
    pair = _truncate(p, c, r, lead, max_length=max_length, max_prompt_length=max_prompt_length,
                     truncation_mode=truncation_mode)
    if pair is None:
        raise ValueError(f"the prompt alone has {len(p)} tokens >= max_length={max_length}: with "
                         "truncation_mode='keep_start' no completion token remains (TRL drops such rows)")
    return pair


def tokenize_dataset(dataset, tokenizer, *, max_length: int, max_prompt_length: int | None = None,
                     truncation_mode: str = "keep_prompt_end") -> list[TokenizedPair]:
    """Tokenize every row of a preference dataset (kept as Python lists: cheap to index) with `tokenize_pair`:
    prompt/chosen/rejected text, or message lists (conversational; the prompt column may be absent when
    chosen/rejected are full conversations, and `tools` / `chat_template_kwargs` columns are passed to the chat
    template per row, as TRL does). With truncation_mode="keep_start", rows whose prompt alone fills max_length
    are dropped, as TRL drops them, and counted in a WARNING on the `fasttrdpo` logger."""
    columns = set(dataset.column_names)
    missing = [c for c in ("chosen", "rejected") if c not in columns]
    if "prompt" not in columns and not missing and not (len(dataset) and is_messages(dataset[0]["chosen"])):
        missing.insert(0, "prompt")  # only conversational rows may leave the prompt implicit
    if missing:
        raise ValueError(f"dataset must have columns prompt, chosen, rejected (text or message lists; prompt may be "
                         f"absent for full chosen/rejected conversations); missing {missing}")
    _check_lengths(max_length, max_prompt_length, truncation_mode)
    pairs, dropped, truncated = [], [], 0
    for i, row in enumerate(dataset):
        try:
            p, c, r, lead = _tokenize_any(tokenizer, row.get("prompt"), row["chosen"], row["rejected"], add_eos=None,
                                          tools=row.get("tools"), chat_template_kwargs=row.get("chat_template_kwargs"))
        except ValueError as err:
            raise MalformedRowError(i, str(err)) from err
        pair = _truncate(p, c, r, lead, max_length=max_length, max_prompt_length=max_prompt_length,
                         truncation_mode=truncation_mode)
        if pair is None:
            dropped.append(i)
        else:
            pairs.append(pair)
            truncated += (len(pair.prompt), len(pair.chosen), len(pair.rejected)) != (len(p), len(c), len(r))
    if dropped:
        _log.warning("tokenize_dataset: dropped %d of %d rows whose prompt alone fills max_length=%d "
                     "(truncation_mode='keep_start'; first: %s)", len(dropped), len(dataset), max_length,
                     dropped[:10])
    if truncated:
        _log.info("tokenize_dataset: truncated %d of %d pairs to max_length=%d (truncation_mode=%r)", truncated,
                  len(dataset), max_length, truncation_mode)
    if not pairs:
        raise ValueError(f"no row leaves a completion token within max_length={max_length}")
    return pairs


class PreferenceCollator:
    """Batches TokenizedPairs as chosen rows [0, B) then rejected rows [B, 2B), right-padded.

    Returns input_ids / attention_mask [2B, T] and labels [2B, T] already shifted: labels[:, t] is the
    token that position t predicts when it is a completion token, ignore_index elsewhere (prompt,
    padding, last position).
    """

    def __init__(self, pad_token_id: int, ignore_index: int = -100, pad_to_multiple_of: int | None = None):
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: set tokenizer.pad_token (e.g. to the EOS token)")
        self.pad_token_id = int(pad_token_id)
        self.ignore_index = ignore_index
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, pairs: Sequence[TokenizedPair]) -> dict[str, torch.Tensor]:
        if not pairs:
            raise ValueError("cannot collate an empty batch")
        seqs = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
        T = max(len(a) + len(b) for a, b in seqs)
        if self.pad_to_multiple_of:
            T = -(-T // self.pad_to_multiple_of) * self.pad_to_multiple_of
        n = len(seqs)
        input_ids = torch.full((n, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((n, T), dtype=torch.long)
        labels = torch.full((n, T), self.ignore_index, dtype=torch.long)
        for i, (prompt, completion) in enumerate(seqs):
            ids = prompt + completion
            L = len(ids)
            input_ids[i, :L] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, :L] = 1
            # position t predicts token t+1; supervise only predictions of completion tokens
            start = max(len(prompt) - 1, 0)
            first = len(prompt) if prompt else 1  # with no prompt the first token has no predictor
            labels[i, start:L - 1] = torch.tensor(ids[first:], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
