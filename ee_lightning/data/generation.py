"""Prompt -> reference data for decoder LMs: ACLSum and local jsonl/json files.

An item is a user prompt and a reference response. The prompt is wrapped in the tokenizer's chat
template (with the generation prompt, so the model answers next); the reference is followed by
the tokenizer's EOS token, the token that ends an assistant turn in chat models.

Two kinds of batches:

* training (`kind="train"`): prompt + reference ids, right-padded; `labels` are the ids with -100
  on the prompt and on padding, so a causal LM loss covers exactly the response;
* generation (`kind="generate"`): the prompt ids alone, left-padded (new tokens then line up at the
  right for every row), plus the reference texts.

Sources:

* ACLSum (`ACLSumDataModule`): aspect-based summaries of ACL papers, read as files out of the
  installed `aclsum==0.1.2` package (never imported: it needs Python 3.11+ and other packages).
  Each paper gives three pairs: "Summarize the {aspect} of this paper in one sentence: {abstract}"
  -> its one-sentence summary of the challenge, approach or outcome. The abstracts are stored
  tokenised ("( QA ) ."); `detokenize` restores plain text.
* Local files (`PromptResponseDataModule`): .jsonl (one object per line) or .json (a list of
  objects) with configurable prompt / response fields and an optional input field appended to
  the prompt (Alpaca's instruction / input / output works).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ee_lightning.data.base import DataError, fraction_size, split_rows
from ee_lightning.data.resumable import EpochShuffle, ResumableLoader
from ee_lightning.data.sources import DATA_PACKAGES, package_folder, read_jsonl

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
IGNORE_INDEX = -100  # label of a position the LM loss skips (torch's cross_entropy default)
ACLSUM_REQUIREMENT = DATA_PACKAGES["aclsum"]
ACLSUM_SPLIT_FILES = {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}
ACLSUM_ASPECTS = ("challenge", "approach", "outcome")
ACLSUM_TEMPLATE = "Summarize the {aspect} of this paper in one sentence: {abstract}"

# ----------------------------------------------------------------------------- detokenising

# Tokens glued to the previous token / to the next token in plain text.
_ATTACH_LEFT = {",", ".", ";", ":", "?", "!", "%", ")", "]", "}", "n't", "'s", "'re", "'ve", "'m", "'ll", "'d"}
_ATTACH_RIGHT = {"(", "[", "{", "$"}
_QUOTES = {'"', "``", "''"}


def detokenize(text: str) -> str:
    """Undo PTB-style tokenisation: "( QA ) , it ca n't ." -> "(QA), it can't."

    Punctuation and clitics join the previous token, opening brackets the next one; straight
    double quotes (and `` '') alternate opening / closing. Other tokens keep one space.
    """
    out: list[str] = []
    glue_next = False  # the previous token opens something: no space before this one
    quote_open = False
    for token in text.split():
        if token in _QUOTES:
            token = '"'
            if quote_open:  # closing quote joins the quoted text
                out.append(token)
                quote_open, glue_next = False, False
            else:
                out.append(token if (glue_next or not out) else " " + token)
                quote_open, glue_next = True, True
            continue
        if out and not glue_next and token not in _ATTACH_LEFT:
            out.append(" ")
        out.append(token)
        glue_next = token in _ATTACH_RIGHT
    return "".join(out)


# ----------------------------------------------------------------------------- items


@dataclass(frozen=True)
class PromptItem:
    """One pair: the user's prompt text, the reference response, and where it came from."""

    prompt: str
    reference: str
    origin: str  # "file, line N" or "ACLSum id aspect": for error messages and inspection


def aclsum_dir(path: str | None = None) -> Path:
    """The folder with ACLSum's {train,val,test}.jsonl: `path` if given, else the installed package's."""
    if path:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise DataError(f"data.aclsum_dir={path}: not a folder; give the folder holding train.jsonl, val.jsonl "
                            f"and test.jsonl, or null for the installed {ACLSUM_REQUIREMENT} package")
        return folder
    folder = package_folder("aclsum", "set data.aclsum_dir to a folder with its jsonl files") / "dataset"
    if not folder.is_dir():
        raise DataError(f"{folder} does not exist: the installed {ACLSUM_REQUIREMENT} is incomplete; reinstall it "
                        "(`make install`), or set data.aclsum_dir to a folder with its jsonl files")
    return folder


