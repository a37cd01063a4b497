"""Beyond one node on torchrun's own c10d rendezvous: two "nodes" (two torchrun processes) on loopback, CPU/gloo.

The 2-node runs take their torchrun line from the Kubeflow manifest (deploy/pytorchjob.yaml), scaled to 2 ranks a
node and the tiny config of its config. 2 nodes x 2 ranks equal 1 node x 4 ranks (losses and final weights, 1e-6);
a 2-node checkpoint resumes on one node after a trip through S3 (s3cache.py, the moto server), and a 1-node one on
two nodes; nodes that do not share train.out_dir are refused at the start; a sweep whose launcher starts one
torchrun per node runs. The runs cost minutes on 2 cores: they are marked slow (`make test-slow`); the manifest's
structure and the sweep's multi-node --dry-run are in the default suite.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import config as C
import s3cache
import sweep
from config import REPO
from tests.servers import free_port, s3_client
from tests.test_distributed import DENV, rewound_copy
from tests.test_train import losses, metrics, tiny_overrides

MANIFEST = REPO / "deploy" / "pytorchjob.yaml"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**DENV, "WMTP_DIST_TIMEOUT_MIN": "2"}  # a rank left waiting in a collective fails within 2 minutes
# 3 steps, a checkpoint at step 2 (the resume tests rewind to it), the end-of-run validation and exports
KV = {"train.steps": 3, "train.save_every": 2, "train.micro_batch_size": 2, "train.eval_every": 0}
KV |= {"train.val_batches": 1, "data.max_length": 64}


def manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def pod(job: dict, role: str) -> dict:
    return job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]


def command(job: dict, role: str = "Master") -> list[str]:
    [container] = pod(job, role)["containers"]
    return container["command"] + container["args"]


def k8s_expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in a container's command and args."""
    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env[m[1]], arg)


