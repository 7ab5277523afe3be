"""The PostTrainJob API (posttrain.dev/v1alpha1). Imports neither JAX nor kopf."""

from posttrain.api.load import FieldError, JobInvalid, load_documents, parse_documents, parse_job
from posttrain.api.v1alpha1 import (
    ALGORITHMS,
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    PostTrainJob,
    PostTrainJobSpec,
    PostTrainJobStatus,
)

__all__ = [
    "ALGORITHMS",
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "FieldError",
    "JobInvalid",
    "PostTrainJob",
    "PostTrainJobSpec",
    "PostTrainJobStatus",
    "load_documents",
    "parse_documents",
    "parse_job",
]
