"""schemathesis against the app's own OpenAPI schema: no 5xx, no response that
violates the schema, invalid input rejected (in-process app, real engine)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from compute.model_source import resolve_model
from server.app import create_app
from server.engine_host import EngineHost
from server.settings import ServerSettings
from tests.helpers import load_engine, make_tiny_model_with_tokenizer

STATUSES: dict[str, list[int]] = {}


def _app():
    model_dir = make_tiny_model_with_tokenizer(Path(tempfile.mkdtemp()) / "m", seed=3, num_layers=2,
                                               max_position_embeddings=96,  # bounds chat's default length
                                               tokenizer_from=resolve_model("default", show_progress=False))
    engine = load_engine(model_dir, "ngram", 2, "pipeinfer")
    return create_app(EngineHost.ready(engine), ServerSettings(served_model_name="tiny", max_body_bytes=1 << 16))


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    # Schema-valid requests may still be refused for reasons a schema cannot
    # state (prompt + max_tokens over the context, an unknown model name), so
    # "positive data acceptance" is the one check left out.
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    STATUSES.setdefault(f"{case.method} {case.path}", []).append(response.status_code)


def test_the_fuzzing_reached_generation():
    """Guard against a run that only ever saw 4xx: some requests must have generated."""
    for path in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert 200 in STATUSES.get(path, []), (path, sorted(set(STATUSES.get(path, []))))