def loopback_line(tiny: Path, out: Path, port: int, *extra: str, **kv) -> list[str]:
    """The manifest's torchrun line as a loopback node runs it: the operator's MASTER_ADDR/PORT, 2 ranks a node
    (CPU), configs/X.toml -> configs/tiny_X.toml, then the tiny overrides (later overrides win)."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "MLFLOW_TRACKING_URI": ""}
    line = [k8s_expand(a, env) for a in command(manifest())]
    assert line[0] == "torchrun"
    line = [*TORCHRUN, *line[1:]]
    line = ["--nproc_per_node=2" if a.startswith("--nproc_per_node=") else a for a in line]
    line = [re.sub(r"^configs/(\w+\.toml)$", r"configs/tiny_\1", a) for a in line]
    return [*line, *tiny_overrides(tiny, out, **{**KV, **kv}), *extra]


def two_nodes(lines: list[list[str]], check: bool = True) -> list[subprocess.CompletedProcess]:
    """One torchrun per "node", started together (each its own line: the nodes may differ, e.g. in out_dir)."""
    procs = [
        subprocess.Popen(line, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in lines
    ]
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=600)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    for p in done if check else []:
        assert p.returncode == 0, f"node failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    return done


def one_node(tiny: Path, out: Path, *extra: str, **kv) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=4", "train.py", "configs/tiny_rho1_mbpp.toml"]
    cmd += [*tiny_overrides(tiny, out, **{**KV, **kv}), *extra]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"torchrun failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-4000:]}"
    return p


def assert_same_run(out: Path, a: str, b: str, steps: list[int] | None = None) -> None:
    """Losses of `a` and `b` per step (those in `steps`, else all) and their final weights, to 1e-6."""
    import torch
    from safetensors.torch import load_file

    la, lb = losses(metrics(out, a)), losses(metrics(out, b))
    assert sorted(lb) == sorted(la) == [1, 2, 3]
    for step in steps or sorted(la):
        assert lb[step] == pytest.approx(la[step], rel=1e-6, abs=1e-7), step
    wa, wb = (load_file(out / r / "checkpoints" / "final" / "model.safetensors") for r in (a, b))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)


# --------------------------------------------------------------------------- the manifest (default suite)


def test_manifest_is_a_two_node_pytorchjob_running_one_torchrun_line():
    from torch.distributed.run import get_args_parser

    job = manifest()
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert set(specs) == {"Master", "Worker"} and sum(s["replicas"] for s in specs.values()) == 2
    assert command(job, "Master") == command(job, "Worker")  # every node runs the same line
    args = get_args_parser().parse_args(command(job)[1:])  # torchrun's own parser
    assert (args.nnodes, args.nproc_per_node, args.rdzv_backend) == ("2", "4", "c10d")
    assert args.rdzv_endpoint == "$(MASTER_ADDR):$(MASTER_PORT)" and args.training_script == "train.py"
    assert job["spec"]["nprocPerNode"] == "4"
    for role in specs:
        [c] = pod(job, role)["containers"]
        assert c["name"] == "pytorch" and c["resources"]["limits"]["nvidia.com/gpu"] == 4
        assert not [e for e in c.get("env", []) if re.match(r"AWS_|MLFLOW_", e["name"])]  # secrets: envFrom
        assert [s["secretRef"]["name"] for s in c["envFrom"]] == ["wmtp-credentials"]
    # the config and its overrides load; train.out_dir is a volume every node mounts from one claim
    script_args = args.training_script_args
    overrides, [config] = C.split_args([a for a in script_args if "$(" not in a])
    cfg = C.load_config(REPO / config, overrides)
    claims = set()
    for role in specs:
        spec = pod(job, role)
        [mount] = [m for m in spec["containers"][0]["volumeMounts"] if m["mountPath"] == cfg.train.out_dir]
        [vol] = [v for v in spec["volumes"] if v["name"] == mount["name"]]
        claims.add(vol["persistentVolumeClaim"]["claimName"])
    assert len(claims) == 1 and cfg.train.run_name  # one shared directory; a fixed name to --resume into
    vessl = yaml.safe_load((REPO / "vessl.yaml").read_text())
    assert pod(job, "Master")["containers"][0]["image"] == vessl["image"]["url"]  # one image for both


def test_sweep_dry_run_shows_each_runs_multi_node_command(capsys):
    launcher = (
        "srun --nodes=2 torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=n0:29500"
    )
    path = REPO / "configs" / "sweeps" / "mbpp_7b.toml"
    assert sweep.main([str(path), "--dry-run", "--launcher", launcher]) == 0
    out = capsys.readouterr().out
    lines = [line.strip()[2:] for line in out.splitlines() if line.strip().startswith("$ ")]
    assert len(lines) == out.count("  new ") > 80  # one command per run
    first = shlex.split(lines[0])
    assert first[: len(shlex.split(launcher))] == shlex.split(launcher)
    assert first[len(shlex.split(launcher))] == str(REPO / "train.py") and "--train.run_name=" in lines[0]
    assert "--nnodes" in (REPO / "configs" / "sweeps" / "mbpp_7b.toml").read_text()  # the file says how


# --------------------------------------------------------------------------- the runs (slow)


@pytest.fixture(scope="module")
def reference(tiny_dir, tmp_path_factory):
    """The same run on 1 node x 4 ranks ("1x4") and on 2 nodes x 2 ranks from the manifest's line ("2x2")."""
    out = tmp_path_factory.mktemp("multinode")
    one_node(tiny_dir, out, **{"train.run_name": "1x4"})
    port = free_port()
    nodes = two_nodes([loopback_line(tiny_dir, out, port, **{"train.run_name": "2x2"})] * 2)
    return out, nodes


@pytest.mark.slow
def test_two_nodes_equal_one_node(reference):
    out, nodes = reference
    assert "device cpu x 4" in nodes[0].stdout + nodes[1].stdout  # one world of 4 ranks over both nodes
    assert_same_run(out, "1x4", "2x2")


