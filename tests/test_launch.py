"""`opendit launch`: hostfile parsing, quoting, failure handling, and a real 2-"node" run through a stand-in ssh
(a script that drops the host and runs the command here with bash -c)."""

from __future__ import annotations

import json
import re
import shlex
import socket
import time
from pathlib import Path

import pytest
from tiny_models import make_tiny_t5

from opendit import launch
from opendit.data import write_synthetic_dataset

FAKE_SSH = '#!/bin/bash\n# stand-in for ssh: drop the host, run the command locally\nshift\nexec bash -c "$1"\n'


def fake_ssh(folder: Path, body: str = FAKE_SSH) -> Path:
    path = folder / "fake_ssh"
    path.write_text(body)
    path.chmod(0o755)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hostfile_comments_blank_lines_and_errors(tmp_path):
    good = tmp_path / "hosts"
    good.write_text("# cluster\nnode-a   # holds the rendezvous\n\n   \nuser@node-b\n")
    assert launch.read_hostfile(good) == ["node-a", "user@node-b"]
    cases = {
        "node-a\nnode-b slots=8\n": "line 2: expected one host name per line",
        "node-a\n\nnode;reboot\n": "line 3: 'node;reboot' is not a host name",
        "node-a\n$(reboot)\n": "line 2: '$(reboot)' is not a host name",
        "node-a\n# again\nnode-a\n": "line 3: host 'node-a' is already on line 1",
        "# nobody\n\n": "no hosts",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad"
        bad.write_text(text)
        with pytest.raises(launch.LaunchError, match=re.escape(message)):
            launch.read_hostfile(bad)
    with pytest.raises(launch.LaunchError, match="hostfile not found"):
        launch.read_hostfile(tmp_path / "missing")


def test_remote_command_quotes_every_argument():
    hostile = "a b; rm -rf / $(reboot) 'quoted' \"double\""
    line = launch.remote_command(["train", "--data_path", hostile], num_hosts=2, node_index=1, nproc_per_node=8,
                                 endpoint="node-a:29500", rdzv_id="abc", python="/opt/py 3/bin/python",
                                 cwd="/work dir", env={"NCCL_DEBUG": "INFO"})
    words = shlex.split(line)
    assert words[:4] == ["cd", "/work dir", "&&", "exec"]
    assert words[4:6] == ["env", "NCCL_DEBUG=INFO"]
    assert words[6:9] == ["/opt/py 3/bin/python", "-m", "torch.distributed.run"]
    assert "--nnodes=2" in words and "--rdzv_endpoint=node-a:29500" in words and "--rdzv_conf=is_host=false" in words
    assert words[-5:] == ["-m", "opendit", "train", "--data_path", hostile]  # one argument, untouched


def test_cli_errors(tmp_path, capsys):
    hosts = tmp_path / "hosts"
    hosts.write_text("node-a\nnode-a\n")
    assert launch.main(["--hostfile", str(hosts), "--nproc_per_node", "1", "--", "train"]) == 2
    assert "line 2: host 'node-a' is already on line 1" in capsys.readouterr().err
    hosts.write_text("node-a\n")
    assert launch.main(["--hostfile", str(hosts), "--nproc_per_node", "1"]) == 2
    assert "no command" in capsys.readouterr().err
    assert launch.main(["--hostfile", str(hosts), "--nproc_per_node", "0", "--", "train"]) == 2
    assert "--nproc_per_node must be >= 1" in capsys.readouterr().err


def test_missing_ssh_command_is_a_clear_error(tmp_path, capsys):
    assert launch.launch(["node-a"], ["train"], nproc_per_node=1, ssh=str(tmp_path / "no-ssh")) == 2
    assert "cannot run" in capsys.readouterr().err


def test_one_failing_host_stops_the_others(tmp_path):
    # host "bad" fails at once; host "slow" would run for a minute unless the launcher stops it
    ssh = fake_ssh(tmp_path, '#!/bin/bash\nif [ "$1" = bad ]; then echo broken; exit 3; fi\nexec sleep 60\n')
    started = time.time()
    code = launch.launch(["slow", "bad"], ["train"], nproc_per_node=1, ssh=str(ssh))
    assert code == 3
    assert time.time() - started < 15


def test_two_local_nodes_train(tmp_path, capsys):
    """2 "nodes" x 1 process through the stand-in ssh: one c10d rendezvous, a tiny model trains 2 steps."""
    csv = write_synthetic_dataset(tmp_path / "data", num=4, seed=0, size=(16, 16), num_frames=4)
    t5 = make_tiny_t5(tmp_path / "t5", d_model=16)
    model_cfg = tmp_path / "tiny.json"
    model_cfg.write_text(json.dumps(dict(depth=1, hidden_size=32, num_heads=2, class_dropout_prob=0.0)))
    hosts = tmp_path / "hosts"
    hosts.write_text("# two local 'nodes'\nlocalhost   # rendezvous host\n\n127.0.0.1\n")
    outputs = tmp_path / "out"
    code = launch.main([
        "--hostfile", str(hosts), "--nproc_per_node", "1", "--master_port", str(free_port()),
        "--ssh", str(fake_ssh(tmp_path)), "--env", "OMP_NUM_THREADS=1", "--",
        "train", "--data_path", str(csv), "--text_pretrained_path", str(t5), "--vae_pretrained_path", "pixel",
        "--model_config", str(model_cfg), "--num_frames", "4", "--image_size", "16", "16", "--frame_interval", "1",
        "--batch_size", "1", "--mixed_precision", "fp32", "--num_workers", "0", "--max_steps", "2",
        "--log_every", "1", "--ckpt_every", "2", "--text_max_length", "8", "--outputs", str(outputs)])
    out = capsys.readouterr().out
    assert code == 0, out[-4000:]
    assert "[localhost] " in out
    (experiment,) = list(outputs.iterdir())
    assert "2 data-parallel x 1 sequence-parallel" in (experiment / "log.txt").read_text()
    assert len((experiment / "metrics.jsonl").read_text().splitlines()) == 2
    assert (experiment / "epoch0-global_step2" / "rng_rank1.pt").is_file()


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_command_line_exit_codes_and_output_survive_the_fast_exit(world_size):
    """Under torchrun (WORLD_SIZE > 1) the CLI ends with os._exit (see opendit.cli.exit_process): the exit code and
    everything printed must still come out."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "WORLD_SIZE": world_size}
    ok = subprocess.run([sys.executable, "-m", "opendit", "--version"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.startswith("opendit ")
    bad = subprocess.run([sys.executable, "-m", "opendit", "nonsense"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown command 'nonsense'" in bad.stderr