def _aclsum_papers(folder: Path, split: str):
    """(line, paper id, detokenised abstract, summaries by aspect) per paper of one ACLSum split, in file order."""
    path = Path(folder) / ACLSUM_SPLIT_FILES[split]
    if not path.is_file():
        raise DataError(f"{path} does not exist; reinstall {ACLSUM_REQUIREMENT} (--no-deps) or fix data.aclsum_dir")
    for line, row in read_jsonl(path):
        try:
            abstract = detokenize(" ".join(row["sentences"]["abstract"]))
            summaries = row["summary"]
        except (KeyError, TypeError):
            raise DataError(f"{path}, line {line}: no sentences.abstract / summary fields; is this ACLSum's file?") \
                from None
        yield line, row.get("id", line), abstract, summaries


def read_aclsum(folder: Path, split: str, aspects: tuple[str, ...] = ACLSUM_ASPECTS,
                template: str = ACLSUM_TEMPLATE) -> list[PromptItem]:
    """The (paper, aspect) pairs of one ACLSum split, in file order, aspects in the given order."""
    items = []
    for line, paper, abstract, summaries in _aclsum_papers(folder, split):
        for aspect in aspects:
            reference = (summaries.get(aspect) or "").strip()
            if not reference:
                raise DataError(f"{Path(folder) / ACLSUM_SPLIT_FILES[split]}, line {line}: no {aspect!r} summary; "
                                f"data.aspects must be among {list(ACLSUM_ASPECTS)}")
            items.append(PromptItem(template.format(aspect=aspect, abstract=abstract), detokenize(reference),
                                    f"ACLSum {paper} {aspect}"))
    return items


def extra_template_problem(template: str) -> str | None:
    """What is wrong with one of data.train_prompt_templates, or None: it must show the paper ({abstract}) and
    name no field but {abstract} and {aspect}."""
    if "{abstract}" not in template:
        return "has no {abstract} field; every extra template must show the paper"
    try:
        template.format(abstract="", aspect="")
    except (KeyError, IndexError, ValueError) as error:
        return f"is not a template of {{abstract}} and {{aspect}} only ({type(error).__name__}: {error})"
    return None


def aclsum_extra_prompts(folder: Path, templates: list[str], aspects: tuple[str, ...] = ACLSUM_ASPECTS) -> list[PromptItem]:
    """More training prompts on ACLSum's training papers: every paper under every template (once per aspect where
    the template names one). They have no reference (empty): their text is the model's own response
    (method.lm_exits.responses=model), so the exits learn from more of what the model writes, on papers that no
    held-out prompt shows."""
    items = []
    for number, template in enumerate(templates):
        for _, paper, abstract, _ in _aclsum_papers(folder, "train"):
            for aspect in (aspects if "{aspect}" in template else (None,)):
                prompt = template.format(abstract=abstract, **({"aspect": aspect} if aspect else {}))
                items.append(PromptItem(prompt, "", f"ACLSum {paper}, extra template {number}"
                                        + (f" {aspect}" if aspect else "")))
    return items