@pytest.mark.slow
def test_a_two_node_checkpoint_goes_through_s3_and_resumes_on_one_node(reference, tiny_dir, s3_env, capsys):
    """Nodes without a shared filesystem between them and the next machine: the run directory goes up with
    `s3cache.py upload`, comes down with `s3cache.py mirror`, and resumes there (on one node)."""
    out, _ = reference
    bucket = "multinode-runs"
    s3_client(s3_env).create_bucket(Bucket=bucket)
    storage = [f"--storage.s3_bucket={bucket}", f"--storage.cache_dir={out / 's3-cache'}"]
    moved = rewound_copy(out / "2x2", "2x2-to-1x4", 2)
    assert s3cache.main(["upload", str(moved), "runs/2x2-to-1x4", *storage]) == 0
    shutil.rmtree(moved)
    capsys.readouterr()
    assert s3cache.main(["mirror", "runs/2x2-to-1x4", *storage]) == 0
    mirror = Path(capsys.readouterr().out.strip().splitlines()[-1])
    shutil.copytree(mirror, moved, ignore=shutil.ignore_patterns(s3cache.MARKER))
    assert (moved / "checkpoints" / "step_000002" / "dcp" / ".metadata").is_file()
    p = one_node(tiny_dir, out, "--resume", **{"train.run_name": "2x2-to-1x4"})
    assert "resuming from the newest complete checkpoint" in p.stdout  # S3 keeps no symlink: latest is gone
    assert_same_run(out, "1x4", "2x2-to-1x4", steps=[3])


@pytest.mark.slow
def test_a_one_node_checkpoint_resumes_on_two_nodes(reference, tiny_dir):
    out, _ = reference
    rewound_copy(out / "1x4", "1x4-to-2x2", 2)
    line = loopback_line(tiny_dir, out, free_port(), "--resume", **{"train.run_name": "1x4-to-2x2"})
    nodes = two_nodes([line] * 2)
    assert "at step 2" in nodes[0].stdout + nodes[1].stdout
    assert_same_run(out, "1x4", "1x4-to-2x2", steps=[3])


@pytest.mark.slow
def test_nodes_that_do_not_share_the_run_directory_are_refused(tiny_dir, tmp_path):
    port = free_port()
    lines = [loopback_line(tiny_dir, tmp_path / f"node{i}", port, **{"train.run_name": "r"}) for i in (0, 1)]
    nodes = two_nodes(lines, check=False)
    text = "\n".join(p.stdout + p.stderr for p in nodes)
    assert all(p.returncode != 0 for p in nodes), text[-3000:]
    assert "do not see the files rank 0 writes there" in text, text[-3000:]
    # a one-line error from every rank, no traceback through our code (torchrun's agent adds its own report)
    assert not re.search(rf'File "{re.escape(str(REPO))}/(?!\.venv/)', text), text[-3000:]
    assert not list(tmp_path.glob("node*/r/checkpoints/*"))  # stopped before anything was trained


@pytest.mark.slow
def test_a_sweep_with_a_multi_node_launcher(tiny_dir, tmp_path):
    """The sweep starts each run with one launcher command that starts a torchrun per node (srun on a cluster;
    here a script that starts two on loopback)."""
    from tests.test_sweep import write_sweep

    launcher = tmp_path / "two_nodes.sh"
    torchrun = shlex.join([*TORCHRUN, "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d"])
    launcher.write_text(
        "#!/bin/bash\n# two nodes on loopback: what `srun --nodes=2 torchrun ...` starts on a cluster\n"
        f"port=$({sys.executable} -c \"import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); "
        'print(s.getsockname()[1])")\n'
        f'{torchrun} --rdzv_endpoint=127.0.0.1:$port "$@" & a=$!\n'
        f'{torchrun} --rdzv_endpoint=127.0.0.1:$port "$@" & b=$!\n'
        "wait $a; ra=$?; wait $b; rb=$?; exit $((ra | rb))\n"
    )
    path = write_sweep(tmp_path, tiny_dir, '[[grid]]\nname = "arms"\narm = ["uniform"]\n"train.steps" = [2]')
    cmd = [
        sys.executable,
        "sweep.py",
        str(path),
        "--seeds",
        "0",
        "--parallel",
        "1",
        "--launcher",
        f"bash {launcher}",
    ]
    p = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    [run] = [d for d in (tmp_path / "runs").glob("uniform--*") if d.is_dir()]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    log = next((tmp_path / "runs" / "logs").glob("uniform--*.log")).read_text()
    assert "device cpu x 4" in log
