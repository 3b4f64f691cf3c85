"""Embedding API encoders against the local stand-in of both APIs (tests/fake_embedding_api.py): vectors, batching,
concurrency, retries, failures, the key's secrecy and the fingerprint. No Ray."""

import json
import os

import numpy as np
import pytest
from conftest import API_KEY, API_KEY_ENV
from fake_embedding_api import expected_vectors

from retrieval_core.config import ConfigError, ModelConfig, load_config
from retrieval_core.encode import encoding, providers
from retrieval_core.encode.providers import ApiEncoder, ProviderError

PROVIDERS = ("openai", "cohere")
TEXTS = [f"document {i} on the {word} of cells" for i, word in enumerate("growth death division motion".split())]


def model(api, provider: str, **settings) -> ModelConfig:
    base = f"{api.url}/v1" if provider == "openai" else api.url
    return ModelConfig(
        **{
            "name": "fake-embed",
            "provider": provider,
            "base_url": base,
            "api_key_env": API_KEY_ENV,
            "timeout": 0.5,
            **settings,
        }
    )


def input_type(provider: str, side: str) -> str:
    return providers.INPUT_TYPES[side] if provider == "cohere" else ""


@pytest.mark.parametrize("provider", PROVIDERS)
def test_vectors_are_the_provider_s_own_normalized_in_input_order(embedding_api, provider):
    """The stand-in answers OpenAI requests out of order (as the API may); Cohere gets each side's input_type."""
    encoder = ApiEncoder(model(embedding_api, provider, batch_size=3))
    documents = encoder.encode_documents(TEXTS)
    queries = encoder.encode_queries(TEXTS[:2])
    np.testing.assert_allclose(
        documents, expected_vectors(TEXTS, input_type=input_type(provider, "document")), atol=1e-6
    )
    np.testing.assert_allclose(
        queries, expected_vectors(TEXTS[:2], input_type=input_type(provider, "query")), atol=1e-6
    )
    assert encoder.dim == 32
    if provider == "cohere":
        assert {r.body["input_type"] for r in embedding_api.requests} == {"search_document", "search_query"}
        assert {r.body["truncate"] for r in embedding_api.requests} == {"END"}


@pytest.mark.parametrize("provider", PROVIDERS)
def test_prompts_of_the_config_or_family_are_sent_before_the_texts(embedding_api, provider):
    encoder = ApiEncoder(model(embedding_api, provider, name="intfloat/e5-large-v2"))  # family auto: e5
    vectors = encoder.encode_queries(TEXTS[:1])
    assert embedding_api.texts_sent() == ["query: " + TEXTS[0]]
    np.testing.assert_allclose(
        vectors, expected_vectors(TEXTS[:1], input_type=input_type(provider, "query"), prefix="query: "), atol=1e-6
    )
    ApiEncoder(model(embedding_api, provider, document_prompt="doc| ")).encode_documents(TEXTS[:1])
    assert embedding_api.texts_sent()[-1] == "doc| " + TEXTS[0]


@pytest.mark.parametrize("provider, batch_size, expected", [("openai", 3, [3, 1]), ("cohere", 500, [96, 96, 8])])
def test_requests_hold_batch_size_texts_at_most_the_provider_s_limit(embedding_api, provider, batch_size, expected):
    count = sum(expected)
    ApiEncoder(model(embedding_api, provider, batch_size=batch_size)).encode_documents(
        [f"text {i}" for i in range(count)]
    )
    assert sorted((len(r.texts) for r in embedding_api.requests), reverse=True) == expected


def test_request_spans_respect_inputs_and_characters():
    assert providers.request_spans([5, 5, 5, 5, 5], 2, 0) == [(0, 2), (2, 4), (4, 5)]
    assert providers.request_spans([5, 5, 5, 5, 5], 10, 11) == [(0, 2), (2, 4), (4, 5)]
    assert providers.request_spans([50, 1, 1], 10, 11) == [(0, 1), (1, 3)]  # a long text alone
    assert providers.request_spans([], 10, 11) == []


