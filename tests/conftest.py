import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from helpers import build_family_models, build_tiny_model  # noqa: E402

# The embedding API tests' key, set before any Ray worker starts (workers read it from their environment, as on a
# cluster where it is set on every node); the tests look for it in everything the jobs write and say.
API_KEY_ENV = "FAKE_EMBEDDING_API_KEY"
API_KEY = "sk-test-DO-NOT-LOG-4c1d9e"
os.environ[API_KEY_ENV] = API_KEY
# The fault-injection plan file (retrieval_core.io.faults), named before any worker starts; inert while it does not
# exist (the ``faults`` fixture writes it for one test).
FAULT_PLAN = Path(tempfile.mkdtemp(prefix="retrieval-faults-")) / "plan.json"
os.environ["RETRIEVAL_TEST_FAULTS"] = str(FAULT_PLAN)
atexit.register(shutil.rmtree, FAULT_PLAN.parent, True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="session")
def tiny_model_without_dropout(tmp_path_factory) -> str:
    """The tiny model without dropout: training on it is deterministic whatever the number of workers."""
    return str(build_tiny_model(tmp_path_factory.mktemp("models-nodrop"), dropout=0.0))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict[str, str]:
    """Tiny stand-ins of each model family (see helpers.build_family_models)."""
    return build_family_models(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def ray_cluster(encode_log):
    """One local Ray cluster for the whole test session (2 CPUs)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session", autouse=True)
def encode_log(tmp_path_factory):
    """Arms the encoder's test hook for the session (before any Ray worker starts, so workers inherit it): every
    document encoded anywhere appends its text hash to a file in this directory. ``encoded_hashes`` reads it."""
    directory = tmp_path_factory.mktemp("encode-log")
    os.environ["RETRIEVAL_TEST_ENCODE_LOG"] = str(directory)
    yield directory


S3_SECRET = "s3cr3t-DO-NOT-LOG-7f3a"  # a fake secret the object-storage tests look for in everything written


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 protocol server for the test session: moto's server mode on 127.0.0.1, on a free port."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session")
def s3_options(s3_endpoint) -> dict:
    """fsspec storage options for the server: a fake key id and the recognisable fake secret ``S3_SECRET``."""
    return {"key": "test-key-id", "secret": S3_SECRET, "client_kwargs": {"endpoint_url": s3_endpoint}}


@pytest.fixture(scope="session")
def embedding_api_server():
    from fake_embedding_api import FakeEmbeddingAPI

    server = FakeEmbeddingAPI(API_KEY).start()
    yield server
    server.stop()


@pytest.fixture
def embedding_api(embedding_api_server):
    """The local stand-in of the OpenAI and Cohere embedding APIs (tests/fake_embedding_api.py), with no faults
    and an empty request log."""
    embedding_api_server.reset()
    yield embedding_api_server
    embedding_api_server.reset()


def arm_faults(plan: list[dict]) -> None:
    """Arm the fault points of retrieval_core.io.faults with ``plan`` (a list of faults) in every process."""
    disarm_faults()
    FAULT_PLAN.write_text(json.dumps(plan))


def disarm_faults() -> None:
    FAULT_PLAN.unlink(missing_ok=True)
    for marker in FAULT_PLAN.parent.glob(f"{FAULT_PLAN.name}.*"):
        marker.unlink()


def faults_fired(number: int = 0) -> int:
    """How many hits of fault ``number`` of the armed plan were claimed (fired or skipped) so far."""
    return len(list(FAULT_PLAN.parent.glob(f"{FAULT_PLAN.name}.{number}.*")))


@pytest.fixture
def faults():
    """``faults(plan)`` arms the fault points for this test (see :func:`arm_faults`); disarmed after it."""
    yield arm_faults
    disarm_faults()
