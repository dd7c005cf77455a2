"""The models a stage trains and reads: the student catalog, loading with safetensors, cutting a
student out of a deeper model, fingerprints of weights and tokenizers, and a fine-tuned model's
label order. `distill.models.X` names the public functions of the modules below."""

from distill.models.load import (  # noqa: F401
    ModelLoadError,
    STUDY_NAMES,
    align_labels,
    build_trained_model,
    count_parameters,
    fingerprint,
    freeze,
    label_order,
    load_config,
    load_model,
    load_teacher,
    load_tokenizer,
    output_layer,
    packaged_minilm,
    resolve,
    resolve_student,
    same_tokenizer,
    short_name,
    student_from_teacher,
    student_layers,
    tokenizer_digest,
    uniform_layers,
)