def read_prompt_response(path: str | Path, prompt_field: str, response_field: str,
                         input_field: str | None = None, key: str = "train_file") -> list[PromptItem]:
    """Pairs from a .jsonl or .json file; an `input_field`, when present and non-empty, follows the prompt
    after a blank line (Alpaca: instruction, input, output)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data.{key}={path}: the file does not exist; set data.{key} to a .jsonl or .json file")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}); fix the file "
                            f"(a .json file holds one list of objects; use .jsonl for one object per line)") from err
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not utf-8 text ({err}); re-encode the file as utf-8") from err
        if not isinstance(rows, list):
            raise DataError(f"{path}: a .json file must hold a list of objects, found {type(rows).__name__}")
        numbered = [(f"item {i + 1}", row) for i, row in enumerate(rows)]
    elif path.suffix == ".jsonl":
        numbered = [(f"line {line}", row) for line, row in read_jsonl(path)]
    else:
        raise DataError(f"data.{key}={path}: unknown extension {path.suffix!r}; use .jsonl or .json")
    setting = {prompt_field: "prompt_field", response_field: "response_field"}
    items = []
    for where, row in numbered:
        if not isinstance(row, dict):
            raise DataError(f"{path}, {where}: expected a JSON object, got {type(row).__name__}")
        for field in (prompt_field, response_field):
            if field not in row:
                raise DataError(f"{path}, {where}: no {field!r} field; set data.{setting[field]} to the right key "
                                f"(this row has {sorted(row)})")
        prompt, response = _text(row[prompt_field]), _text(row[response_field])
        if not prompt:
            raise DataError(f"{path}, {where}: empty prompt in field {prompt_field!r}")
        if not response:
            raise DataError(f"{path}, {where}: empty response in field {response_field!r}")
        extra = _text(row.get(input_field)) if input_field else ""
        items.append(PromptItem(f"{prompt}\n\n{extra}" if extra else prompt, response, f"{path}, {where}"))
    if not items:
        raise DataError(f"data.{key}={path} has no rows")
    return items


def _text(value) -> str:
    return "" if value is None else str(value).strip()


# ----------------------------------------------------------------------------- tokenising and batches


def chat_prompt_ids(tokenizer, prompt: str, system_prompt: str | None = None) -> list[int]:
    """Ids of the chat template around one user message, ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no chat template; use an instruction-tuned "
                        f"model's tokenizer (or set tokenizer.chat_template)")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + \
        [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # the template already holds the special tokens (BOS, turn markers)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_prompt(tokenizer, prompt: str, max_prompt_length: int, system_prompt: str | None = None,
                  origin: str = "a prompt") -> tuple[list[int], bool]:
    """(ids of the chat template around `prompt`, truncated?). A long prompt loses the end of its user
    message (the template's markers stay). `origin` names the prompt in errors."""
    prompt_ids = chat_prompt_ids(tokenizer, prompt, system_prompt)
    truncated = False
    if len(prompt_ids) > max_prompt_length:
        truncated = True
        content = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        keep = len(content) - (len(prompt_ids) - max_prompt_length)
        while len(prompt_ids) > max_prompt_length:
            if keep < 1:
                raise DataError(f"{origin}: data.max_prompt_length={max_prompt_length} cannot hold even the chat "
                                f"template; raise it")
            prompt_ids = chat_prompt_ids(tokenizer, tokenizer.decode(content[:keep]), system_prompt)
            keep -= max(1, len(prompt_ids) - max_prompt_length)
    return prompt_ids, truncated


def encode_item(tokenizer, item: PromptItem, max_prompt_length: int, max_response_length: int,
                system_prompt: str | None = None) -> tuple[list[int], list[int], bool]:
    """(prompt ids, response ids + EOS, truncated?). A long prompt loses the end of its user message
    (the template's markers stay); a long response is cut (and then has no EOS)."""
    prompt_ids, truncated = encode_prompt(tokenizer, item.prompt, max_prompt_length, system_prompt, item.origin)
    response = list(tokenizer(item.reference, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        response.append(tokenizer.eos_token_id)
    if len(response) > max_response_length:
        truncated = True
        response = response[:max_response_length]
    return prompt_ids, response, truncated


class PromptResponseSplit(Dataset):
    """Tokenised items of one split; item i is a dict with its ids, texts and row index."""

    def __init__(self, items: list[PromptItem], prompt_ids: list[list[int]], response_ids: list[list[int]]):
        self.items, self.prompt_ids, self.response_ids = items, prompt_ids, response_ids

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"idx": i, "prompt_ids": self.prompt_ids[i], "response_ids": self.response_ids[i],
                "prompt": self.items[i].prompt, "reference": self.items[i].reference}

    @property
    def references(self) -> list[str]:
        return [item.reference for item in self.items]


def collate_train(rows: list[dict], pad_id: int) -> dict:
    """Prompt + response, right-padded: input_ids, attention_mask, labels (-100 on prompt and padding), idx."""
    sequences = [r["prompt_ids"] + r["response_ids"] for r in rows]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, (row, seq) in enumerate(zip(rows, sequences)):
        input_ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        start = len(row["prompt_ids"])
        labels[b, start:len(seq)] = torch.tensor(row["response_ids"])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
            "idx": torch.tensor([r["idx"] for r in rows])}


def collate_generate(rows: list[dict], pad_id: int) -> dict:
    """Prompts alone, left-padded: input_ids, attention_mask, references (texts), prompts (texts), idx."""
    width = max(len(r["prompt_ids"]) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["prompt_ids"])
        input_ids[b, width - n:] = torch.tensor(row["prompt_ids"])
        mask[b, width - n:] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "references": [r["reference"] for r in rows],
            "prompts": [r["prompt"] for r in rows], "idx": torch.tensor([r["idx"] for r in rows])}


