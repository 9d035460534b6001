"""Shared fixtures: offline environment, tiny random models, temporary service stores.

Every test session gets its own PREFECT_HOME, MLflow SQLite store and HF caches under a
temporary directory, so runs never see each other's cached state.
"""

import os
import tempfile
from pathlib import Path

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="iterabre-tests-"))
# Set before anything imports prefect/mlflow/datasets: they read these at import time.
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_HOME": str(_SESSION_TMP / "prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "HF_DATASETS_CACHE": str(_SESSION_TMP / "hf-datasets"),
    "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_TMP / 'mlflow.db'}",
})

from iterabre.tiny import FAMILY_CONFIGS, byte_tokenizer, tiny_model  # noqa: E402

ALL_FAMILIES = list(FAMILY_CONFIGS)


@pytest.fixture(scope="session")
def session_tmp() -> Path:
    return _SESSION_TMP


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_lm(request):
    """A tiny random Llama or Qwen2 model (6 blocks, float32, eval mode)."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M as a safetensors directory (pulled once; offline after)."""
    from iterabre.models import pull_embedded_model

    return pull_embedded_model("smollm2-135m")
