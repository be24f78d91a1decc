"""`ray start --head` + `ray job submit` runs the same sample job on that cluster."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head_node(tmp_path_factory):
    gcs, dash, agent = _free_port(), _free_port(), _free_port()
    tmp = tmp_path_factory.mktemp("ray")
    # Token auth as a real cluster runs it: the head and every client read the same token. The
    # `ray job` CLI only sends it when RAY_AUTH_MODE=token is set (the README says so too).
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    log = open(tmp / "head.log", "w")
    # --block keeps the head in this process group, so teardown stops exactly this cluster
    # (`ray stop` would also stop any other cluster on the machine).
    proc = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={gcs}",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-agent-listen-port={agent}",
            "--num-cpus=2",
            "--disable-usage-stats",
        ],  # own agent port: a stale agent elsewhere may hold the default
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    last = ""
    deadline = time.time() + 180
    while time.time() < deadline:
        # ready = a trivial job runs (the job server answers before the node's job agent is up)
        r = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--", "true"], env=env, capture_output=True, text=True
        )
        if r.returncode == 0:
            break
        last = (r.stdout + r.stderr)[-2000:]
        if proc.poll() is not None:
            pytest.fail(f"ray start --head exited with {proc.returncode}; see {log.name}")
        time.sleep(2)
    else:
        pytest.fail(f"the Ray head node could not run a trivial job within 180 s; last answer:\n{last}")
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
def test_ray_job_submit_runs_the_sample_job(head_node, tmp_path, shared_data):
    url, env = head_node
    runtime_env = {"env_vars": {"ZEROSEG_DATA": str(shared_data), "ZEROSEG_WORK": str(tmp_path)}}
    cmd = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        url,
        "--working-dir",
        str(REPO),
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        "python",
        "pipeline/run.py",
        "--config",
        "configs/sample.yaml",
        "--set",
        "build_splits.train.max_images=12",
        "--set",
        "build_splits.eval.0.max_images=2",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "ray: connecting to" in out  # the driver joined the submitted-to cluster
    assert "succeeded" in out
    # the job wrote its artifacts and MLflow runs where ZEROSEG_WORK pointed
    manifests = list((tmp_path / "sample" / "store" / "evaluate").glob("*/manifest.json"))
    assert len(manifests) == 1
    assert "val" in json.loads(manifests[0].with_name("metrics.json").read_text())
    assert (tmp_path / "sample" / "mlflow.db").exists()