class _Collate:
    """Picklable collate function (for worker processes)."""

    def __init__(self, kind: str, pad_id: int):
        if kind not in ("train", "generate"):
            raise ValueError(f"batch kind {kind!r}: use 'train' or 'generate'")
        self.fn = collate_train if kind == "train" else collate_generate
        self.pad_id = pad_id

    def __call__(self, rows):
        return self.fn(rows, self.pad_id)


class GenerationDataModule(L.LightningDataModule):
    """Prompt -> reference pairs, tokenised in `setup`. Subclasses read the splits (`load_splits`).

    Training loaders give LM batches (`collate_train`) of the train split; validation / test loaders
    give LM batches of theirs (teacher-forced loss); `generation_dataloader(split)` gives left-padded
    prompts with their references. max_*_samples take a seeded subset of each split.
    """

    def __init__(self, tokenizer, name: str, max_prompt_length: int = 384, max_response_length: int = 64,
                 batch_size: int = 8, eval_batch_size: int = 8, num_workers: int = 0,
                 max_train_samples: int | None = None, max_eval_samples: int | None = None, split_seed: int = 1234,
                 system_prompt: str | None = None):
        super().__init__()
        for key, value in (("max_prompt_length", max_prompt_length), ("max_response_length", max_response_length),
                           ("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if int(value) < 1:
                raise DataError(f"data.{key}={value} must be >= 1")
        self.tokenizer = tokenizer
        self.name = name
        self.max_prompt_length = int(max_prompt_length)
        self.max_response_length = int(max_response_length)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.split_seed = int(split_seed)
        self.system_prompt = system_prompt
        self._splits: dict[str, PromptResponseSplit] | None = None

    def load_splits(self) -> dict[str, list[PromptItem]]:
        raise NotImplementedError

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id  # padding is masked out; any id works
        if pad is None:
            raise DataError(f"tokenizer {type(self.tokenizer).__name__} has neither a pad nor an EOS token")
        return int(pad)

    def setup(self, stage: str | None = None) -> None:
        if self._splits is not None:
            return
        splits = self.load_splits()
        self._splits = {}
        for number, split in enumerate(SPLITS):
            items = splits[split]
            limit = self.max_train_samples if split == "train" else self.max_eval_samples
            if limit is not None and int(limit) < len(items):
                generator = torch.Generator().manual_seed(self.split_seed + 1 + number)
                rows = sorted(torch.randperm(len(items), generator=generator)[:int(limit)].tolist())
                items = [items[i] for i in rows]
            if not items:
                raise DataError(f"the {split} split of data option {self.name!r} is empty")
            encoded = [encode_item(self.tokenizer, item, self.max_prompt_length, self.max_response_length,
                                   self.system_prompt) for item in items]
            cut = sum(e[2] for e in encoded)
            if cut:
                log.warning("data %s: %d of %d %s items truncated to max_prompt_length=%d / max_response_length=%d",
                            self.name, cut, len(items), split, self.max_prompt_length, self.max_response_length)
            self._splits[split] = PromptResponseSplit(items, [e[0] for e in encoded], [e[1] for e in encoded])

    def dataset(self, split: str) -> PromptResponseSplit:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; use one of {SPLITS}")
        self.setup()
        return self._splits[split]

    def use_responses(self, split: str, response_ids: list[list[int]]) -> None:
        """Teacher-force `split` on other responses from now on (e.g. the model's own, `training.lm_responses`):
        its training batches and caches read them; its prompts and reference texts (what generation is
        scored against) stay."""
        current = self.dataset(split)
        if len(response_ids) != len(current):
            raise DataError(f"{len(response_ids)} responses for the {len(current)} items of the {split} split")
        self._splits[split] = PromptResponseSplit(current.items, current.prompt_ids, [list(r) for r in response_ids])

    def dataloader(self, split: str, kind: str = "train", shuffle: bool = False,
                   batch_size: int | None = None, seed: int | None = None) -> DataLoader:
        """Batches of `kind` ("train": prompt + reference; "generate": prompts). `shuffle` with a `seed`:
        an order that depends only on (seed, epoch) and resumes mid-epoch (`data.resumable`)."""
        batch_size = batch_size or (self.batch_size if shuffle else self.eval_batch_size)
        common = {"batch_size": batch_size, "collate_fn": _Collate(kind, self.pad_id), "num_workers": self.num_workers,
                  "persistent_workers": self.num_workers > 0}
        if shuffle and seed is not None:
            dataset = self.dataset(split)
            return ResumableLoader(dataset, sampler=EpochShuffle(len(dataset), seed=seed),
                                   generator=torch.Generator().manual_seed(seed), **common)
        return DataLoader(self.dataset(split), shuffle=shuffle, **common)

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("validation", "train")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test", "train")

    def generation_dataloader(self, split: str = "test", batch_size: int | None = None) -> DataLoader:
        return self.dataloader(split, "generate", batch_size=batch_size)


class ACLSumDataModule(GenerationDataModule):
    """ACLSum's own splits (100 / 50 / 100 papers, times the chosen aspects)."""

    def __init__(self, tokenizer, aclsum_dir: str | None = None, aspects=ACLSUM_ASPECTS,
                 prompt_template: str = ACLSUM_TEMPLATE, train_prompt_templates=(), name: str = "aclsum",
                 **kwargs):
        super().__init__(tokenizer, name=name, **kwargs)
        aspects = tuple(str(a) for a in aspects)
        unknown = [a for a in aspects if a not in ACLSUM_ASPECTS]
        if unknown or not aspects:
            raise DataError(f"data.aspects={list(aspects)}: choose among {list(ACLSUM_ASPECTS)}")
        for field in ("{aspect}", "{abstract}"):
            if field not in prompt_template:
                raise DataError(f"data.prompt_template has no {field} field: {prompt_template!r}")
        self.train_prompt_templates = [str(t) for t in (train_prompt_templates or ())]
        for template in self.train_prompt_templates:
            problem = extra_template_problem(template)
            if problem:
                raise DataError(f"data.train_prompt_templates: {template!r} {problem}")
        self.aclsum_dir = aclsum_dir
        self.aspects = aspects
        self.prompt_template = prompt_template

    def load_splits(self) -> dict[str, list[PromptItem]]:
        folder = aclsum_dir(self.aclsum_dir)
        splits = {split: read_aclsum(folder, split, self.aspects, self.prompt_template) for split in SPLITS}
        splits["train"] += aclsum_extra_prompts(folder, self.train_prompt_templates, self.aspects)
        return splits


class PromptResponseDataModule(GenerationDataModule):
    """Local .jsonl / .json files; a missing validation or test file is carved from train (seeded)."""

    def __init__(self, tokenizer, train_file: str | None = None, validation_file: str | None = None,
                 test_file: str | None = None, prompt_field: str = "instruction", response_field: str = "output",
                 input_field: str | None = "input", validation_fraction: float = 0.1, test_fraction: float = 0.1,
                 name: str = "jsonl_generation", **kwargs):
        super().__init__(tokenizer, name=name, **kwargs)
        if not train_file:
            raise DataError("data option jsonl_generation: data.train_file is not set; set data.train_file=PATH to a "
                            ".jsonl or .json file (validation_file/test_file are optional)")
        self.files = {"train": train_file, "validation": validation_file, "test": test_file}
        for split, value in self.files.items():
            if value and not Path(value).expanduser().is_file():
                raise DataError(f"data.{split}_file={value}: the file does not exist; set it to an existing file"
                                f"{'' if split == 'train' else ' (or null to carve it from train)'}")
        self.prompt_field, self.response_field = str(prompt_field), str(response_field)
        self.input_field = str(input_field) if input_field else None
        self.fractions = {"validation": float(validation_fraction), "test": float(test_fraction)}

    def load_splits(self) -> dict[str, list[PromptItem]]:
        splits = {split: read_prompt_response(path, self.prompt_field, self.response_field, self.input_field,
                                              f"{split}_file")
                  for split, path in self.files.items() if path}
        carve = [s for s in ("test", "validation") if s not in splits]
        if carve:
            train = splits["train"]
            sizes = [fraction_size(len(train), self.fractions[s], f"data.{s}_fraction") for s in carve]
            if sum(sizes) >= len(train):
                raise DataError(f"{self.files['train']}: {len(train)} rows are too few to carve {carve} from; "
                                f"add data.validation_file/test_file or more rows")
            parts = split_rows(len(train), sizes, self.split_seed)
            for split, rows in zip(carve, parts):
                splits[split] = [train[i] for i in rows]
            splits["train"] = [train[i] for i in parts[-1]]
        return splits