def test_requests_run_concurrently_up_to_max_concurrency(embedding_api):
    embedding_api.delay = 0.3
    encoder = ApiEncoder(model(embedding_api, "openai", batch_size=1, max_concurrency=3))
    vectors = encoder.encode_documents(TEXTS * 3)
    np.testing.assert_allclose(vectors, expected_vectors(TEXTS * 3), atol=1e-6)
    assert len(embedding_api.requests) == 12 and encoder.usage()["retries"] == 0  # slow, within the timeout
    assert 2 <= embedding_api.max_in_flight <= 3


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    "fault",
    [
        {"status": 429, "headers": {"retry-after-ms": "10"}},
        {"status": 429},  # no Retry-After: the SDK's own backoff
        {"status": 500},
        {"status": 503, "headers": {"retry-after": "0"}},
        {"delay": 1.5},  # past model.timeout (0.5 s): a timeout
    ],
    ids=["429-retry-after", "429", "500", "503", "timeout"],
)
def test_transient_failures_are_retried_and_counted(embedding_api, provider, fault):
    embedding_api.fail(**fault)
    encoder = ApiEncoder(model(embedding_api, provider))
    vectors = encoder.encode_documents(TEXTS)
    np.testing.assert_allclose(vectors, expected_vectors(TEXTS, input_type=input_type(provider, "document")), atol=1e-6)
    usage = encoder.usage()
    assert (usage["requests"], usage["retries"], usage["texts"]) == (2, 1, len(TEXTS))
    assert usage["tokens"] == sum(len(t.split()) for t in TEXTS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_batch_that_keeps_failing_fails_with_the_provider_message(embedding_api, provider):
    embedding_api.fail(status=500, times=100)
    encoder = ApiEncoder(model(embedding_api, provider, max_retries=2))
    with pytest.raises(ProviderError, match=r"failed after 3 attempt\(s\).*HTTP 500.*fake status 500"):
        encoder.encode_documents(TEXTS)
    assert len(embedding_api.requests) == 3
    assert encoder.usage()["retries"] == 2


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize(
    "fault, message",
    [({"malformed": True}, "failed after 1 attempt"), ({"wrong_count": True}, "returned 3 vectors for 4 texts")],
)
def test_unusable_answers_are_errors_not_vectors(embedding_api, provider, fault, message):
    embedding_api.fail(**fault)
    with pytest.raises(ProviderError, match=message):
        ApiEncoder(model(embedding_api, provider)).encode_documents(TEXTS)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_the_key_is_in_no_message_and_no_identity(embedding_api, provider, monkeypatch):
    wrong = "sk-wrong-SECRET-0042"
    monkeypatch.setenv("OTHER_KEY", wrong)
    with pytest.raises(ProviderError, match="HTTP 401") as failure:
        ApiEncoder(model(embedding_api, provider, api_key_env="OTHER_KEY")).encode_documents(TEXTS)
    assert wrong not in str(failure.value) and wrong[-4:] not in str(failure.value)
    monkeypatch.delenv("OTHER_KEY")
    with pytest.raises(ProviderError, match="environment variable OTHER_KEY .* not set"):
        ApiEncoder(model(embedding_api, provider, api_key_env="OTHER_KEY"))
    cfg = model(embedding_api, provider)
    written = json.dumps([encoding.encoder_identity(cfg), encoding.query_identity(cfg), repr(cfg)])
    assert API_KEY not in written


def test_a_key_pasted_into_api_key_env_is_refused_without_showing_it():
    with pytest.raises(ConfigError, match="must name an environment variable") as failure:
        load_config(None, ["model.provider=openai", f"model.api_key_env={API_KEY}"])
    assert API_KEY not in str(failure.value)


@pytest.mark.parametrize(
    "setting", ["model.precision=bf16", "model.query_name=other", "model.family=dpr", "model.max_seq_length=128"]
)
def test_local_only_settings_are_refused_for_an_api(setting):
    with pytest.raises(ConfigError, match="model.provider = 'openai'"):
        load_config(None, ["model.provider=openai", setting])


def test_over_long_texts_are_cut_to_max_input_chars_and_counted(embedding_api):
    long = "word " * 100
    encoder = ApiEncoder(model(embedding_api, "openai", max_input_chars=50))
    vectors = encoder.encode_documents([long, "short"])
    assert [len(t) for t in embedding_api.texts_sent()] == [50, 5]
    np.testing.assert_allclose(vectors, expected_vectors([long[:50], "short"]), atol=1e-6)
    assert encoder.usage()["truncated"] == 1
    assert encoding.encoder_identity(model(embedding_api, "openai", max_input_chars=50))["max_input_chars"] == 50


def test_fingerprint_is_provider_host_model_dimensions_and_prompt(embedding_api):
    cfg = model(embedding_api, "openai")
    same = model(embedding_api, "openai", base_url=f"{embedding_api.url}/v1/")
    fingerprint = encoding.encoder_identity(cfg)["fingerprint"]
    assert encoding.encoder_identity(same)["fingerprint"] == fingerprint
    others = [
        model(embedding_api, "cohere"),
        model(embedding_api, "openai", name="other"),
        model(embedding_api, "openai", truncate_dim=16),
        model(embedding_api, "openai", document_prompt="d: "),
        model(embedding_api, "openai", base_url="https://api.example.com/v1"),
    ]
    assert len({encoding.encoder_identity(c)["fingerprint"] for c in others} | {fingerprint}) == 6
    assert encoding.encoder_identity(cfg)["host"] == embedding_api.url.removeprefix("http://")
    assert encoding.query_identity(cfg)["fingerprint"] != fingerprint


@pytest.mark.parametrize("provider", PROVIDERS)
def test_truncate_dim_is_sent_as_the_provider_s_dimensions(embedding_api, provider):
    encoder = ApiEncoder(model(embedding_api, provider, truncate_dim=16))
    assert encoder.dim == 16 and not embedding_api.requests  # known without asking
    vectors = encoder.encode_documents(TEXTS)
    key = "dimensions" if provider == "openai" else "output_dimension"
    assert {r.body[key] for r in embedding_api.requests} == {16}
    np.testing.assert_allclose(vectors, expected_vectors(TEXTS, 16, input_type(provider, "document")), atol=1e-6)


def test_dimension_of_an_unknown_model_comes_from_its_first_answer(embedding_api):
    known = ApiEncoder(model(embedding_api, "openai", name="text-embedding-3-large"))
    assert known.dim == 3072 and not embedding_api.requests
    unknown = ApiEncoder(model(embedding_api, "openai"))
    assert unknown.dim == 32 and len(embedding_api.requests) == 1  # one probe
    assert encoding.encode_by_length(unknown, [], 8).shape == (0, 32)


def test_a_local_model_has_no_api_usage(tiny_model):
    assert encoding.usage_of(encoding.load_encoder(ModelConfig(name=tiny_model))) is None
    assert os.environ[API_KEY_ENV] == API_KEY
