"""loadtests/: Locust run headless against a live `pipeinfer serve`, and the ramp shape.

Locust is only ever imported in subprocesses: importing it monkey-patches the
whole interpreter with gevent, which must not happen to the test process.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ServerProcess, make_tiny_model_with_tokenizer

REPO = Path(__file__).resolve().parents[2]
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"
RAMP_SHAPE = REPO / "loadtests" / "ramp_shape.py"
LOCUST = Path(sys.executable).parent / "locust"

REQUEST_ROWS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                ("POST", "/v1/completions [stream]"), ("POST", "/v1/chat/completions [stream]")]
STREAMS = ["/v1/completions [stream]", "/v1/chat/completions [stream]"]


@pytest.fixture(scope="module")
def long_context_tiny_model(tmp_path_factory, default_model) -> Path:
    """Like tiny_text_model (SmolLM2's tokenizer and chat template) but with
    a 2048-token context, so that the long-context prompt of the mix fits."""
    return make_tiny_model_with_tokenizer(tmp_path_factory.mktemp("tiny-2k") / "m", seed=7,
                                          tokenizer_from=default_model, num_layers=2,
                                          max_position_embeddings=2048)


def read_stats(prefix: Path) -> dict[tuple[str, str], dict[str, str]]:
    with open(f"{prefix}_stats.csv", newline="") as f:
        return {(row["Type"], row["Name"]): row for row in csv.DictReader(f)}


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_headless_run_has_every_user_kind_ttft_itl_and_no_failures(long_context_tiny_model, tmp_path):
    with ServerProcess("--model", str(long_context_tiny_model), "--served-model-name", "tiny-2k",
                       api_key="load-test-key") as server:
        # 4 users, one of each kind (Locust gives every class one before weighting);
        # the model and its context come from /v1/models, the key from the environment.
        result = subprocess.run(
            [str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", "6s",
             "--host", server.url, "--csv", str(tmp_path / "run"), "--only-summary", "--max-tokens-scale", "0.05"],
            env={**os.environ, "PIPEINFER_API_KEY": "load-test-key"}, cwd=tmp_path,
            capture_output=True, text=True, timeout=120)
    output = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, output
    stats = read_stats(tmp_path / "run")
    for key, row in stats.items():
        assert row["Failure Count"] == "0", (key, output)
    for key in [*REQUEST_ROWS, ("GET", "/v1/models")]:
        assert int(stats[key]["Request Count"]) > 0, (key, output)
    for name in STREAMS:
        ttft, itl, whole = stats[("TTFT", name)], stats[("ITL", name)], stats[("POST", name)]
        assert int(ttft["Request Count"]) > 0 and int(itl["Request Count"]) > 0, output
        # The stream's row is timed to [DONE], not to its headers: never shorter than its TTFT.
        assert 0 < float(ttft["Average Response Time"]) <= float(whole["Average Response Time"]), output
    with open(tmp_path / "run_failures.csv") as f:
        assert len(f.read().strip().splitlines()) == 1, "failures beyond the header"
    with open(tmp_path / "run_exceptions.csv") as f:
        assert len(f.read().strip().splitlines()) == 1, "exceptions beyond the header"


def test_ramp_shape_doubles_users_per_step_then_stops():
    """RampShape.tick() at chosen run times, in a subprocess (see the module docstring)."""
    probe = f"""
import importlib.util, json, types
spec = importlib.util.spec_from_file_location("ramp_shape", {str(RAMP_SHAPE)!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
shape = module.RampShape()
options = types.SimpleNamespace(ramp_max_users=6, ramp_step_time=10.0)
shape.runner = types.SimpleNamespace(environment=types.SimpleNamespace(parsed_options=options))
ticks = []
for t in [0, 9.9, 10, 25, 30, 39.9, 40]:
    shape.get_run_time = lambda t=t: t
    ticks.append(shape.tick())
print(json.dumps({{"ticks": ticks, "default": module.ramp_steps(module.DEFAULT_MAX_USERS)}}))
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["ticks"] == [[1, 1.0], [1, 1.0], [2, 2.0], [4, 4.0], [6, 6.0], [6, 6.0], None]
    assert out["default"] == [1, 2, 4, 8, 16]
