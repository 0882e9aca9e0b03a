"""The HTTP API fuzzed from its own OpenAPI schema (schemathesis, issue 26), bounded: every
operation gets schema-generated and schema-violating requests (paths, query parameters, bodies,
headers) against the service in this process on a tiny index; no request may get a 5xx, and every
4xx is the service's one-line JSON error."""
from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from hypothesis import HealthCheck, settings  # noqa: E402

EXAMPLES = 40  # per operation


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    import numpy as np
    import torch
    from PIL import Image
    from serve_util import build_index, tiny_weights

    import pylandmark as plm
    from pylandmark.serve.app import create_app
    from pylandmark.serve.config import ServeConfig
    from pylandmark.serve.engine import Engine

    d = tmp_path_factory.mktemp("fuzzapi")
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (d / "train" / label).mkdir(parents=True)
        for i in range(2):
            pixels = rng.integers(0, 256, (36, 48 + i, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / "train" / label / f"{i}.png")
    index = build_index(d, tiny_weights(d), d / "tiny.plmi", size=64)
    threads_before = torch.get_num_threads()
    config = ServeConfig(index=str(index), threads=1, max_images=4, max_k=20, max_upload_mb=1,
                         allowed_hosts=("testserver",))  # the host name Starlette's test client sends
    engine = Engine(config)
    app = create_app(config, engine)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    engine.close()
    plm.set_num_threads(0)
    torch.set_num_threads(threads_before)


def _operations(api):
    return [result.ok() for result in api.get_all_operations()]


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_request_gets_a_server_error(api, mode):
    """schemathesis generates requests from the schema (positive: valid by it; negative: breaking
    it) for every operation; hypothesis runs EXAMPLES of each, derandomized."""
    from hypothesis import given
    from schemathesis import GenerationMode

    operations = _operations(api)
    assert {op.path for op in operations} >= {"/recognize", "/search", "/info", "/health", "/images/{image_id}"}
    generation = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    seen: dict[str, int] = {}

    def check(case):
        response = case.call()
        seen[case.path] = seen.get(case.path, 0) + 1
        assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:300])
        if response.status_code >= 400:
            body = response.json()
            assert isinstance(body.get("error"), str) and "\n" not in body["error"], body

    for op in operations:
        if mode == "negative" and not (op.query or op.path_parameters or op.body or op.headers):
            continue  # nothing of this operation's input can break its schema (GET /health)
        run = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                       suppress_health_check=list(HealthCheck))(given(op.as_strategy(generation))(check))
        run()
    # positive: every operation was called; negative: those whose schema has inputs to break
    assert len(seen) == (len(operations) if mode == "positive" else sum(
        bool(op.query or op.path_parameters or op.body or op.headers) for op in operations)) >= 1, seen
