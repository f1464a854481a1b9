"""zeroship.ray_session: a private local Ray that comes up even when its first start times out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from zeroship.ray_session import NODE_TIMEOUT, start_local

# Ray's processes run Python's sitecustomize too: this one holds the dashboard agent back 17 s, once (the
# marker file), past the raylet's 15 s wait for the agent's ports: the raylet aborts and ray.init raises,
# as it did on a busy 2-core machine with two launches starting at once
SLOW_AGENT = r"""
import os, time
cmd = open("/proc/self/cmdline", "rb").read()
marker = os.environ["SLOW_AGENT_ONCE"]
if b"dashboard/agent.py" in cmd and not os.path.exists(marker):
    open(marker, "w").close()
    time.sleep(17)
"""

START = r"""
import json, psutil, ray
from zeroship.ray_session import init_ray
where = init_ray()
names = [p.name() for p in psutil.Process().children(recursive=True)]
print(json.dumps({"where": where, "cpus": ray.cluster_resources().get("CPU"),
                  "answer": ray.get(ray.remote(lambda: 6 * 7).remote()),
                  "gcs": names.count("gcs_server"), "raylets": names.count("raylet")}))
"""


def test_a_local_ray_whose_node_timed_out_starts_again_and_leaves_nothing_of_the_first(tmp_path, ray_tmp):
    (tmp_path / "sitecustomize.py").write_text(SLOW_AGENT)
    marker = tmp_path / "agent-held-back"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "SLOW_AGENT_ONCE": str(marker), "ZEROSHIP_RAY_TMPDIR": ray_tmp,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    res = subprocess.run([sys.executable, "-c", START], capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    assert marker.exists()  # the first start really was held back
    assert "the local Ray's node did not start in time (a busy machine?); starting it again (2/3)" in res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    # one node of the machine's CPUs + 1, working; the first attempt's GCS and raylet are gone
    assert got == {"where": f"local ray ({os.cpu_count()} CPUs, 127.0.0.1)", "cpus": (os.cpu_count() or 1) + 1,
                   "answer": 42, "gcs": 1, "raylets": 1}


def test_start_local_retries_only_ray_s_node_timeout_and_gives_up_after_its_tries(capsys):
    calls = []

    def flaky(fails: int, message: str = f"The current node {NODE_TIMEOUT}. This could happen …"):
        def init():
            calls.append(1)
            if len(calls) <= fails:
                raise Exception(message)
        return init

    start_local(flaky(2), tries=3)  # fails twice, then starts
    assert len(calls) == 3 and capsys.readouterr().err.count("starting it again") == 2
    calls.clear()
    with pytest.raises(Exception, match=NODE_TIMEOUT):
        start_local(flaky(5), tries=3)
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(Exception, match="address already in use"):  # any other failure: at once, no retry
        start_local(flaky(1, "address already in use"), tries=3)
    assert len(calls) == 1
