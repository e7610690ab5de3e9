"""examples/ray_train_syncbn.py on a local Ray cluster of 2 CPU workers (ray.train.torch)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a local Ray cluster starts in ~1.5 min on 2 busy cores
def test_ray_train_example_syncs_batch_norm(tmp_path):
    pytest.importorskip("ray.train.torch", reason="ray[train] is the optional [scale] extra")
    cmd = [sys.executable, str(REPO / "examples" / "ray_train_syncbn.py"), "--steps", "10",
           "--storage", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    # start_new_session: ray.shutdown() ends the cluster; on a timeout the whole group is killed
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.communicate()
    assert proc.returncode == 0, output
    match = re.search(r"loss (\d+\.\d+) -> (\d+\.\d+); running statistics identical on 2 "
                      r"workers", output)
    assert match, output
    assert float(match.group(2)) < float(match.group(1))
